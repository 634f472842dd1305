"""The GPU's precisions on CPU. On CPU the trainer holds and computes everything in fp32; with the
test knob KUBETUNE_DEBUG_PRECISION_ON_CPU=1 it keeps the plan's dtypes (bf16 or fp16 weights, bf16 or
fp16 autocast) as on a GPU, so the default precision (bf16-mixed) and the others run here, through
checkpoints and a kill -9, before they ever meet a GPU. (accelerate keeps fp16's loss scaler only on
accelerators: test_units checks that its scale survives a checkpoint.)"""
import json

import pytest

import tiny
from proc import TrainerProc

pytestmark = pytest.mark.slow

KNOB = {"KUBETUNE_DEBUG_PRECISION_ON_CPU": "1", "KUBETUNE_DEBUG_BNB_ON_CPU": "1"}
STEPS = 16
METHODS = {
    "lora": {"type": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.1}},
    "qlora": {"type": "qlora", "lora": {"rank": 8, "alpha": 16}},
    "full": {"type": "full"},
    "freeze": {"type": "freeze", "freeze": {"trainableLayers": 1}},
    "prefix-tuning": {"type": "prefix-tuning", "virtualTokens": 8},
}


def config(tmp_path, model_dir, data, store, method, precision, **training):
    cfg = tiny.trainer_config(
        tmp_path, model_dir, data, method=METHODS[method], dataset={"validationSplit": 0.1},
        output={"mergeAdapter": method in ("lora", "qlora")},
        training={"maxSteps": STEPS, "microBatchSize": 2, "gradientAccumulationSteps": 2,
                  "learningRate": {"full": 2e-3, "freeze": 5e-3, "prefix-tuning": 3e-2}.get(method, 2e-2),
                  "scheduler": "cosine", "warmupRatio": 0.1, "evalSteps": 4, "loggingSteps": 1, "seed": 3,
                  "precision": precision, **training},
        checkpoints={"saveSteps": 4, "keep": 2},
        ckpt_uri=f"file://{store}/ckpt", output_uri=f"file://{store}/out", progress_uri=f"file://{store}/progress.json")
    if method == "qlora":
        cfg["spec"]["resources"]["gpusPerNode"] = 1  # the API's rule; CPU all the same
    cfg["paths"]["workDir"] = str(store / "work")
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny.write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", tiny.alpaca_rows(48, seed=4))


# precision, method -> the dtype of the loaded base weights, of what is checkpointed (what trains)
CASES = {
    ("bf16-mixed", "lora"): ("torch.bfloat16", "F32"),  # a bf16 base, fp32 adapters, bf16 autocast
    ("bf16-mixed", "qlora"): ("torch.bfloat16", "F32"),
    ("bf16-mixed", "full"): ("torch.float32", "F32"),  # an fp32 master copy under bf16 autocast
    ("bf16-mixed", "freeze"): ("torch.float32", "F32"),
    ("bf16-mixed", "prefix-tuning"): ("torch.bfloat16", "F32"),
    ("bf16", "full"): ("torch.bfloat16", "BF16"),  # everything bf16, optimizer states too
    ("fp16", "lora"): ("torch.float16", "F32"),  # fp16 autocast with the loss scaler
    ("fp16", "full"): ("torch.float32", "F32"),
}


@pytest.mark.parametrize("precision,method", list(CASES), ids=[f"{p}-{m}" for p, m in CASES])
def test_each_precision_trains_in_its_dtypes(tmp_path, model_dir, data, precision, method):
    import struct

    run = TrainerProc(config(tmp_path, model_dir, data, tmp_path / "s", method, precision), tmp_path / "c.yaml", env=KNOB)
    assert run.wait(300) == 0, run.stderr[-3000:]
    term = json.loads(run.termination.read_text())
    m, losses = term["result"]["metrics"], run.losses()
    weights, saved = CASES[(precision, method)]
    print(f"\n{precision} {method}: loss {losses[1]:.3f} -> {losses[STEPS]:.3f}, eval {m['baseEvalLoss']:.3f} -> "
          f"{m['evalLoss']:.3f}, weights {run.events_of('model')[0]['weightDtype']}")
    assert run.events_of("model")[0]["weightDtype"] == weights
    assert m["evalLoss"] < m["baseEvalLoss"] - (0.3 if method == "prefix-tuning" else 1.0)
    # the checkpoint holds the trainable state in its own dtype (safetensors' header says which)
    raw = (tmp_path / "s" / "ckpt" / f"checkpoint-{STEPS:08d}" / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {saved}
    if method in ("lora", "qlora"):
        merged = json.loads((tmp_path / "s" / "out" / "merged" / "config.json").read_text())
        assert merged["dtype"] == {"fp16": "float16"}.get(precision, "bfloat16")  # merged in the compute dtype


@pytest.mark.parametrize("precision,method", [("bf16-mixed", "lora"), ("fp16", "full")])
def test_mixed_precision_resumes_exactly_after_kill9(tmp_path, model_dir, data, precision, method):
    """bf16-mixed is the default on a GPU; fp16 is for GPUs without bf16 (V100, T4)."""
    ref = TrainerProc(config(tmp_path, model_dir, data, tmp_path / "ref", method, precision), tmp_path / "ref.yaml", env=KNOB)
    assert ref.wait(300) == 0, ref.stderr[-3000:]
    cfg = config(tmp_path, model_dir, data, tmp_path / "run", method, precision)
    first = TrainerProc(cfg, tmp_path / "run.yaml", env={**KNOB, "KUBETUNE_DEBUG_STEP_SLEEP": "0.3"})
    first.wait_for(lambda e: e.get("event") == "log" and "checkpoint-00000008 committed" in e.get("message", ""), 300)
    first.wait_for(lambda e: e.get("event") == "step" and e["step"] >= 10, 60)
    first.kill9()
    second = TrainerProc(cfg, tmp_path / "run.yaml", env=KNOB)
    assert second.wait(300) == 0, second.stderr[-3000:]
    assert second.events_of("resumed")[0]["step"] == 8
    got, want = {**first.losses(), **second.losses()}, ref.losses()
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - want[s]) for s in want)
    print(f"\n{precision} {method}, kill -9 resumed from 8: max |dloss| over {STEPS} steps = {worst:.3g}")
    assert worst < 1e-4, {s: (got[s], want[s]) for s in want}
