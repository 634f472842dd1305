"""Train the tiny model for real with each method and check the loss drops."""
import json
from pathlib import Path

import pytest

import tiny
from kubetune_trainer.config import parse_config
from kubetune_trainer.loop import train
from proc import TrainerProc

pytestmark = pytest.mark.slow

# method, settings, learning rate, steps, train-loss threshold (the base model starts at ~6.1)
METHODS = {
    "full": ({"type": "full"}, 3e-3, 1.8),
    "lora": ({"type": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.05}}, 2e-2, 2.0),
    "freeze": ({"type": "freeze", "freeze": {"trainableLayers": 1}}, 1e-2, 1.8),
    "prompt-tuning": ({"type": "prompt-tuning", "virtualTokens": 8}, 0.3, 3.8),
    "prefix-tuning": ({"type": "prefix-tuning", "virtualTokens": 8}, 1e-1, 4.0),
}


def run(tmp_path, model_dir, rows, *, method, lr, steps=30, fmt="alpaca", dataset=None, training=None, output=None):
    data = tiny.write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
    cfg = tiny.trainer_config(tmp_path, model_dir, data, method=method, output=output,
                              dataset={"format": fmt, "validationSplit": 0.1, **(dataset or {})},
                              training={"learningRate": lr, "maxSteps": steps, "evalSteps": 10, "loggingSteps": 5,
                                        "weightDecay": 0.01, "scheduler": "cosine", "warmupRatio": 0.1, **(training or {})})
    return train(parse_config(cfg))


@pytest.mark.parametrize("name", list(METHODS))
def test_method_learns(tmp_path, model_dir, name, capsys):
    method, lr, threshold = METHODS[name]
    out = run(tmp_path, model_dir, tiny.alpaca_rows(80), method=method, lr=lr)
    m = out.result.metrics
    print(f"\n{name}: trainLoss={m['trainLoss']:.4f} evalLoss={m['evalLoss']:.4f} baseEvalLoss={m['baseEvalLoss']:.4f}")
    assert out.reason == "Completed" and out.step == 30
    assert m["trainLoss"] < threshold
    assert m["evalLoss"] < m["baseEvalLoss"]
    assert m["perplexity"] < m["basePerplexity"]
    sub = "model" if name in ("full", "freeze") else "adapter"
    out_dir = tmp_path / "store" / "out" / sub
    assert out.result.adapter_uri == f"file://{tmp_path}/store/out/{sub}/"
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} >= {"config.json" if sub == "model" else "adapter_config.json"}


def test_chat_packed_and_merged(tmp_path, model_dir):
    out = run(tmp_path, model_dir, tiny.chat_rows(60), fmt="chat", method=METHODS["lora"][0], lr=2e-2,
              dataset={"packing": True, "maxSeqLength": 128}, output={"mergeAdapter": True})
    m = out.result.metrics
    print(f"\nchat+packing lora: trainLoss={m['trainLoss']:.4f} evalLoss={m['evalLoss']:.4f} base={m['baseEvalLoss']:.4f}")
    assert m["trainLoss"] < 2.0 and m["evalLoss"] < m["baseEvalLoss"]
    assert out.result.merged_uri and (tmp_path / "store" / "out" / "merged" / "config.json").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "store" / "out" / "merged"))
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_text_format_unfused_loss(tmp_path, model_dir):
    out = run(tmp_path, model_dir, tiny.text_rows(60), fmt="text", method=METHODS["full"][0], lr=3e-3,
              training={"fusedCrossEntropy": False, "gradientAccumulationSteps": 2, "microBatchSize": 2})
    m = out.result.metrics
    print(f"\ntext full (unfused CE, GA 2): trainLoss={m['trainLoss']:.4f} evalLoss={m['evalLoss']:.4f}")
    assert m["trainLoss"] < 1.5 and m["evalLoss"] < m["baseEvalLoss"]


def test_early_stopping(tmp_path, model_dir):
    out = run(tmp_path, model_dir, tiny.alpaca_rows(40), method=METHODS["lora"][0], lr=2e-2, steps=50,
              training={"evalSteps": 2, "earlyStopping": {"patience": 2, "minDelta": 100.0}})
    assert out.reason == "EarlyStopped" and out.step == 6
    assert (tmp_path / "store" / "ckpt" / "checkpoint-00000006" / "manifest.json").exists()


