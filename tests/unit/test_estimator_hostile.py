"""Hostile and careless architectures (issue #19): every estimate returns or raises a clear error at once."""
from __future__ import annotations

import time

import pytest

from kubetune.errors import UsageError
from kubetune.estimator import estimate, fit_advice, from_config, max_micro_batch, plan_from_flags
from kubetune.estimator.memory import INT64_MAX

BASE = {"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_experts": 128, "num_experts_per_tok": 8, "vocab_size": 151936}
ABSURD = [
    {"num_hidden_layers": 10**12},
    {"num_hidden_layers": 10**12, "decoder_sparse_step": 3, "mlp_only_layers": [0, 2, 5, 10**11]},
    {"num_hidden_layers": 10**100},
    {"vocab_size": 10**15},
    {"hidden_size": 2**40, "head_dim": None, "num_attention_heads": 1, "num_key_value_heads": 1},
    {"num_experts": 10**9, "moe_intermediate_size": 10**6},
    {"num_hidden_layers": float("inf")},
    {"num_hidden_layers": float("nan")},
    {"decoder_sparse_step": 0},
    {"mlp_only_layers": "all"},
    {"model_type": "llama", "num_experts": None, "num_hidden_layers": 10**12},
    {"model_type": "gpt2", "n_layer": 10**12, "n_embd": 4096, "n_head": 32},
    {"model_type": "bert", "num_hidden_layers": 10**12},
]


@pytest.mark.parametrize("change", ABSURD, ids=[str(i) for i in range(len(ABSURD))])
def test_absurd_dims_answer_within_a_second(change):
    cfg = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    t0 = time.perf_counter()
    try:
        arch = from_config(cfg, "spec.model.architecture")
    except UsageError as e:
        assert "spec.model.architecture" in str(e)
    else:
        plan = plan_from_flags(method="full", micro_batch_size=1, seq_len=2048)
        est = estimate(arch, plan)
        st = est.to_status()
        assert 0 <= st.per_gpu_bytes <= INT64_MAX and st.total_params <= INT64_MAX
        assert all(0 <= v <= INT64_MAX for v in st.breakdown.model_dump().values())
        max_micro_batch(arch, plan, 80 << 30)
        fit_advice(arch, plan)
    assert time.perf_counter() - t0 < 1.0


def test_sparse_layer_count_is_closed_form():
    # the count the old per-layer loop made, on small layer counts
    for L, step, only in ((48, 1, []), (24, 2, [1, 3, 4]), (10, 3, [2, 5, 8, 11, -1]), (7, 1, [0, 6, 6])):
        cfg = {**BASE, "num_hidden_layers": L, "decoder_sparse_step": step, "mlp_only_layers": only}
        arch = from_config(cfg)
        want = sum(1 for i in range(L) if i not in set(only) and (i + 1) % step == 0)
        got = sum(n for n, b in arch.blocks if b.moe)
        assert got == want and sum(n for n, _ in arch.blocks) == L


def test_huge_but_legal_plan_saturates_status():
    arch = from_config({**BASE, "model_type": "llama", "num_experts": 0, "num_hidden_layers": 4})
    est = estimate(arch, plan_from_flags(method="full", micro_batch_size=1, seq_len=2048))
    est.total_bytes = 1 << 80  # a plan whose bytes overflow int64 must still give a status the apiserver takes
    est.breakdown = {**est.breakdown, "activations": 1 << 80}
    st = est.to_status()
    assert st.per_gpu_bytes == INT64_MAX and st.breakdown.activations == INT64_MAX
