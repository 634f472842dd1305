"""Liger's Triton kernels in the trainer, run on CPU by Triton's interpreter (TRITON_INTERPRET=1): the
same kernel code a GPU compiles, executed in numpy. On a GPU the trainer swaps in Liger's RMSNorm, RoPE
and SwiGLU (training.fusedKernels) and computes the loss with Liger's fused linear cross-entropy
(training.fusedCrossEntropy); here KUBETUNE_DEBUG_LIGER_ON_CPU=1 makes it do the same, and each run must
train step for step like transformers' own modules with the chunked torch loss."""
import os
from pathlib import Path

import pytest

import tiny
from proc import TrainerProc

pytestmark = pytest.mark.slow

SHIM = str(Path(__file__).parent / "triton_cpu")
LIGER = {"KUBETUNE_DEBUG_LIGER_ON_CPU": "1", "TRITON_INTERPRET": "1",
         "PYTHONPATH": os.pathsep.join(p for p in (SHIM, os.environ.get("PYTHONPATH")) if p)}
STEPS = 6


def test_the_estimators_liger_model_types_are_the_ones_liger_patches():
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    from kubetune.estimator.arch import FAMILIES
    from kubetune.plan import LIGER_MODEL_TYPES

    assert LIGER_MODEL_TYPES <= set(MODEL_TYPE_TO_APPLY_LIGER_FN), LIGER_MODEL_TYPES - set(MODEL_TYPE_TO_APPLY_LIGER_FN)
    # every Llama- or Phi-3-layout type the estimator knows and Liger patches gets the estimator's discount
    known = {t for t, f in FAMILIES.items() if f in ("llama", "phi3")}
    assert known & set(MODEL_TYPE_TO_APPLY_LIGER_FN) == LIGER_MODEL_TYPES


def _run(tmp_path, model_dir, data, name, method, env):
    cfg = tiny.trainer_config(tmp_path / name, model_dir, data, method=method,
                              training={"maxSteps": STEPS, "microBatchSize": 2, "learningRate": 3e-3,
                                        "fusedCrossEntropy": True, "fusedKernels": True},
                              dataset={"maxSeqLength": 48})
    if method["type"] == "qlora":
        cfg["spec"]["resources"]["gpusPerNode"] = 1  # the API's rule for qlora; CPU all the same
    run = TrainerProc(cfg, tmp_path / f"{name}.yaml", env=env)
    assert run.wait(600) == 0, run.stderr[-3000:]
    return run


@pytest.mark.parametrize("family,method", [
    ("llama", {"type": "lora", "lora": {"rank": 8, "alpha": 16}}),
    ("qwen2", {"type": "full"}),  # the norms' weights train: Liger's RMSNorm backward computes dW too
    ("llama", {"type": "qlora", "lora": {"rank": 8, "alpha": 16}}),  # around bitsandbytes' 4-bit linears
], ids=["llama-lora", "qwen2-full", "llama-qlora"])
def test_liger_kernels_train_like_transformers_modules(tmp_path, family, method):
    model_dir = tiny.build_model_dir(tmp_path / "model", family=family)
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_rows(24, seed=5))
    bnb = {"KUBETUNE_DEBUG_BNB_ON_CPU": "1"} if method["type"] == "qlora" else {}
    liger = _run(tmp_path, model_dir, data, "liger", method, {**LIGER, **bnb})
    plain = _run(tmp_path, model_dir, data, "plain", method, bnb)

    m = liger.events_of("model")[0]
    assert m["fusedKernels"] == ["rope", "rms_norm", "swiglu"]
    assert m["lossImpl"] == "liger"
    p = plain.events_of("model")[0]
    assert p["fusedKernels"] == [] and p["lossImpl"] == "torch"  # on CPU without the knob: transformers' modules

    a, b = liger.losses(), plain.losses()
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    diff = max(abs(a[s] - b[s]) for s in a)
    print(f"\n{family} {method['type']}: loss {b[1]:.4f} -> {b[STEPS]:.4f}; Liger kernels vs transformers' "
          f"modules: max |dloss| {diff:.2e} over {STEPS} steps")
    # QLoRA's 4-bit matmuls compute in bf16: once a last-bit difference (here 1e-6 at step 4) flips a
    # bf16 rounding, it shows at bf16's resolution
    assert diff < (5e-3 if method["type"] == "qlora" else 1e-4), [abs(a[s] - b[s]) for s in sorted(a)]
    assert b[STEPS] < b[1] - 0.5  # it learned: the comparison is not between two runs that stood still
