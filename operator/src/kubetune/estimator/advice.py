"""GPU sizes, the ``auto`` micro-batch solver and fit advice."""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.api import registry
from kubetune.estimator.allocator import DEFAULT as ALLOC_DEFAULT
from kubetune.estimator.arch import Architecture
from kubetune.estimator.memory import DEFAULT_MARGIN, GIB, MIB, Estimate, estimate
from kubetune.plan import TrainingPlan

MAX_MICRO_BATCH = 4096
__all__ = [
    "DEFAULT_MARGIN",
    "GPU_SIZES",
    "GPU_SIZE_BYTES",
    "Advice",
    "GpuSize",
    "fit_advice",
    "fits",
    "max_micro_batch",
]


@dataclass(frozen=True)
class GpuSize:
    """A GPU memory class. ``bytes`` is the total the driver reports (nvidia-smi / the GPU feature
    discovery label nvidia.com/gpu.memory, in MiB) for the smallest common product of the class: a
    nominal "80GB" H100 reports 81559 MiB (79.6 GiB), and kubetune's estimate includes the CUDA context,
    so the two compare directly; the margin covers estimation error."""

    name: str
    mib: int
    examples: str

    @property
    def bytes(self) -> int:
        return self.mib * MIB

    @property
    def gib(self) -> float:
        return self.mib / 1024


GPU_SIZES: tuple[GpuSize, ...] = (
    GpuSize("16GB", 15360, "RTX A4000; T4, V100-16GB in fp16 only"),
    GpuSize("24GB", 23028, "A10G, L4, RTX 4090, RTX A5000"),
    GpuSize("40GB", 40536, "A100-40GB"),
    GpuSize("48GB", 46068, "L40S, L40, RTX A6000"),
    GpuSize("80GB", 81559, "H100 80GB, A100-80GB"),
    GpuSize("141GB", 143771, "H200"),
)
GPU_SIZE_BYTES: tuple[int, ...] = tuple(g.bytes for g in GPU_SIZES)


def gpu_name(nbytes: int) -> str:
    for g in GPU_SIZES:
        if g.bytes == nbytes:
            return g.name
    return f"{nbytes / GIB:.1f}GiB"


def fits(est: Estimate, gpu_bytes: int, margin: float = DEFAULT_MARGIN) -> bool:
    return est.total_bytes <= gpu_bytes * (1.0 - margin)


def max_micro_batch(
    arch: Architecture,
    plan: TrainingPlan,
    gpu_bytes: int,
    margin: float = DEFAULT_MARGIN,
    limit: int = MAX_MICRO_BATCH,
    allocator: str = ALLOC_DEFAULT,
) -> int:
    """Largest micro batch whose estimate fits ``gpu_bytes`` with ``margin`` to spare (0: not even 1).

    Memory grows monotonically with the micro batch, so this is a binary search (~12 estimates).
    """
    budget = gpu_bytes * (1.0 - margin)
    if estimate(arch, plan.with_(micro_batch_size=1), allocator=allocator).total_bytes > budget:
        return 0
    lo, hi = 1, 2
    while hi <= limit and estimate(arch, plan.with_(micro_batch_size=hi), allocator=allocator).total_bytes <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # lo fits, hi does not (or is past the limit)
        mid = (lo + hi) // 2
        if estimate(arch, plan.with_(micro_batch_size=mid), allocator=allocator).total_bytes <= budget:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class Advice:
    """A nearby configuration that fits: what changes, the changed plan, its estimate, where it fits."""

    description: str
    plan: TrainingPlan
    estimate: Estimate
    gpu_bytes: int  # the smallest of the given GPU sizes it fits
    changes: int  # how many settings differ from the original plan

    @property
    def gpu(self) -> str:
        return gpu_name(self.gpu_bytes)

    def to_dict(self) -> dict:
        p = self.plan
        return {
            "change": self.description,
            "fits": self.gpu,
            "total_gib": round(self.estimate.total_gib, 3),
            "method": p.method,
            "reference": p.reference,
            "micro_batch_size": p.micro_batch_size,
            "gradient_accumulation_steps": p.gradient_accumulation_steps,
            "gradient_checkpointing": p.gradient_checkpointing,
            "fused_cross_entropy": p.fused_cross_entropy,
            "num_processes": p.num_processes,
            "sharding": p.sharding,
            "optimizer": p.optimizer,
        }


def _smallest_fit(est: Estimate, sizes: list[int], margin: float) -> int | None:
    for s in sizes:
        if fits(est, s, margin):
            return s
    return None