def test_a_pvc_model_and_dataset_are_read_in_place_and_left_untouched(tmp_path, model_dir, monkeypatch):
    """pvc://claim/path is where the operator mounts the claim, read-only: the trainer must find
    the files there, copy nothing to its work dir, and write nothing next to them."""
    import hashlib
    import shutil

    root = tmp_path / "mnt"
    shutil.copytree(model_dir, root / "models" / "tiny")
    tiny.write_jsonl(root / "datasets" / "alpaca" / "train.jsonl", tiny.alpaca_rows(60))
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(root))

    def snapshot():
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    before = snapshot()
    cfg = tiny.trainer_config(tmp_path, model_dir, root / "unused.jsonl", method=METHODS["lora"][0],
                              dataset={"validationSplit": 0.1}, training={"learningRate": 2e-2, "maxSteps": 10},
                              output={"mergeAdapter": True})
    cfg["spec"]["model"]["uri"] = "pvc://models/tiny"
    cfg["spec"]["dataset"]["uri"] = "pvc://datasets/alpaca/"
    out = train(parse_config(cfg))
    assert out.reason == "Completed" and out.step == 10
    assert out.result.metrics["evalLoss"] < out.result.metrics["baseEvalLoss"]
    assert out.result.merged_uri  # the merge reloaded the base from the claim too
    assert snapshot() == before  # nothing written beside the weights or the data (the mount is read-only)
    assert not (tmp_path / "work" / "model").exists() and not (tmp_path / "work" / "data").exists()  # no copies


def test_a_hub_dataset_path_trains_on_the_files_it_names(tmp_path, model_dir):
    """dataset.uri and validationUri as hf://org/name/<glob>, read by the real huggingface_hub client
    from its cache in the work dir (HF_HUB_OFFLINE: there is no Hub here)."""
    from proc import TrainerProc
    from test_units import ULTRA, hub_cache

    cfg = tiny.trainer_config(tmp_path, model_dir, tmp_path / "unused.jsonl", method=METHODS["lora"][0],
                              dataset={"uri": "hf://org/ultra/data/train_sft-*", "format": "chat",
                                       "validationUri": "hf://org/ultra/data/test_sft-*"},
                              training={"learningRate": 2e-2, "maxSteps": 12, "evalSteps": 6})
    hub_cache(Path(cfg["paths"]["workDir"]), "org/ultra", ULTRA)
    run = TrainerProc(cfg, tmp_path / "c.yaml", env={"HF_HUB_OFFLINE": "1"})
    assert run.wait(300) == 0, run.stderr[-3000:]
    data = run.events_of("data")[0]
    assert data["files"] == 1 and data["train"] == 30 and data["validation"] == 6, data  # not train_gen, not test_gen
    m = json.loads(run.termination.read_text())["result"]["metrics"]
    assert m["evalLoss"] < m["baseEvalLoss"] - 1.0


# Every causal-LM type the estimator models (kubetune.estimator.arch.FAMILIES), at the tiny dims: the
# trainer loads it, applies LoRA to all linear layers (Conv1D in GPT-2, 3D experts in the MoEs) and
# learns. Gemma 2 has no SDPA path in transformers (its soft-capped scores): asking for SDPA fails its
# load, so the trainer takes eager attention there, as the estimator prices it (eager_attention).
FAMILY_TYPES = ["mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe",
                "olmo2", "granite", "phi3", "gpt_neox", "gpt2"]


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_each_model_type_the_estimator_knows_trains_with_lora(tmp_path, model_type):
    model_dir = tiny.build_model_dir(tmp_path / model_type, family=model_type)
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_rows(24, seed=2))
    cfg = tiny.trainer_config(tmp_path, model_dir, data, training={"maxSteps": 8, "microBatchSize": 2, "learningRate": 1e-2})
    run = TrainerProc(cfg, tmp_path / "c.yaml")
    assert run.wait(300) == 0, run.stderr[-3000:]
    m, losses = run.events_of("model")[0], run.losses()
    print(f"\n{model_type} lora ({m['attention']} attention, {m['trainable']} trainable): loss {losses[1]:.3f} -> {losses[8]:.3f}")
    assert m["attention"] == ("eager" if model_type == "gemma2" else "sdpa")
    assert m["trainable"] > 0 and losses[8] < losses[1] - 2.0


def test_the_estimator_and_transformers_agree_on_which_models_lack_sdpa():
    from transformers import AutoConfig, AutoModelForCausalLM

    from kubetune.estimator import from_config
    from kubetune.estimator.arch import FAMILIES

    checked = 0
    for t in FAMILIES:
        try:
            cls = AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(t))]
        except (KeyError, ValueError):
            continue  # not a causal LM here (bert) or not in this transformers
        cfg = AutoConfig.for_model(t).to_dict()
        eager = from_config(cfg, t).eager_attention
        assert eager == (not cls._supports_sdpa), (t, cls.__name__)
        checked += 1
    assert checked >= 15
