"""Throughput of the GPU memory estimator, in-process (the operator searches configurations with it).

    ~/.cache/kubetune/devvenv/bin/python benchmarks/estimator_bench.py [--seconds 2]

Prints estimates per second for:
- hot:  the same model and plan with a varying micro batch (what max_micro_batch does): the plan-only
        part is cached per (architecture, plan without micro batch)
- cold: every estimate a new plan (method, sequence length, checkpointing, fused CE, GPUs vary), with
        the per-architecture cache cleared each time: the full computation
- mixed: a random walk over catalog models and settings with caches as they come
plus max_micro_batch solves/s and fit_advice calls/s.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator" / "src"))

from kubetune.estimator import (  # noqa: E402
    GPU_SIZE_BYTES,
    catalog,  # noqa: E402
    catalog_architecture,
    estimate,
    fit_advice,
    max_micro_batch,
    plan_from_flags,
)


def rate(fn, seconds: float, batch: int = 200) -> tuple[float, int]:
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(batch):
            fn()
        n += batch
        t = time.perf_counter()
        if t >= deadline:
            return n / (t - t0), n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args()
    rng = random.Random(0)
    arch = catalog_architecture("llama-3.1-8b")
    base = plan_from_flags(method="lora", micro_batch_size=4, seq_len=2048, gradient_checkpointing=True)

    t0 = time.perf_counter()
    for mb in range(1, 65):  # the first pass simulates the allocator at micro batches 1, 2, 4, ..., 64
        estimate(arch, base.with_(micro_batch_size=mb))
    hot_warm = time.perf_counter() - t0
    b = iter(range(1 << 62))
    hot, n_hot = rate(lambda: estimate(arch, base.with_(micro_batch_size=1 + next(b) % 64)), a.seconds)

    methods = ("full", "lora", "qlora", "freeze", "prompt-tuning", "prefix-tuning")
    plans = [
        plan_from_flags(method=m, micro_batch_size=rng.randint(1, 16),
                        seq_len=rng.choice((512, 1024, 2048, 4096, 8192)),
                        gradient_checkpointing=rng.random() < 0.5, fused_cross_entropy=rng.random() < 0.5,
                        gpus=rng.choice((1, 1, 2, 8)))
        for m in methods for _ in range(50)
    ]
    it = iter(range(1 << 62))
    from kubetune.estimator import steptrace

    # the reserved figure replays a generated step trace in the allocator simulator once per (architecture
    # dims, plan, tokens, allocator setting); the process keeps the result (steptrace._CACHE)
    def sim_one():
        arch._cache.clear()
        steptrace._CACHE.clear()
        estimate(arch, plans[next(it) % len(plans)])

    sim, n_sim = rate(sim_one, a.seconds, batch=1)
    for q in plans:  # warm the simulator cache as a running operator has it for the plans it has seen
        estimate(arch, q)

    def cold_one():
        arch._cache.clear()
        estimate(arch, plans[next(it) % len(plans)])

    cold, n_cold = rate(cold_one, a.seconds)

    names = catalog.names()
    archs = [catalog_architecture(n) for n in names]
    it2 = iter(range(1 << 62))

    def mixed_one():
        i = next(it2)
        estimate(archs[i % len(archs)], plans[(i * 7) % len(plans)].with_(micro_batch_size=1 + i % 32))

    t0 = time.perf_counter()
    for _ in range(len(archs) * 4):  # warm: each model and plan's simulation once
        mixed_one()
    warm_s = time.perf_counter() - t0
    it2 = iter(range(1 << 62))
    mixed, n_mixed = rate(mixed_one, a.seconds)
    steptrace._CACHE.clear()
    t0 = time.perf_counter()
    max_micro_batch(arch, base, 81559 << 20)
    solve_cold = time.perf_counter() - t0
    solve, n_solve = rate(lambda: max_micro_batch(arch, base, 81559 << 20), a.seconds / 2, batch=20)
    big = catalog_architecture("llama-3.1-70b")
    heavy = plan_from_flags(method="lora", micro_batch_size=8, seq_len=8192)
    t0 = time.perf_counter()
    fit_advice(big, heavy, GPU_SIZE_BYTES)
    adv_cold = time.perf_counter() - t0
    adv, n_adv = rate(lambda: fit_advice(big, heavy, GPU_SIZE_BYTES), a.seconds / 2, batch=5)

    print(f"python {sys.version.split()[0]}, {a.seconds:g} s per figure")
    print(f"estimate, hot (same plan, varying micro batch): {hot:12,.0f} /s  ({n_hot:,} calls; the first pass over "
          f"micro batches 1-64 took {hot_warm:.2f} s: 7 simulations)")
    print(f"estimate, cold (plan cache cleared every call, simulations known): {cold:10,.0f} /s  ({n_cold:,} calls)")
    print(f"estimate, mixed ({len(archs)} catalog models x {len(plans)} plans, warm): {mixed:8,.0f} /s  "
          f"({n_mixed:,} calls; warming took {warm_s:.1f} s)")
    print(f"estimate, new shape (every cache cleared: one allocator simulation): {sim:8,.1f} /s  ({n_sim:,} calls)")
    print(f"max_micro_batch (binary search, 80GB): {solve:12,.0f} /s warm; {solve_cold * 1000:.0f} ms on a new shape")
    print(f"fit_advice (Llama-3.1-70B LoRA b8 x 8192): {adv:12,.0f} /s warm; {adv_cold * 1000:.0f} ms on a new shape")
    ok = min(hot, cold) >= 10_000
    print("target >= 10,000 estimates/s for shapes seen before (hot, cold):", "met" if ok else "NOT met",
          "- the mixed walk keeps meeting new shapes")
    print(f"a shape never seen costs one simulation: {1000 / max(sim, 1e-9):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
