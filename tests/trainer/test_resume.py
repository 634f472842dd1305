"""Kill -9 a run midway, restart it, and check the resumed losses continue the uninterrupted run's."""
import json

import pytest

import tiny
from proc import TrainerProc

pytestmark = pytest.mark.slow

STEPS = 24


def config(tmp_path, model_dir, data, store):
    cfg = tiny.trainer_config(
        tmp_path, model_dir, data,
        method={"type": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.1}},  # dropout: the RNG must be restored
        dataset={"validationSplit": 0.1},
        training={"maxSteps": STEPS, "microBatchSize": 2, "gradientAccumulationSteps": 2, "learningRate": 1e-2,
                  "scheduler": "cosine", "warmupRatio": 0.1, "weightDecay": 0.01, "evalSteps": 6, "loggingSteps": 1,
                  "seed": 11},
        checkpoints={"saveSteps": 4, "keep": 2},
        ckpt_uri=f"file://{store}/ckpt", output_uri=f"file://{store}/out", progress_uri=f"file://{store}/progress.json")
    cfg["paths"]["workDir"] = str(store / "work")
    return cfg


def test_kill9_and_resume_continue_the_same_losses(tmp_path, model_dir):
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_rows(40, seed=3))  # 36 train: 2 epochs in 24 steps

    ref = TrainerProc(config(tmp_path, model_dir, data, tmp_path / "ref"), tmp_path / "ref.yaml")
    assert ref.wait(300) == 0, ref.stderr[-3000:]
    expected = ref.losses()
    assert sorted(expected) == list(range(1, STEPS + 1))

    store = tmp_path / "run"
    cfg = config(tmp_path, model_dir, data, store)
    first = TrainerProc(cfg, tmp_path / "run.yaml", env={"KUBETUNE_DEBUG_STEP_SLEEP": "0.3"})
    first.wait_for(lambda e: e.get("event") == "log" and "checkpoint-00000012 committed" in e.get("message", ""), 300)
    first.wait_for(lambda e: e.get("event") == "step" and e["step"] >= 14, 60)
    first.kill9()
    killed_at = max(first.losses())
    assert 14 <= killed_at < STEPS

    second = TrainerProc(cfg, tmp_path / "run.yaml")
    assert second.wait(300) == 0, second.stderr[-3000:]
    resumed = [e for e in second.events if e.get("event") == "resumed"]
    assert resumed and resumed[0]["step"] == 12
    got = {**first.losses(), **second.losses()}
    assert sorted(second.losses()) == list(range(13, STEPS + 1))
    deltas = {s: abs(got[s] - expected[s]) for s in expected}
    worst = max(deltas.values())
    print(f"\nresume: killed at step {killed_at}, resumed from 12; max |dloss| = {worst:.3g}")
    assert worst < 1e-4, deltas

    term = json.loads(second.termination.read_text())
    ref_term = json.loads(ref.termination.read_text())
    assert term["reason"] == "Completed" and term["step"] == STEPS
    assert abs(term["result"]["metrics"]["evalLoss"] - ref_term["result"]["metrics"]["evalLoss"]) < 1e-4
    # the base model's eval from the first attempt survives the restart
    assert term["result"]["metrics"]["baseEvalLoss"] == ref_term["result"]["metrics"]["baseEvalLoss"]
    # retention: the newest two plus the best by eval loss
    kept = sorted(p.name for p in (store / "ckpt").iterdir())
    assert "checkpoint-00000024" in kept and "checkpoint-00000020" in kept and len(kept) <= 3
    progress = json.loads((store / "progress.json").read_text())
    assert progress["state"] == "finished" and progress["resumedFromStep"] == 12
