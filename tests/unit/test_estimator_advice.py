"""The auto micro-batch solver and fit advice."""
from __future__ import annotations

import pytest

from kubetune.estimator import (
    DEFAULT_MARGIN,
    GPU_SIZE_BYTES,
    GPU_SIZES,
    catalog_architecture,
    estimate,
    fit_advice,
    fits,
    max_micro_batch,
    plan_from_flags,
)

L8 = catalog_architecture("llama-3.1-8b")
H100 = next(g for g in GPU_SIZES if g.name == "80GB")


def test_gpu_sizes_are_reported_totals():
    assert [g.name for g in GPU_SIZES] == ["16GB", "24GB", "40GB", "48GB", "80GB", "141GB"]
    assert H100.mib == 81559 and 79.6 < H100.gib < 79.7
    assert list(GPU_SIZE_BYTES) == sorted(GPU_SIZE_BYTES)


@pytest.mark.parametrize("method,gc,fused", [("lora", True, False), ("lora", False, True), ("full", True, True),
                                             ("qlora", True, False), ("prompt-tuning", True, True)])
def test_max_micro_batch_is_the_boundary(method, gc, fused):
    p = plan_from_flags(method=method, micro_batch_size=1, seq_len=2048, gradient_checkpointing=gc,
                        fused_cross_entropy=fused)
    b = max_micro_batch(L8, p, H100.bytes)
    assert b >= 1
    budget = H100.bytes * (1 - DEFAULT_MARGIN)
    assert estimate(L8, p.with_(micro_batch_size=b)).total_bytes <= budget
    assert estimate(L8, p.with_(micro_batch_size=b + 1)).total_bytes > budget


def test_max_micro_batch_zero_when_nothing_fits():
    p = plan_from_flags(method="full", micro_batch_size=1, seq_len=2048)
    assert max_micro_batch(L8, p, 24 * 10**9) == 0
    small = catalog_architecture("Qwen/Qwen2.5-0.5B")
    assert max_micro_batch(small, plan_from_flags(method="lora", micro_batch_size=1, seq_len=128,
                                                  fused_cross_entropy=True, gradient_checkpointing=True),
                           GPU_SIZES[-1].bytes, limit=64) == 64  # capped at the limit


def test_larger_margin_smaller_batch():
    p = plan_from_flags(method="lora", micro_batch_size=1, seq_len=2048, gradient_checkpointing=True)
    assert max_micro_batch(L8, p, H100.bytes, margin=0.2) < max_micro_batch(L8, p, H100.bytes, margin=0.0)


def test_advice_when_nothing_fits_and_every_advice_fits():
    # the calibration OOM: LoRA b2 x 4096 without checkpointing on an 80 GB H100
    p = plan_from_flags(method="lora", micro_batch_size=2, seq_len=4096)
    sizes = [H100.bytes]
    assert not fits(estimate(L8, p), H100.bytes)
    adv = fit_advice(L8, p, sizes)
    assert adv
    kinds = " | ".join(a.description for a in adv)
    # four single changes fit, so no combination (where QLoRA comes in: alone, without checkpointing, the
    # 4-bit model's fp32-upcast norms and saved activations do not fit) is needed
    for want in ("gradient checkpointing", "fused cross-entropy", "micro batch 1 x 2", "GPUs with FSDP"):
        assert want in kinds, kinds
    for a in adv:
        assert fits(a.estimate, a.gpu_bytes) and a.gpu_bytes in sizes
        assert a.estimate.total_bytes == estimate(L8, a.plan).total_bytes
        # the effective batch stays the same; with more GPUs as near as the GPU count allows, and said
        eff = a.plan.micro_batch_size * a.plan.gradient_accumulation_steps * a.plan.num_processes
        assert eff == 2 or (a.plan.num_processes > 1 and f"effective batch {eff} (was 2)" in a.description)
    assert adv == sorted(adv, key=lambda a: (a.changes, a.gpu_bytes, a.estimate.total_bytes))


def test_more_gpus_keep_the_effective_batch_when_it_divides():
    p = plan_from_flags(method="lora", micro_batch_size=2, seq_len=4096, gradient_accumulation_steps=8)
    gpus = [a for a in fit_advice(L8, p, [H100.bytes]) if a.plan.num_processes > 1]
    assert gpus
    for a in gpus:
        n, ga = a.plan.num_processes, a.plan.gradient_accumulation_steps
        want = f"{n} GPUs with FSDP, {ga} accumulation step{'s' if ga > 1 else ''}: same effective batch 16"
        assert 2 * ga * n == 16 and want in a.description, a.description


def test_no_advice_when_it_fits():
    p = plan_from_flags(method="lora", micro_batch_size=1, seq_len=1024, gradient_checkpointing=True)
    assert fit_advice(L8, p, GPU_SIZE_BYTES) == []


def test_advice_combines_changes_for_big_jobs():
    big = catalog_architecture("llama-3.1-70b")
    p = plan_from_flags(method="full", micro_batch_size=4, seq_len=4096)
    adv = fit_advice(big, p, GPU_SIZE_BYTES)
    assert adv and all(a.plan.num_processes > 1 for a in adv)
    assert all(fits(a.estimate, a.gpu_bytes) for a in adv)
    assert adv[0].to_dict()["fits"] in {g.name for g in GPU_SIZES}
