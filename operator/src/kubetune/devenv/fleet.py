"""The fake GPU fleet: KWOK nodes labelled the way NVIDIA GPU Feature Discovery labels real ones.

Labels follow GFD (github.com/NVIDIA/k8s-device-plugin, gpu-feature-discovery): `nvidia.com/gpu.memory` is
the per-GPU memory in MiB as NVML reports it, `gpu.product` the product name with spaces as dashes, and
with `mig.strategy=mixed` each MIG profile is its own extended resource (`nvidia.com/mig-1g.10gb`) with
`nvidia.com/mig-<profile>.*` labels. That lets the scheduler itself enforce "enough VRAM per GPU" through a
nodeAffinity `Gt` on `nvidia.com/gpu.memory`, exactly as on a real cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
FLEET_LABEL = "kubetune.io/dev-fleet"  # marks nodes this module created, so they can be listed or removed


@dataclass(frozen=True)
class Gpu:
    product: str  # GFD's gpu.product
    memory_mib: int  # GFD's gpu.memory (per GPU)
    family: str
    compute: tuple[int, int]


T4 = Gpu("Tesla-T4", 15360, "turing", (7, 5))
L4 = Gpu("NVIDIA-L4", 23034, "ada-lovelace", (8, 9))
A100_40 = Gpu("NVIDIA-A100-SXM4-40GB", 40960, "ampere", (8, 0))
A100_80 = Gpu("NVIDIA-A100-SXM4-80GB", 81920, "ampere", (8, 0))
H100_80 = Gpu("NVIDIA-H100-80GB-HBM3", 81559, "hopper", (9, 0))


@dataclass(frozen=True)
class MigProfile:
    name: str  # e.g. "1g.10gb"
    count: int  # slices of this profile on the node
    memory_mib: int
    multiprocessors: int
    slices: int  # GPU/compute instance slices


@dataclass(frozen=True)
class NodeSpec:
    name: str
    instance_type: str
    cpu: str
    memory: str
    gpu: Gpu | None = None
    gpu_count: int = 0
    mig: tuple[MigProfile, ...] = field(default=())


FLEET: tuple[NodeSpec, ...] = (
    NodeSpec("kwok-cpu-0", "cpu-16x64", "16", "64Gi"),
    NodeSpec("kwok-cpu-1", "cpu-16x64", "16", "64Gi"),
    NodeSpec("kwok-t4-0", "g4dn.12xlarge", "48", "192Gi", T4, 4),
    NodeSpec("kwok-l4-0", "g6.12xlarge", "48", "192Gi", L4, 4),
    NodeSpec("kwok-a100-40gb-0", "p4d.24xlarge", "96", "1152Gi", A100_40, 8),
    NodeSpec("kwok-a100-80gb-0", "p4de.24xlarge", "96", "1152Gi", A100_80, 8),
    NodeSpec("kwok-h100-0", "p5.48xlarge", "192", "2048Gi", H100_80, 8),
    # Two A100 80GB split with the mixed strategy: GPU 0 as 7 x 1g.10gb, GPU 1 as 2 x 3g.40gb. No whole GPU
    # is left, so `nvidia.com/gpu` is 0 here and only MIG requests land on it.
    NodeSpec(
        "kwok-a100-mig-0",
        "a100-80gb-mig",
        "32",
        "256Gi",
        A100_80,
        2,
        (
            MigProfile("1g.10gb", 7, 9728, 14, 1),
            MigProfile("3g.40gb", 2, 40192, 42, 3),
        ),
    ),
)


def gfd_labels(spec: NodeSpec) -> dict[str, str]:
    """The GPU Feature Discovery labels a real node of this kind carries (none for a CPU node)."""
    if spec.gpu is None:
        return {}
    g = spec.gpu
    labels = {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": g.product,
        "nvidia.com/gpu.memory": str(g.memory_mib),
        "nvidia.com/gpu.count": str(spec.gpu_count),
        "nvidia.com/gpu.family": g.family,
        "nvidia.com/gpu.compute.major": str(g.compute[0]),
        "nvidia.com/gpu.compute.minor": str(g.compute[1]),
        "nvidia.com/gpu.replicas": "1",
        "nvidia.com/gpu.sharing-strategy": "none",
        "nvidia.com/mig.capable": str(g.product.startswith(("NVIDIA-A100", "NVIDIA-H100"))).lower(),
        "nvidia.com/mig.strategy": "mixed" if spec.mig else "single",
    }
    for p in spec.mig:
        prefix = f"nvidia.com/mig-{p.name}"
        labels |= {
            f"{prefix}.count": str(p.count),
            f"{prefix}.memory": str(p.memory_mib),
            f"{prefix}.multiprocessors": str(p.multiprocessors),
            f"{prefix}.product": f"{g.product}-MIG-{p.name}",
            f"{prefix}.slices.gi": str(p.slices),
            f"{prefix}.slices.ci": str(p.slices),
            f"{prefix}.replicas": "1",
        }
    return labels


def resources(spec: NodeSpec) -> dict[str, str]:
    """capacity == allocatable: no kubelet reserves anything on a fake node."""
    res = {"cpu": spec.cpu, "memory": spec.memory, "pods": "110", "ephemeral-storage": "1Ti"}
    if spec.gpu is not None:
        res["nvidia.com/gpu"] = "0" if spec.mig else str(spec.gpu_count)
    for p in spec.mig:
        res[f"nvidia.com/mig-{p.name}"] = str(p.count)
    return res


def node_manifest(spec: NodeSpec) -> dict:
    labels = {
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": spec.instance_type,
        "type": "kwok",
        FLEET_LABEL: "true",
    } | gfd_labels(spec)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        # The annotation is what `kwok --manage-nodes-with-annotation-selector` picks up: nodes without it
        # (the real kubelet nodes) are left alone.
        "metadata": {"name": spec.name, "labels": labels, "annotations": {KWOK_ANNOTATION: "fake"}},
        "spec": {},
        "status": {"capacity": resources(spec), "allocatable": resources(spec)},
    }


def manifests(fleet: tuple[NodeSpec, ...] = FLEET) -> list[dict]:
    return [node_manifest(s) for s in fleet]
