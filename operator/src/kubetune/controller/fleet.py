"""The GPU fleet as the operator sees it, read from Node and Pod objects (plain dicts from the API).

Pure: the kube module lists nodes and pods; this turns them into what placement needs. GPU sizes
come from NVIDIA GPU Feature Discovery labels; free GPUs are allocatable minus what non-terminated
pods bound to the node request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

GPU_RESOURCE = "nvidia.com/gpu"
MIG_RESOURCE = re.compile(r"^nvidia\.com/mig-(\d+g\.\d+gb)$")
LABEL_MEMORY = "nvidia.com/gpu.memory"
LABEL_PRODUCT = "nvidia.com/gpu.product"
LABEL_COUNT = "nvidia.com/gpu.count"
LABEL_COMPUTE_MAJOR = "nvidia.com/gpu.compute.major"
LABEL_COMPUTE_MINOR = "nvidia.com/gpu.compute.minor"
_VERSION_PART = re.compile(r"[0-9]{1,3}")


@dataclass(frozen=True)
class GpuSlot:
    """One kind of GPU (or MIG slice) a node offers."""

    resource: str  # nvidia.com/gpu or nvidia.com/mig-<profile>
    product: str
    memory_mib: int
    allocatable: int
    free: int
    compute: tuple[int, int] | None = None  # GFD's compute capability; None when the node has no such label

    @property
    def is_mig(self) -> bool:
        return self.resource != GPU_RESOURCE


@dataclass(frozen=True)
class Taint:
    key: str
    value: str | None
    effect: str


@dataclass(frozen=True)
class FleetNode:
    name: str
    labels: dict[str, str]
    taints: tuple[Taint, ...] = ()
    schedulable: bool = True
    slots: tuple[GpuSlot, ...] = field(default=())

    @property
    def has_gpus(self) -> bool:
        return any(s.allocatable > 0 for s in self.slots)


def _int(q: Any) -> int:
    try:
        return int(str(q))
    except (TypeError, ValueError):
        return 0


def _mig_memory(labels: dict[str, str], profile: str) -> int:
    # GFD publishes each MIG profile's memory; fall back to the profile name (10gb) conservatively.
    explicit = _int(labels.get(f"nvidia.com/mig-{profile}.memory"))
    if explicit:
        return explicit
    gb = int(profile.split(".")[1].removesuffix("gb"))
    return gb * 950


def _requested(pods: Iterable[dict]) -> dict[str, dict[str, int]]:
    """GPU-like resources requested per node by pods that still hold them."""
    used: dict[str, dict[str, int]] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        phase = (pod.get("status") or {}).get("phase")
        if not node or phase in ("Succeeded", "Failed"):
            continue
        per = used.setdefault(node, {})
        for c in (pod.get("spec") or {}).get("containers") or []:
            res = c.get("resources") or {}
            # Extended resources must have requests == limits; either may be written.
            req = {**(res.get("limits") or {}), **(res.get("requests") or {})}
            for name, q in req.items():
                if name == GPU_RESOURCE or MIG_RESOURCE.match(name):
                    per[name] = per.get(name, 0) + _int(q)
    return used


def expected_pods(job: dict, nodes: list[str]) -> list[dict]:
    """The pods a just-created Job will run, bound to the nodes its placement prefers, in the shape
    read_fleet counts. Until a fresh listing shows the real pods, these keep a burst of new jobs from
    all picking the same free GPU. A suspended Job runs nothing."""
    spec = job.get("spec") or {}
    if spec.get("suspend"):
        return []
    containers = [
        {"resources": c.get("resources") or {}}
        for c in ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
    ]
    return [
        {"spec": {"nodeName": n, "containers": containers}, "status": {"phase": "Pending"}}
        for n in nodes[: max(1, int(spec.get("parallelism") or 1))]
    ]


def whole_gpus(fleet: Iterable[FleetNode]) -> list[GpuSlot]:
    """Every whole-GPU slot of the fleet (MIG slices left out)."""
    return [s for n in fleet for s in n.slots if not s.is_mig]


def _compute(labels: dict[str, str]) -> tuple[int, int] | None:
    major, minor = labels.get(LABEL_COMPUTE_MAJOR, ""), labels.get(LABEL_COMPUTE_MINOR, "0")
    ok = _VERSION_PART.fullmatch(major) and _VERSION_PART.fullmatch(minor)
    return (int(major), int(minor)) if ok else None


def read_fleet(nodes: Iterable[dict], pods: Iterable[dict]) -> list[FleetNode]:
    used = _requested(pods)
    fleet = []
    for n in nodes:
        meta, spec, status = n.get("metadata") or {}, n.get("spec") or {}, n.get("status") or {}
        name = meta.get("name", "")
        labels = dict(meta.get("labels") or {})
        alloc = status.get("allocatable") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        # A node that has never reported conditions (just registered) is not ready.
        schedulable = ready and not spec.get("unschedulable", False)
        taints = tuple(Taint(t.get("key", ""), t.get("value"), t.get("effect", "")) for t in spec.get("taints") or [])
        slots = []
        product = labels.get(LABEL_PRODUCT, "unknown")
        mem = _int(labels.get(LABEL_MEMORY))
        compute = _compute(labels)
        for res, q in alloc.items():
            total = _int(q)
            if total <= 0:
                continue
            free = max(0, total - used.get(name, {}).get(res, 0))
            if res == GPU_RESOURCE and mem > 0:
                slots.append(GpuSlot(res, product, mem, total, free, compute))
            elif m := MIG_RESOURCE.match(res):
                profile = m.group(1)
                mib = _mig_memory(labels, profile)
                slots.append(GpuSlot(res, f"{product}-MIG-{profile}", mib, total, free, compute))
        fleet.append(FleetNode(name, labels, taints, schedulable, tuple(sorted(slots, key=lambda s: s.memory_mib))))
    return fleet
