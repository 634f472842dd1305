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


# Every type the estimator discounts, built tiny and patched by the trainer's own apply_fused_kernels:
# the loss and every gradient before and after the swap (the rotary patch is module-wide, so the
# reference runs first). Gemma 3 as its text model (the multimodal wrapper needs a vision tower).
PATCH_CHECK = r"""
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
from liger_kernel.transformers.rms_norm import LigerRMSNorm
from kubetune_trainer.model import apply_fused_kernels

out = {}
for t in sys.argv[1:]:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(t, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, vocab_size=256, moe_intermediate_size=32,
                               num_local_experts=4, num_experts=4, num_experts_per_tok=2,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    m = AutoModelForCausalLM.from_config(cfg)  # SDPA where the model has it (not Gemma 2)
    x = torch.randint(0, 256, (2, 24))

    def run():
        m.zero_grad()
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    l0, g0 = run()
    kernels = apply_fused_kernels(m)
    l1, g1 = run()
    norm = m.get_decoder().layers[0].post_attention_layernorm  # every one of these has it (Olmo 2 has no input norm)
    out[t] = {"kernels": kernels, "dloss": abs(l0 - l1), "grads": len(g0),
              "dgrad": max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in zip(g0, g1)),
              "liger_norm": getattr(norm.forward, "__func__", None) is LigerRMSNorm.forward,
              "mlp": m.get_decoder().layers[0].mlp._get_name()}
print("RESULT " + json.dumps(out))
"""


def test_every_model_type_the_estimator_discounts_trains_the_same_under_liger(tmp_path):
    import json
    import subprocess
    import sys

    from kubetune.plan import LIGER_MODEL_TYPES

    # Mixtral's and Qwen3-MoE's experts go through Liger's autotuned fused-MoE kernel, and autotuning
    # times kernels on a GPU: the interpreter cannot run it
    types = sorted(LIGER_MODEL_TYPES - {"gemma3", "mixtral", "qwen3_moe"})
    p = subprocess.run([sys.executable, "-c", PATCH_CHECK, *types], capture_output=True, text=True, timeout=900,
                       env={**os.environ, **LIGER})
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    got = json.loads(line[-1][7:])
    for t in types:
        r = got[t]
        print(f"{t:12s} {','.join(r['kernels']):28s} {r['mlp']:24s} dloss {r['dloss']:.1e} max rel dgrad {r['dgrad']:.1e}")
        assert r["liger_norm"] and "rms_norm" in r["kernels"], (t, r)
        assert ("geglu" if t.startswith("gemma") else "swiglu") in r["kernels"], (t, r)
        assert r["grads"] > 10 and r["dloss"] < 1e-5 and r["dgrad"] < 1e-4, (t, r)