# LoRA's quantized twin (same method.lora settings, a 4-bit base): what "QLoRA instead of LoRA" switches to
_QUANTIZED_LORA = registry.method_names(settings="lora", quantized=True)[0]


def _offers_qlora(p: TrainingPlan) -> bool:
    info = registry.method(p.method)
    return info.settings == "lora" and not info.quantized


def _states_heavy(p: TrainingPlan) -> bool:
    """Whole blocks train with 32/16-bit AdamW states: 8-bit AdamW is worth offering."""
    return not registry.method(p.method).adapter and p.optimizer == "adamw"


def _qlora(p: TrainingPlan) -> TrainingPlan:
    return p.with_(method=_QUANTIZED_LORA, quant_bits=4, quant_type="nf4", double_quant=True)


def _smaller_batch(
    arch: Architecture, p: TrainingPlan, gpu: int, margin: float, allocator: str = ALLOC_DEFAULT
) -> TrainingPlan | None:
    """Largest smaller micro batch that fits ``gpu`` and divides the per-GPU batch, accumulating more
    so that micro_batch x accumulation (hence the effective batch) stays the same."""
    per_gpu = p.micro_batch_size * p.gradient_accumulation_steps
    m = min(max_micro_batch(arch, p, gpu, margin, allocator=allocator), p.micro_batch_size - 1)
    while m >= 1:
        if per_gpu % m == 0:
            return p.with_(micro_batch_size=m, gradient_accumulation_steps=per_gpu // m)
        m -= 1
    return None


def _more_gpus(
    arch: Architecture, p: TrainingPlan, sizes: list[int], margin: float, allocator: str = ALLOC_DEFAULT
) -> list[TrainingPlan]:
    """For each GPU size (largest first), the fewest GPUs with FSDP that fit it; the effective batch
    (micro batch x accumulation x GPUs) is kept as close as the new GPU count allows. At most two."""
    eff = p.micro_batch_size * p.gradient_accumulation_steps * p.num_processes
    out: list[TrainingPlan] = []
    for size in sorted(sizes, reverse=True):
        for n in (2, 4, 8, 16, 32, 64, 128):
            if n <= p.num_processes:
                continue
            ga = max(1, round(eff / (p.micro_batch_size * n)))
            q = p.with_(num_processes=n, sharding="fsdp", gradient_accumulation_steps=ga)
            if fits(estimate(arch, q, allocator=allocator), size, margin):
                if all(o.num_processes != n for o in out):
                    out.append(q)
                break
        if len(out) >= 2:
            break
    return out


def _gpus_label(plan: TrainingPlan, q: TrainingPlan) -> str:
    """More GPUs change the effective batch unless the accumulation shrinks to match: say which."""
    eff = plan.micro_batch_size * plan.gradient_accumulation_steps * plan.num_processes
    q_eff = q.micro_batch_size * q.gradient_accumulation_steps * q.num_processes
    ga = q.gradient_accumulation_steps
    if q_eff == eff:
        return (
            f"{q.num_processes} GPUs with FSDP, {ga} accumulation step{'s' if ga > 1 else ''}: "
            f"same effective batch {eff}"
        )
    return f"{q.num_processes} GPUs with FSDP: effective batch {q_eff} (was {eff})"


def fit_advice(
    arch: Architecture,
    plan: TrainingPlan,
    gpu_sizes_bytes: tuple[int, ...] | list[int] = GPU_SIZE_BYTES,
    margin: float = DEFAULT_MARGIN,
    allocator: str = ALLOC_DEFAULT,
) -> list[Advice]:
    """Nearest configurations that fit one of ``gpu_sizes_bytes`` when ``plan`` fits none of them.

    Single changes first (fused cross-entropy, gradient checkpointing, a smaller micro batch with more
    accumulation, 8-bit AdamW, QLoRA instead of LoRA, more GPUs with FSDP), then the cheap changes
    combined with the others. Each comes with its estimate and the smallest given GPU size it fits.
    Returns [] when ``plan`` already fits.
    """
    sizes = sorted(gpu_sizes_bytes)
    if not sizes or _smallest_fit(estimate(arch, plan, allocator=allocator), sizes, margin) is not None:
        return []
    found = _Found(arch, sizes, margin, allocator)
    cheap = _cheap_changes(plan)
    _single_changes(found, plan, cheap)
    if not found.out or len(found.out) < 2:
        _combined_changes(found, plan, cheap)
    found.out.sort(key=lambda a: (a.changes, a.gpu_bytes, a.estimate.total_bytes))
    return found.out


class _Found:
    """The advice found so far: each plan priced once, kept when it fits one of the sizes."""

    def __init__(self, arch: Architecture, sizes: list[int], margin: float, allocator: str) -> None:
        self.arch, self.sizes, self.margin, self.allocator = arch, sizes, margin, allocator
        self.out: list[Advice] = []
        self.seen: set[tuple] = set()

    def add(self, desc: str, q: TrainingPlan | None, changes: int) -> None:
        if q is None:
            return
        key = (
            q.method,
            q.micro_batch_size,
            q.gradient_accumulation_steps,
            q.gradient_checkpointing,
            q.fused_cross_entropy,
            q.num_processes,
            q.sharding,
            q.optimizer,
            q.reference,
        )
        if key in self.seen:
            return
        e = estimate(self.arch, q, allocator=self.allocator)
        s = _smallest_fit(e, self.sizes, self.margin)
        if s is not None:
            self.seen.add(key)
            self.out.append(Advice(desc, q, e, s, changes))

    def smaller_batch(self, plan: TrainingPlan) -> TrainingPlan | None:
        return _smaller_batch(self.arch, plan, self.sizes[-1], self.margin, self.allocator)

    def more_gpus(self, plan: TrainingPlan) -> list[TrainingPlan]:
        return _more_gpus(self.arch, plan, self.sizes, self.margin, self.allocator)


def _cheap_changes(plan: TrainingPlan) -> list[tuple[str, TrainingPlan]]:
    cheap: list[tuple[str, TrainingPlan]] = []
    if not plan.fused_cross_entropy:
        cheap.append(("fused cross-entropy on", plan.with_(fused_cross_entropy=True)))
    if not plan.gradient_checkpointing:
        cheap.append(("gradient checkpointing on", plan.with_(gradient_checkpointing=True)))
    return cheap


def _single_changes(found: _Found, plan: TrainingPlan, cheap: list[tuple[str, TrainingPlan]]) -> None:
    for d, q in cheap:
        found.add(d, q, 1)
    smaller = found.smaller_batch(plan)
    if smaller is not None:
        found.add(
            f"micro batch {smaller.micro_batch_size} x {smaller.gradient_accumulation_steps} accumulation steps "
            f"(was {plan.micro_batch_size} x {plan.gradient_accumulation_steps}; same effective batch)",
            smaller,
            1,
        )
    if _states_heavy(plan):
        found.add("8-bit AdamW (bitsandbytes)", plan.with_(optimizer="adamw-8bit"), 1)
    if _offers_qlora(plan):
        found.add("QLoRA (4-bit NF4 base) instead of LoRA", _qlora(plan), 1)
    if plan.reference == "copy":  # no second model in GPU memory: log-probs from one pass before training
        found.add("objective.reference precomputed instead of copy", plan.with_(reference="precomputed"), 1)
    for more in found.more_gpus(plan):
        found.add(_gpus_label(plan, more), more, 1)


def _combined_changes(found: _Found, plan: TrainingPlan, cheap: list[tuple[str, TrainingPlan]]) -> None:
    """All cheap changes, then each bigger change on top of them."""
    both = plan.with_(fused_cross_entropy=True, gradient_checkpointing=True)
    n0 = len(cheap)
    label = " + ".join(d for d, _ in cheap)
    if n0 >= 2:
        found.add(label, both, n0)
    prefix = (label + " + ") if n0 else ""
    q = found.smaller_batch(both)
    if q is not None:
        found.add(
            f"{prefix}micro batch {q.micro_batch_size} x {q.gradient_accumulation_steps} accumulation steps", q, n0 + 1
        )
    if _offers_qlora(plan):
        found.add(f"{prefix}QLoRA instead of LoRA", _qlora(both), n0 + 1)
        qb = found.smaller_batch(_qlora(both))
        if qb is not None:
            found.add(
                f"{prefix}QLoRA + micro batch {qb.micro_batch_size} x {qb.gradient_accumulation_steps}", qb, n0 + 2
            )
    if _states_heavy(plan):
        found.add(f"{prefix}8-bit AdamW", both.with_(optimizer="adamw-8bit"), n0 + 1)
    for q in found.more_gpus(both):
        found.add(prefix + _gpus_label(plan, q), q, n0 + 1)
    q1 = both.with_(
        micro_batch_size=1, gradient_accumulation_steps=plan.micro_batch_size * plan.gradient_accumulation_steps
    )
    for q in found.more_gpus(q1):
        found.add(f"{prefix}micro batch 1 + " + _gpus_label(plan, q), q, n0 + 2)
