"""QLoRA and the 8-bit optimizers for real on CPU. bitsandbytes has CPU kernels (slow, real): with
the test knob KUBETUNE_DEBUG_BNB_ON_CPU=1 the trainer loads the base quantized and trains adapters
over it, or keeps 8-bit optimizer states, so those paths (quantized load, checkpoints, resume,
outputs, merge) run here, not first on a GPU. Users still get the clear errors on CPU
(test_units.test_qlora_on_cpu_is_a_clear_error)."""
import json

import pytest

import tiny
from proc import TrainerProc

pytestmark = pytest.mark.slow

KNOB = {"KUBETUNE_DEBUG_BNB_ON_CPU": "1"}
STEPS = 16


def config(tmp_path, model_dir, data, *, quantization=None, training=None, output=None, store=None):
    store = store or tmp_path / "store"
    method = {"type": "qlora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.1}}  # dropout: the RNG is restored too
    if quantization:
        method["quantization"] = quantization
    cfg = tiny.trainer_config(
        tmp_path, model_dir, data, method=method, output=output,
        dataset={"validationSplit": 0.1},
        training={"maxSteps": STEPS, "microBatchSize": 2, "gradientAccumulationSteps": 2, "learningRate": 2e-2,
                  "scheduler": "cosine", "warmupRatio": 0.1, "evalSteps": 4, "loggingSteps": 1, "seed": 5,
                  **(training or {})},
        checkpoints={"saveSteps": 4, "keep": 2},
        ckpt_uri=f"file://{store}/ckpt", output_uri=f"file://{store}/out", progress_uri=f"file://{store}/progress.json")
    cfg["spec"]["resources"]["gpusPerNode"] = 1  # the API's rule for qlora; the trainer runs on CPU regardless
    cfg["paths"]["workDir"] = str(store / "work")
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny.write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", tiny.alpaca_rows(48, seed=4))


def finished(proc: TrainerProc) -> dict:
    assert proc.wait(300) == 0, proc.stderr[-3000:]
    return json.loads(proc.termination.read_text())


@pytest.mark.parametrize("quantization", [None, {"bits": 4, "quantType": "fp4", "doubleQuant": False}, {"bits": 8}],
                         ids=["nf4-double", "fp4", "int8"])
def test_qlora_learns_checkpoints_only_the_adapter_and_merges(tmp_path, model_dir, data, quantization):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = TrainerProc(config(tmp_path, model_dir, data, quantization=quantization, output={"mergeAdapter": True},
                             training={"maxSteps": 30, "evalSteps": 10}), tmp_path / "q.yaml", env=KNOB)
    term = finished(run)
    m = term["result"]["metrics"]
    model_ev, loaded = run.events_of("model")[0], run.events_of("load")[0]["materializedBytes"]
    print(f"\nqlora {quantization or 'nf4'}: trainLoss={m['trainLoss']:.4f} evalLoss={m['evalLoss']:.4f} "
          f"base={m['baseEvalLoss']:.4f} loaded={loaded} bytes (fp32: {4 * 102_720})")
    assert term["reason"] == "Completed" and term["step"] == 30
    assert "kernels-community" not in run.stderr  # bitsandbytes' import-time noise about an optional CPU kernel
    assert m["evalLoss"] < 0.5 * m["baseEvalLoss"] and m["trainLoss"] < 2.5
    assert model_ev["params"] == 102_720 and model_ev["trainable"] == 16_384  # counted as the logical weights
    # the 73,728 weights of the blocks' linear layers are held in 4 or 8 bits; the rest (embeddings,
    # head, norms, adapters: 28,992) in fp32 on CPU; plus the quantization constants (absmax, code
    # books, row scales: counted exactly in test_the_estimators_quantized_weights_are_what_bitsandbytes_holds),
    # which at these dims (14 linears, a 1 KiB nested code book each with double quant) weigh up to half
    # as much again, still less than the same linears in bf16
    bits = (quantization or {}).get("bits", 4)
    assert 4 * 28_992 + 73_728 * bits // 8 < loaded < 4 * 28_992 + 73_728 * 2

    store = tmp_path / "store"
    ckpt = load_file(str(store / "ckpt" / "checkpoint-00000030" / "model.safetensors"))
    assert ckpt and all(".lora_" in k for k in ckpt), sorted(ckpt)[:5]  # never the (quantized) base
    assert sum(v.numel() for v in ckpt.values()) == 16_384
    adapter = json.loads((store / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["peft_type"] == "LORA"

    # the merged model is a plain one: full-precision weights, no adapter, no quantization config
    merged = AutoModelForCausalLM.from_pretrained(str(store / "out" / "merged"))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert "quantization_config" not in json.loads((store / "out" / "merged" / "config.json").read_text())
    assert sum(p.numel() for p in merged.parameters()) == 86_336
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    w = "model.layers.0.self_attn.q_proj.weight"
    assert (merged.state_dict()[w] - base.state_dict()[w]).abs().max() > 1e-3  # the trained adapter is in it


def test_evaluating_does_not_change_qlora_training(tmp_path, model_dir, data):
    """bitsandbytes repacks a CPU 4-bit layer for inference the first time it runs in eval mode, and
    its matmul on the repacked weight has no backward: unless the trainer prevents it, every step
    after the first evaluation trains differently from a run that never evaluated."""
    val = tiny.write_jsonl(tmp_path / "val.jsonl", tiny.alpaca_rows(8, seed=9))
    cfg = config(tmp_path / "a", model_dir, data, store=tmp_path / "a")
    cfg["spec"]["dataset"] = {"uri": f"file://{data}", "validationUri": f"file://{val}", "maxSeqLength": 128}
    with_evals = TrainerProc(cfg, _yaml(tmp_path, "a"), env=KNOB)
    finished(with_evals)
    cfg = config(tmp_path / "b", model_dir, data, store=tmp_path / "b")
    cfg["spec"]["dataset"] = {"uri": f"file://{data}", "maxSeqLength": 128}  # no validation set: never evaluates
    no_evals = TrainerProc(cfg, _yaml(tmp_path, "b"), env=KNOB)
    finished(no_evals)
    a, b = with_evals.losses(), no_evals.losses()
    assert len(with_evals.events_of("eval")) >= 5 and all(e["evalLoss"] is None for e in no_evals.events_of("eval"))
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    worst = max(abs(a[s] - b[s]) for s in a)
    print(f"\nqlora, evals every 4 steps vs none: max |dloss| over {STEPS} steps = {worst:.3g}")
    assert worst < 1e-6, {s: (a[s], b[s]) for s in a}


def test_qlora_resumes_exactly_after_kill9(tmp_path, model_dir, data):
    ref = TrainerProc(config(tmp_path / "ref", model_dir, data, store=tmp_path / "ref"), _yaml(tmp_path, "ref"), env=KNOB)
    ref_term = finished(ref)

    cfg = config(tmp_path / "run", model_dir, data, store=tmp_path / "run")
    first = TrainerProc(cfg, _yaml(tmp_path, "run"), env={**KNOB, "KUBETUNE_DEBUG_STEP_SLEEP": "0.3"})
    first.wait_for(lambda e: e.get("event") == "log" and "checkpoint-00000008 committed" in e.get("message", ""), 300)
    first.wait_for(lambda e: e.get("event") == "step" and e["step"] >= 10, 60)
    first.kill9()
    killed_at = max(first.losses())
    second = TrainerProc(cfg, _yaml(tmp_path, "run"), env=KNOB)
    term = finished(second)
    assert second.events_of("resumed")[0]["step"] == 8
    assert sorted(second.losses()) == list(range(9, STEPS + 1))
    got, expected = {**first.losses(), **second.losses()}, ref.losses()
    worst = max(abs(got[s] - expected[s]) for s in expected)
    print(f"\nqlora kill -9 at step {killed_at}, resumed from 8: max |dloss| over {STEPS} steps = {worst:.3g}")
    assert worst < 1e-4
    assert abs(term["result"]["metrics"]["evalLoss"] - ref_term["result"]["metrics"]["evalLoss"]) < 1e-4


def _yaml(tmp_path, name):
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    return tmp_path / name / "config.yaml"


@pytest.mark.parametrize("optimizer", ["adamw-8bit", "paged-adamw-8bit"])
def test_8bit_optimizer_states_resume_exactly_after_kill9(tmp_path, model_dir, data, optimizer):
    """bitsandbytes' 8-bit AdamW (block-quantized states, with absmax and qmap tensors of their own)
    through the checkpoint: full fine-tuning, so the blocks' matrices (>= 4,096 elements) get 8-bit
    states. Paged falls back to unpaged on CPU, but goes through its own class."""
    import torch

    def cfg_for(store):
        cfg = config(tmp_path / store, model_dir, data, store=tmp_path / store,
                     training={"optimizer": optimizer, "learningRate": 3e-3})
        cfg["spec"]["method"] = {"type": "full"}
        return cfg

    ref = TrainerProc(cfg_for("ref"), _yaml(tmp_path, "ref"), env=KNOB)
    finished(ref)
    first = TrainerProc(cfg_for("run"), _yaml(tmp_path, "run"), env={**KNOB, "KUBETUNE_DEBUG_STEP_SLEEP": "0.3"})
    first.wait_for(lambda e: e.get("event") == "log" and "checkpoint-00000008 committed" in e.get("message", ""), 300)
    first.wait_for(lambda e: e.get("event") == "step" and e["step"] >= 10, 60)
    first.kill9()
    second = TrainerProc(cfg_for("run"), _yaml(tmp_path, "run"), env=KNOB)
    finished(second)
    assert second.events_of("resumed")[0]["step"] == 8
    got, expected = {**first.losses(), **second.losses()}, ref.losses()
    worst = max(abs(got[s] - expected[s]) for s in expected)
    print(f"\nfull + {optimizer}, kill -9 resumed from 8: max |dloss| over {STEPS} steps = {worst:.3g}; "
          f"loss {expected[1]:.3f} -> {expected[STEPS]:.3f}")
    assert worst < 1e-4 and expected[STEPS] < expected[1] - 1.0
    osd = torch.load(tmp_path / "run" / "ckpt" / "checkpoint-00000016" / "optimizer.pt", weights_only=False)
    # the states really are 8-bit where bitsandbytes quantizes them: tensors of >= 4,096 elements
    # (embeddings, head, q/o and the MLP matrices of both blocks), saved in its own nested form
    states = {k: {**st, **st.get("__bnb_optimizer_quant_state__", {})} for k, st in osd["state"].items()}
    eight_bit = {k for k, st in states.items() if st["state1"].dtype == torch.uint8 and st["state2"].dtype == torch.uint8}
    assert len(eight_bit) == 12 and "model.layers.1.mlp.down_proj.weight" in eight_bit, sorted(eight_bit)


@pytest.mark.parametrize("bits,double_quant", [(4, True), (4, False), (8, False)], ids=["nf4-double", "nf4", "int8"])
def test_the_estimators_quantized_weights_are_what_bitsandbytes_holds(tmp_path, bits, double_quant):
    """The estimator prices a QLoRA base at 4.127 bits a weight (NF4, double quant), 4.5 (plain NF4)
    or 8 (LLM.int8), and everything else (embeddings, head, norms) at the compute dtype. Counted here
    on the real quantized model: every tensor bitsandbytes keeps (packed weights, absmax, nested
    constants, code books, int8 row scales) on a model whose dims divide its 64-weight blocks."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    from kubetune.api.v1alpha1 import FineTuneJobSpec
    from kubetune.estimator import estimate
    from kubetune.estimator.arch import from_config
    from kubetune.plan import plan_from_spec

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "m"))
    q = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                            bnb_4bit_compute_dtype=torch.bfloat16))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.bfloat16, quantization_config=q,
                                                 device_map={"": "cpu"})
    held = 0
    for mod in model.modules():
        for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)):
            held += t.numel() * t.element_size()
        w = getattr(mod, "weight", None)
        if getattr(w, "quant_state", None) is not None:
            held += sum(v.numel() * v.element_size() for v in w.quant_state.as_dict(packed=True).values() if torch.is_tensor(v))
        if getattr(w, "SCB", None) is not None:
            held += w.SCB.numel() * w.SCB.element_size()

    arch = from_config(json.loads((tmp_path / "m" / "config.json").read_text()))
    spec = FineTuneJobSpec.model_validate({
        "model": {"uri": "s3://models/m/"}, "dataset": {"uri": "s3://data/train.jsonl"}, "checkpoints": {"uri": "s3://ckpts/"},
        "method": {"type": "qlora", "quantization": {"bits": bits, "doubleQuant": double_quant}},
        "training": {"maxSteps": 1, "microBatchSize": 1}, "resources": {"gpusPerNode": 1}})
    plan = plan_from_spec(spec, 1, 1, 1)  # what the trainer runs: the non-quantized parts in bf16
    assert plan.weight_dtype == "bf16"
    priced = estimate(arch, plan).breakdown["weights"]
    print(f"\nqlora {bits}-bit{' double quant' if double_quant else ''}: bitsandbytes holds {held:,} bytes, "
          f"the estimator prices {priced:,} ({(priced - held) / held:+.2%})")
    # what is left is per-layer constants (code books, 1 KiB or so a layer): < 1% here, nothing at 8B
    assert abs(priced - held) / held < 0.01
    from kubetune_trainer.model import materialized_bytes

    assert materialized_bytes(model) == held  # the trainer's load event counts the same bytes
