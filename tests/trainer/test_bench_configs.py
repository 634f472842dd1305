"""The GPU benchmark stays ready to run: every (calibration config, lever) it would run on a lent GPU
renders a TrainerConfig the trainer accepts, with the plan and material the benchmark claims to use.
(Its GPU runs themselves need a GPU; this is what can break without one.)"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_trainer_bench", REPO / "benchmarks" / "gpu_trainer_bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_trainer_bench"] = mod
    spec.loader.exec_module(mod)
    if mod.find_measure() is None:
        pytest.skip("shared/calibration/measure.py is not beside the checkout")
    return mod


def test_every_benchmark_run_is_a_valid_trainer_config(bench, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from kubetune_trainer.config import parse_config, plan_for

    _, measure = bench.load_measure()
    assert bench.TARGET in measure.CONFIGS
    runs = [(c, v) for c in measure.CONFIGS if not measure.CONFIGS[c][5].get("liger")
            for v in (bench.TARGET_VARIANTS if c == bench.TARGET else bench.DEFAULT_VARIANTS)]
    assert len(runs) >= 10 + len(bench.TARGET_VARIANTS) - 1
    runs += [("1b-lora-b4s2048-gc", v) for v in bench.VARIANTS if v.startswith("no-gc")]  # device_kit's step 3
    for c, v in runs:
        raw, env = bench.trainer_config(tmp_path, c, v, measure)
        cfg = parse_config(json.loads(json.dumps(raw)), f"{c}/{v}")
        plan = plan_for(cfg)
        arch, method, batch, seq, gc, _ = measure.CONFIGS[c]
        gc = gc and not v.startswith("no-gc")
        assert (plan.method, plan.micro_batch_size, plan.gradient_checkpointing) == (method, batch, gc), (c, v)
        assert plan.fused_kernels == ("no-fused-kernels" not in v), (c, v)
        assert cfg.spec.dataset.max_seq_length == seq
        if v == "no-fused-ce":
            assert not plan.fused_cross_entropy
        elif v == "default":
            assert plan.fused_cross_entropy, "the default run must be what the trainer does out of the box"
        assert set(env) <= {"KUBETUNE_FUSED_OPTIMIZER", "KUBETUNE_COMPILE", "KUBETUNE_FUSED_CE_IMPL", "PYTORCH_CUDA_ALLOC_CONF"}
        if c == bench.TARGET:  # the target's dims are Llama-3.1-8B's, and its tokenizer covers the vocabulary
            model_dir = Path(raw["spec"]["model"]["uri"][len("file://"):])
            mc = AutoConfig.from_pretrained(model_dir)
            assert (mc.hidden_size, mc.num_hidden_layers, mc.intermediate_size, mc.vocab_size) == (4096, 32, 14336, 128256)
            assert len(AutoTokenizer.from_pretrained(model_dir)) == mc.vocab_size
            data = Path(raw["spec"]["dataset"]["uri"][len("file://"):])
            first = json.loads(data.read_text().splitlines()[0])["text"].split()
            assert len(first) == seq if bench.VARIANTS[v][3] == "full" else seq // 8 <= len(first) <= seq


def test_the_benchmark_dry_run_trains_each_kind_of_run_end_to_end(bench, tmp_path):
    """--dry-run is the first command on a lent GPU: the whole driver (config, one subprocess per run,
    RESULT line, jsonl, verdict) on tiny dims. Here on CPU, QLoRA must be refused with the trainer's message."""
    import os
    import subprocess

    configs = [bench.TARGET, "8b-qlora-b4s2048-gc", "1b-full-b4s2048"]
    variants = ["default", "mixed-packing"]
    env = dict(os.environ, OUT=str(tmp_path / "out"), CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_trainer_bench.py"), "--dry-run", "--work",
                        str(tmp_path / "work"), "--configs", *configs, "--variants", *variants],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "trainer_bench_dry.jsonl").read_text().splitlines()]
    assert [(r["config"], r["variant"]) for r in rows] == [(c, v) for c in configs for v in variants]
    assert "4 trained, 2 QLoRA refused (no GPU), 0 failed" in p.stdout
    for r in rows:
        assert r["dry_run"] and r["gpu"] == "cpu" and r["peak_reserved_gib"] is None
        if "qlora" in r["config"]:
            assert r["error"].startswith("BadConfig: method.type qlora needs a CUDA GPU"), r["error"]
            continue
        assert r["error"] is None, r
        assert r["steps"] == bench.DRY_STEPS and len(r["losses"]) == bench.DRY_STEPS
        assert all(0 < x < 20 for x in r["losses"]), r["losses"]
        assert r["tokens_per_s"] > 0
        assert 0 < r["estimate_allocated_gib"] < r["estimate_gib"] < 3, r  # tiny dims: the CUDA context dominates
        if r["variant"] == "default":  # full-length rows: every token real, so both definitions agree
            assert r["levers"]["packing"] is False
            assert r["tokens_per_s_median_step"] > 0
        else:
            assert r["levers"] == {**r["levers"], "packing": True, "data": "mixed"}

    # a misspelt variant is refused before anything runs
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_trainer_bench.py"), "--dry-run", "--work",
                        str(tmp_path / "work"), "--variants", "fused"], capture_output=True, text=True, env=env)
    assert p.returncode != 0 and "unknown variant fused; variants are: default, no-fused-kernels, no-fused-ce" in p.stderr
