"""Memory-aware placement: which GPUs can hold the job, and which nodes fit best.

Pure. The estimator is passed in as two functions so that this module only reasons about sizes:
``price(micro_batch) -> bytes per GPU`` and ``max_batch(capacity_bytes) -> micro batch``.

Rules (issue "The operator", placement):
- keep only GPUs whose memory >= estimate / 0.95 (and any product/min-memory/nodeSelector/taint
  constraints of the spec), and for bf16 only GPUs of compute capability 8.0+ (GFD's compute.major);
- choose the smallest sufficient GPU size that has free GPUs now (else the smallest whole-GPU size,
  where the pod waits); among nodes of that size, prefer the one with the fewest free GPUs that
  still fit (packs jobs, leaves whole nodes for big ones);
- express it as a required nodeAffinity ``nvidia.com/gpu.memory Gt <MiB>`` (and for bf16
  ``nvidia.com/gpu.compute.major NotIn 1..7``; kube-scheduler enforces both) plus preferred affinity for
  the best-fit nodes;
- microBatchSize auto: the largest micro batch that fits the chosen size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

from kubetune.api.base import quantity_to_float
from kubetune.api.constants import bf16_refused
from kubetune.api.v1alpha1 import FineTuneJobSpec, Toleration
from kubetune.controller.fleet import GPU_RESOURCE, FleetNode, GpuSlot, Taint
from kubetune.estimator.advice import DEFAULT_MARGIN
from kubetune.plan import auto_micro_batch_cap

MiB = 2**20
GiB = 2**30


def required_bytes(estimate: int) -> int:
    """GPU memory a job needs: the estimate may be up to 5% under the truth, so it must fit in 95% of
    the GPU (the estimator's own definition of "fits", shared by max_micro_batch and fit advice)."""
    return math.ceil(estimate / (1.0 - DEFAULT_MARGIN))


@dataclass(frozen=True)
class Placement:
    fits: bool
    reason: str  # Placed | CPUOnly | InsufficientGPUMemory | NoMatchingNodes | NotEnoughNodes
    message: str
    micro_batch_size: int | None = None
    estimate_bytes: int | None = None
    resource: str | None = None  # nvidia.com/gpu, or nvidia.com/mig-<profile> for a MIG slice
    gpu_product: str | None = None
    gpu_memory_mib: int | None = None
    min_gpu_memory_mib: int | None = None  # what the Gt affinity demands (exclusive bound + 1)
    preferred_nodes: tuple[str, ...] = ()
    candidate_nodes: tuple[str, ...] = ()
    largest_gpu_mib: int | None = None


def tolerates(tolerations: list[Toleration], taint: Taint) -> bool:
    if taint.effect == "PreferNoSchedule":
        return True
    for t in tolerations:
        if t.effect and t.effect != taint.effect:
            continue
        if t.operator == "Exists" and (not t.key or t.key == taint.key):
            return True
        if t.operator == "Equal" and t.key == taint.key and (t.value or "") == (taint.value or ""):
            return True
    return False


def eligible(node: FleetNode, spec: FineTuneJobSpec) -> bool:
    r = spec.resources
    if not node.schedulable:
        return False
    if any(node.labels.get(k) != v for k, v in r.node_selector.items()):
        return False
    return all(tolerates(r.tolerations, t) for t in node.taints)


def _slot_ok(slot: GpuSlot, spec: FineTuneJobSpec, gpus: int, single: bool) -> bool:
    r = spec.resources
    if slot.allocatable < gpus or (slot.is_mig and not single):
        return False  # MIG slices cannot be combined for one process group
    if r.gpu_product and slot.product != r.gpu_product:
        return False
    if r.min_gpu_memory and slot.memory_mib * MiB < quantity_to_float(r.min_gpu_memory):
        return False
    return bf16_refused(spec.training.precision, slot.compute) is None


class SizeOption(NamedTuple):
    """One GPU size (and resource) that holds the job, and where it could run."""

    memory_mib: int
    resource: str
    micro_batch_size: int
    estimate_bytes: int
    slots: list[tuple[FleetNode, GpuSlot]]  # the usable slots of this size
    free_nodes: list[tuple[int, str]]  # (free GPUs, node) of the nodes that have enough free now, fewest first


def place(
    spec: FineTuneJobSpec,
    fleet: list[FleetNode],
    price: Callable[[int], int],
    max_batch: Callable[[int], int],
) -> Placement:
    r, t = spec.resources, spec.training
    auto = t.micro_batch_size == "auto"
    min_mbs = 1 if auto else int(t.micro_batch_size)
    if r.gpus_per_node == 0:
        return Placement(
            True,
            "CPUOnly",
            "runs on CPU (resources.gpusPerNode is 0); no GPU placement",
            micro_batch_size=min_mbs,
            estimate_bytes=price(min_mbs),
        )

    single = r.gpus_per_node == 1 and r.nodes == 1
    all_slots = [(n, s) for n in fleet for s in n.slots]
    largest = max((s.memory_mib for _, s in all_slots if not s.is_mig), default=None)
    usable = [(n, s) for n, s in all_slots if eligible(n, spec) and _slot_ok(s, spec, r.gpus_per_node, single)]
    if not usable:
        return Placement(
            False,
            "NoMatchingNodes",
            _why_nothing_usable(spec, fleet, all_slots),
            largest_gpu_mib=largest,
            micro_batch_size=min_mbs,
            estimate_bytes=price(min_mbs),
        )
    options = size_options(spec, usable, price, max_batch)
    if options:
        return _placed(spec, usable, options, largest, _older_gpus(spec, all_slots))
    return _too_small(spec, usable, price(min_mbs), min_mbs, largest)


def size_options(
    spec: FineTuneJobSpec,
    usable: list[tuple[FleetNode, GpuSlot]],
    price: Callable[[int], int],
    max_batch: Callable[[int], int],
) -> list[SizeOption]:
    """Each usable GPU size that holds the job at its micro batch (auto: the largest that fits, up to
    the cap) and has enough nodes, smallest first."""
    r, t = spec.resources, spec.training
    auto = t.micro_batch_size == "auto"
    cap_auto = auto_micro_batch_cap(spec)
    options = []
    for size, resource in sorted({(s.memory_mib, s.resource) for _, s in usable}):
        capacity = size * MiB
        mbs = min(cap_auto, max_batch(capacity)) if auto else int(t.micro_batch_size)
        if mbs < 1:
            continue
        est = price(mbs)
        if required_bytes(est) > capacity:
            continue
        of_size = [(n, s) for n, s in usable if s.memory_mib == size and s.resource == resource]
        if len({n.name for n, _ in of_size}) < r.nodes:
            continue  # not enough nodes of this size for a multi-node job; a bigger size may have them
        free_nodes = sorted((s.free, n.name) for n, s in of_size if s.free >= r.gpus_per_node)
        options.append(SizeOption(size, resource, mbs, est, of_size, free_nodes))
    return options


def _older_gpus(spec: FineTuneJobSpec, all_slots: list[tuple[FleetNode, GpuSlot]]) -> dict[str, int]:
    """The whole-GPU products the job's precision rules out, with their memory (MiB)."""
    return {
        s.product: s.memory_mib
        for _, s in all_slots
        if not s.is_mig and bf16_refused(spec.training.precision, s.compute) is not None
    }


def _placed(
    spec: FineTuneJobSpec,
    usable: list[tuple[FleetNode, GpuSlot]],
    options: list[SizeOption],
    largest: int | None,
    older: dict[str, int],
) -> Placement:
    # The smallest size that can start now; if none can, the smallest whole-GPU size, whose
    # required affinity (Gt) still lets the scheduler use any larger GPU that frees up. A MIG
    # slice is a fixed resource request, so it is only chosen when one is free.
    r = spec.resources
    now = [o for o in options if len(o.free_nodes) >= r.nodes]
    whole = [o for o in options if o.resource == GPU_RESOURCE]
    o = (now or whole or options)[0]
    need = required_bytes(o.estimate_bytes)
    need_mib = math.ceil(need / MiB)
    if r.min_gpu_memory:
        need_mib = max(need_mib, math.ceil(quantity_to_float(r.min_gpu_memory) / MiB))
    # Best fit among nodes of that size: fewest free GPUs that still hold the job, then by name.
    preferred = tuple(name for _, name in o.free_nodes)
    candidates = tuple(sorted({n.name for n, s in usable if s.memory_mib >= need_mib and not s.is_mig}))
    slot = o.slots[0][1]
    smallest = options[0]
    msg = (
        f"needs {o.estimate_bytes / GiB:.1f} GiB per GPU ({need / GiB:.1f} GiB with the 5% margin) at micro "
        f"batch {o.micro_batch_size}; "
        f"{'smallest GPU that fits' if o[:2] == smallest[:2] else 'smallest GPU free now'}: "
        f"{slot.product} ({o.memory_mib / 1024:.1f} GiB)"
    )
    if not preferred:
        msg += f"; no {slot.product} has {r.gpus_per_node} free GPU(s) now, so the pod waits or runs on a larger GPU"
    # Say why a smaller GPU that holds the job was passed over: the user may prefer fp16 there.
    passed = sorted(p for p, mib in older.items() if need_mib <= mib < o.memory_mib)
    if passed:
        msg += (
            f"; {', '.join(passed)} would hold it but not in {spec.training.precision}: it needs compute "
            "capability 8.0+ (training.precision fp16 runs there)"
        )
    return Placement(
        True,
        "Placed",
        msg,
        micro_batch_size=o.micro_batch_size,
        estimate_bytes=o.estimate_bytes,
        resource=o.resource,
        gpu_product=slot.product,
        gpu_memory_mib=o.memory_mib,
        min_gpu_memory_mib=need_mib,
        preferred_nodes=preferred,
        candidate_nodes=candidates if o.resource == GPU_RESOURCE else preferred,
        largest_gpu_mib=largest,
    )


def _too_small(
    spec: FineTuneJobSpec, usable: list[tuple[FleetNode, GpuSlot]], need: int, mbs: int, largest: int | None
) -> Placement:
    """No usable size holds the job (``need`` bytes per GPU at micro batch ``mbs``), or not on enough nodes."""
    r = spec.resources
    biggest_usable = max(s.memory_mib for _, s in usable)
    if r.nodes > 1 and required_bytes(need) <= biggest_usable * MiB:
        return Placement(
            False,
            "NotEnoughNodes",
            f"needs {r.nodes} nodes with {r.gpus_per_node} GPU(s) of at least "
            f"{required_bytes(need) / GiB:.1f} GiB each; the cluster has fewer",
            micro_batch_size=mbs,
            estimate_bytes=need,
            largest_gpu_mib=largest,
        )
    return Placement(
        False,
        "InsufficientGPUMemory",
        f"needs {need / GiB:.1f} GiB per GPU ({required_bytes(need) / GiB:.1f} GiB with the 5% "
        f"margin) at micro batch {mbs}; the largest GPU available to this job has {biggest_usable / 1024:.1f} GiB",
        micro_batch_size=mbs,
        estimate_bytes=need,
        largest_gpu_mib=largest,
    )


def _why_nothing_usable(spec: FineTuneJobSpec, fleet: list[FleetNode], all_slots) -> str:
    r = spec.resources
    if not all_slots:
        return "the cluster has no GPU nodes (no node with nvidia.com/gpu.memory and allocatable nvidia.com/gpu)"
    parts = []
    if r.gpu_product and not any(s.product == r.gpu_product for _, s in all_slots):
        have = sorted({s.product for _, s in all_slots if not s.is_mig})
        parts.append(f"no GPU of product {r.gpu_product!r} (the cluster has: {', '.join(have)})")
    if not any(s.allocatable >= r.gpus_per_node for _, s in all_slots):
        parts.append(
            f"no node has {r.gpus_per_node} GPUs (the most on one node is {max(s.allocatable for _, s in all_slots)})"
        )
    if r.node_selector and not any(all(n.labels.get(k) == v for k, v in r.node_selector.items()) for n in fleet):
        parts.append(f"no node matches resources.nodeSelector {r.node_selector}")
    if not any(all(tolerates(r.tolerations, t) for t in n.taints) for n, _ in all_slots):
        parts.append("every GPU node has a taint the job does not tolerate (add resources.tolerations)")
    if r.min_gpu_memory:
        parts.append(f"resources.minGpuMemory {r.min_gpu_memory} may rule out the free GPUs")
    refused = {(s.product, s.compute) for _, s in all_slots if bf16_refused(spec.training.precision, s.compute)}
    if refused:
        product, compute = min(refused)
        why = bf16_refused(spec.training.precision, compute, product)
        others = sorted({p for p, _ in refused} - {product})
        parts.append(f"{why}{' (also: ' + ', '.join(others) + ')' if others else ''}")
    return "; ".join(parts) or "no schedulable GPU node matches the job's constraints"
