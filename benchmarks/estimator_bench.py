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
    catalog_architecture,
    estimate,
    fit_advice,
    max_micro_batch,
    plan_from_flags,
)
from kubetune.estimator import catalog  # noqa: E402


def rate(fn, seconds: float) -> tuple[float, int]:
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(200):
            fn()
        n += 200
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

    b = iter(range(1 << 62))
    hot, n_hot = rate(lambda: estimate(arch, base.with_(micro_batch_size=1 + next(b) % 64)), a.seconds)

    methods = ("full", "lora", "qlora", "freeze", "prompt-tuning", "prefix-tuning")
    plans = [
        plan_from_flags(method=m, micro_batch_size=rng.randint(1, 16), seq_len=rng.choice((512, 1024, 2048, 4096, 8192)),
                        gradient_checkpointing=rng.random() < 0.5, fused_cross_entropy=rng.random() < 0.5,
                        gpus=rng.choice((1, 1, 2, 8)))
        for m in methods for _ in range(50)
    ]
    it = iter(range(1 << 62))

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

    mixed, n_mixed = rate(mixed_one, a.seconds)
    solve, n_solve = rate(lambda: max_micro_batch(arch, base, 81559 << 20), a.seconds / 2)
    big = catalog_architecture("llama-3.1-70b")
    heavy = plan_from_flags(method="lora", micro_batch_size=8, seq_len=8192)
    adv, n_adv = rate(lambda: fit_advice(big, heavy, GPU_SIZE_BYTES), a.seconds / 2)

    print(f"python {sys.version.split()[0]}, {a.seconds:g} s per figure")
    print(f"estimate, hot (same plan, varying micro batch): {hot:12,.0f} /s  ({n_hot:,} calls)")
    print(f"estimate, cold (cache cleared every call):      {cold:12,.0f} /s  ({n_cold:,} calls)")
    print(f"estimate, mixed ({len(archs)} catalog models x {len(plans)} plans): {mixed:8,.0f} /s  ({n_mixed:,} calls)")
    print(f"max_micro_batch (binary search, 80GB):           {solve:12,.0f} /s")
    print(f"fit_advice (Llama-3.1-70B LoRA b8 x 8192):       {adv:12,.0f} /s")
    ok = min(hot, cold, mixed) >= 10_000
    print("target >= 10,000 estimates/s:", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
