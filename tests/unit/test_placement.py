"""Placement on a mixed fleet: smallest sufficient GPU, best-fit node, MIG, constraints, auto batch."""
from __future__ import annotations

import copy

import pytest

from kubetune.api.v1alpha1 import Toleration
from kubetune.api.validation import parse_spec
from kubetune.controller.fleet import Taint, expected_pods, read_fleet
from kubetune.controller.placement import GiB, MiB, place, required_bytes, tolerates
from kubetune.devenv.fleet import manifests

SPEC = {
    "model": {"uri": "hf://meta-llama/Llama-3.1-8B"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "method": {"type": "lora"},
    "training": {"maxSteps": 10, "microBatchSize": 4},
    "checkpoints": {"uri": "s3://ckpt/x/"},
}


def spec(**over):
    s = copy.deepcopy(SPEC)
    for k, v in over.items():
        s.setdefault(k, {}).update(v)
    return parse_spec(s)


def ready(nodes):
    out = []
    for n in nodes:
        n = copy.deepcopy(n)
        n["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        out.append(n)
    return out


FLEET_NODES = ready(manifests())


def gpu_pod(node, n=1, resource="nvidia.com/gpu", phase="Running"):
    return {"spec": {"nodeName": node, "containers": [{"resources": {"limits": {resource: str(n)}}}]},
            "status": {"phase": phase}}


def linear(base_gib, per_batch_gib):
    return lambda mbs: int((base_gib + per_batch_gib * mbs) * GiB)


def max_batch_for(base_gib, per_batch_gib):
    def mb(capacity):
        b = 0
        while b < 4096 and required_bytes(linear(base_gib, per_batch_gib)(b + 1)) <= capacity:
            b += 1
        return b
    return mb


def test_read_fleet_free_gpus_and_mig():
    pods = [gpu_pod("kwok-h100-0", 3), gpu_pod("kwok-h100-0", 2, phase="Succeeded"),
            gpu_pod("kwok-a100-mig-0", 2, "nvidia.com/mig-1g.10gb")]
    fleet = {n.name: n for n in read_fleet(FLEET_NODES, pods)}
    h100 = fleet["kwok-h100-0"].slots[0]
    assert (h100.product, h100.memory_mib, h100.allocatable, h100.free) == ("NVIDIA-H100-80GB-HBM3", 81559, 8, 5)
    mig = {s.resource: s for s in fleet["kwok-a100-mig-0"].slots}
    assert set(mig) == {"nvidia.com/mig-1g.10gb", "nvidia.com/mig-3g.40gb"}
    assert mig["nvidia.com/mig-1g.10gb"].free == 5 and mig["nvidia.com/mig-1g.10gb"].memory_mib == 9728
    assert not fleet["kwok-cpu-0"].has_gpus


def test_unready_nodes_are_not_used():
    nodes = [n for n in manifests()]  # no Ready condition
    p = place(spec(), read_fleet(nodes, []), linear(10, 1), max_batch_for(10, 1))
    assert not p.fits and p.reason == "NoMatchingNodes"


T4, L4, A100_40, H100 = "Tesla-T4", "NVIDIA-L4", "NVIDIA-A100-SXM4-40GB", "NVIDIA-H100-80GB-HBM3"


@pytest.mark.parametrize(
    "need_gib, fp16_product, bf16_product",
    [(7.0, T4, L4), (12.0, T4, L4), (20.0, L4, L4), (30.0, A100_40, A100_40), (60.0, H100, H100)],
)
def test_smallest_sufficient_size(need_gib, fp16_product, bf16_product):
    """The smallest GPU that holds the job; in bf16 (the default) only of compute capability 8.0+, so not
    the T4 (7.5). Multi-GPU, so MIG slices (single-GPU only) are out of the picture."""
    fleet = read_fleet(FLEET_NODES, [])
    # H100 (81559 MiB) is smaller than A100-80GB (81920 MiB): best fit picks it for the 60 GiB job
    expected = {T4: 15360, L4: 23034, A100_40: 40960, H100: 81559}
    for precision, product in (("fp16", fp16_product), ("bf16", bf16_product)):
        s = spec(resources={"gpusPerNode": 2}, training={"precision": precision})
        p = place(s, fleet, lambda mbs: int(need_gib * GiB), lambda cap: 4)
        assert p.fits and p.reason == "Placed"
        assert (p.gpu_product, p.gpu_memory_mib) == (product, expected[product]), precision
        assert p.min_gpu_memory_mib * MiB >= required_bytes(int(need_gib * GiB))
        assert p.min_gpu_memory_mib <= p.gpu_memory_mib
        passed_over = "Tesla-T4 would hold it but not in bf16: it needs compute capability 8.0+"
        assert (passed_over in p.message) == (product != fp16_product), p.message


def test_bf16_keeps_off_gpus_older_than_ampere_and_says_so():
    fleet = read_fleet(FLEET_NODES, [])
    t4 = next(s for n in fleet for s in n.slots if s.product == T4)
    assert t4.compute == (7, 5)
    pinned = spec(resources={"gpusPerNode": 1, "gpuProduct": T4})
    p = place(pinned, fleet, lambda m: 4 * GiB, lambda c: 4)
    assert not p.fits and p.reason == "NoMatchingNodes"
    assert ("training.precision bf16 needs a GPU of compute capability 8.0 or newer (Ampere, Ada, Hopper, "
            "Blackwell); Tesla-T4 is 7.5: set training.precision to fp16 (or fp32) to train there") in p.message
    for precision in ("fp16", "fp32"):
        p = place(spec(resources={"gpusPerNode": 1, "gpuProduct": T4}, training={"precision": precision}), fleet,
                  lambda m: 4 * GiB, lambda c: 4)
        assert p.fits and p.gpu_product == T4
    mixed = spec(resources={"gpusPerNode": 1, "gpuProduct": T4}, training={"precision": "bf16-mixed"})
    assert place(mixed, fleet, lambda m: 4 * GiB, lambda c: 4).reason == "NoMatchingNodes"


def test_a_gpu_without_a_compute_capability_label_is_not_turned_away():
    """A node labelled by hand (memory and product, no GFD compute labels) may take a bf16 job: the
    required affinity (NotIn 1..7) matches it too, so placement and the scheduler agree."""
    nodes = copy.deepcopy([n for n in FLEET_NODES if n["metadata"]["name"] == "kwok-t4-0"])
    for label in ("nvidia.com/gpu.compute.major", "nvidia.com/gpu.compute.minor"):
        del nodes[0]["metadata"]["labels"][label]
    (t4,) = read_fleet(nodes, [])[0].slots
    assert t4.compute is None
    assert place(spec(resources={"gpusPerNode": 1}), read_fleet(nodes, []), lambda m: 4 * GiB, lambda c: 4).fits


@pytest.mark.parametrize("major, minor", [("8a", "0"), ("", "0"), ("9" * 60, "0"), ("8", "x"), ("٨", "0")])
def test_a_malformed_compute_capability_label_reads_as_unknown(major, minor):
    nodes = copy.deepcopy([n for n in FLEET_NODES if n["metadata"]["name"] == "kwok-t4-0"])
    nodes[0]["metadata"]["labels"] |= {"nvidia.com/gpu.compute.major": major, "nvidia.com/gpu.compute.minor": minor}
    assert read_fleet(nodes, [])[0].slots[0].compute is None


def test_single_gpu_small_job_takes_a_mig_slice():
    p = place(spec(), read_fleet(FLEET_NODES, []), lambda mbs: int(7 * GiB), lambda cap: 4)
    assert p.fits and p.resource == "nvidia.com/mig-1g.10gb" and p.preferred_nodes == ("kwok-a100-mig-0",)


def test_best_fit_prefers_fewest_free_gpus_that_still_fit():
    more = copy.deepcopy([n for n in FLEET_NODES if n["metadata"]["name"] == "kwok-l4-0"][0])
    more["metadata"]["name"] = "kwok-l4-1"
    pods = [gpu_pod("kwok-l4-0", 3)]  # l4-0 has 1 free, l4-1 has 4 free
    fleet = read_fleet(FLEET_NODES + [more], pods)
    p = place(spec(resources={"gpusPerNode": 1, "gpuProduct": "NVIDIA-L4"}), fleet, lambda m: int(18 * GiB),
              lambda c: 4)
    assert p.preferred_nodes == ("kwok-l4-0", "kwok-l4-1")
    p2 = place(spec(resources={"gpusPerNode": 2, "gpuProduct": "NVIDIA-L4"}), fleet, lambda m: int(18 * GiB),
               lambda c: 4)
    assert p2.preferred_nodes == ("kwok-l4-1",)  # l4-0 has only 1 free


def test_busy_smallest_size_moves_to_the_smallest_size_free_now():
    pods = [gpu_pod("kwok-l4-0", 4)]
    p = place(spec(resources={"gpusPerNode": 2}), read_fleet(FLEET_NODES, pods), lambda m: int(18 * GiB), lambda c: 4)
    assert p.fits and p.gpu_product == "NVIDIA-A100-SXM4-40GB" and p.preferred_nodes == ("kwok-a100-40gb-0",)
    assert "smallest GPU free now" in p.message
    # the required affinity still admits every GPU that holds the job, the busy L4 included
    assert p.min_gpu_memory_mib <= 23034
    assert {"kwok-a100-40gb-0", "kwok-h100-0", "kwok-a100-80gb-0", "kwok-l4-0"} <= set(p.candidate_nodes)


def test_too_big_is_insufficient_memory():
    p = place(spec(), read_fleet(FLEET_NODES, []), lambda m: int(500 * GiB), lambda c: 0)
    assert not p.fits and p.reason == "InsufficientGPUMemory"
    assert "needs 500.0 GiB per GPU (526.3 GiB with the 5% margin)" in p.message
    assert "the largest GPU available to this job has 80.0 GiB" in p.message
    assert p.largest_gpu_mib == 81920


def test_auto_batch_takes_largest_that_fits_the_chosen_size():
    s = spec(training={"microBatchSize": "auto", "maxSteps": 10, "precision": "fp16"}, resources={"gpusPerNode": 2})
    p = place(s, read_fleet(FLEET_NODES, []), linear(6, 2), max_batch_for(6, 2))
    # T4 (15 GiB) holds 6+2b within 95%: b=3 -> 12 GiB / 0.95 = 12.6 <= 15; b=4 -> 14 / 0.95 = 14.7 <= 15
    assert p.gpu_product == "Tesla-T4" and p.micro_batch_size == 4
    p2 = place(s.model_copy(update={"training": s.training.model_copy(update={"effective_batch_size": 4})}),
               read_fleet(FLEET_NODES, []), linear(6, 2), max_batch_for(6, 2))
    assert p2.micro_batch_size == 2  # capped at effective batch / GPUs


def test_constraints_product_min_memory_selector_taints():
    fleet = read_fleet(FLEET_NODES, [])
    p = place(spec(resources={"gpuProduct": "NVIDIA-H100-80GB-HBM3"}), fleet, lambda m: int(5 * GiB), lambda c: 1)
    assert p.gpu_product == "NVIDIA-H100-80GB-HBM3" and p.preferred_nodes == ("kwok-h100-0",)
    p = place(spec(resources={"minGpuMemory": "40Gi", "gpusPerNode": 2}), fleet, lambda m: int(5 * GiB), lambda c: 1)
    assert p.gpu_memory_mib == 40960 and p.min_gpu_memory_mib == 40960  # A100-40GB is 40960 MiB: 40Gi exactly fits
    p = place(spec(resources={"minGpuMemory": "41Gi", "gpusPerNode": 2}), fleet, lambda m: int(5 * GiB), lambda c: 1)
    assert p.gpu_memory_mib == 81559
    p = place(spec(resources={"gpuProduct": "NVIDIA-B200"}), fleet, lambda m: int(5 * GiB), lambda c: 1)
    assert p.reason == "NoMatchingNodes" and "no GPU of product 'NVIDIA-B200'" in p.message
    p = place(spec(resources={"gpusPerNode": 16}), fleet, lambda m: int(5 * GiB), lambda c: 1)
    assert p.reason == "NoMatchingNodes" and "no node has 16 GPUs (the most on one node is 8)" in p.message
    tainted = copy.deepcopy(FLEET_NODES)
    for n in tainted:
        n["spec"]["taints"] = [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]
    p = place(spec(), read_fleet(tainted, []), lambda m: int(5 * GiB), lambda c: 1)
    assert p.reason == "NoMatchingNodes" and "taint" in p.message
    p = place(spec(resources={"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}),
              read_fleet(tainted, []), lambda m: int(5 * GiB), lambda c: 1)
    assert p.fits


def test_multi_node_needs_enough_nodes():
    fleet = read_fleet(FLEET_NODES, [])
    s = spec(resources={"nodes": 2, "gpusPerNode": 8})
    p = place(s, fleet, lambda m: int(30 * GiB), lambda c: 1)
    # two 8-GPU nodes with >= 31.5 GiB: A100-40GB has only one node, so 80 GB size (H100 + A100-80 are 2 sizes
    # of one node each) -> none has 2 nodes of one size
    assert not p.fits and p.reason == "NotEnoughNodes"


def test_cpu_job():
    p = place(spec(resources={"gpusPerNode": 0}), read_fleet(FLEET_NODES, []), lambda m: 123, lambda c: 1)
    assert p.fits and p.reason == "CPUOnly" and p.resource is None and p.estimate_bytes == 123


@pytest.mark.parametrize("tol, taint, ok", [
    ({"key": "a", "operator": "Equal", "value": "x", "effect": "NoSchedule"}, Taint("a", "x", "NoSchedule"), True),
    ({"key": "a", "operator": "Equal", "value": "y"}, Taint("a", "x", "NoSchedule"), False),
    ({"operator": "Exists"}, Taint("anything", None, "NoExecute"), True),
    ({"key": "a", "operator": "Exists", "effect": "NoExecute"}, Taint("a", None, "NoSchedule"), False),
    ({"key": "b", "operator": "Exists"}, Taint("a", None, "PreferNoSchedule"), True),
])
def test_tolerations(tol, taint, ok):
    assert tolerates([Toleration.model_validate(tol)], taint) is ok


def test_busy_mig_slices_fall_back_to_the_smallest_free_whole_gpu():
    busy = [gpu_pod("kwok-a100-mig-0", 2, "nvidia.com/mig-3g.40gb"),
            gpu_pod("kwok-a100-mig-0", 7, "nvidia.com/mig-1g.10gb")]
    p = place(spec(), read_fleet(FLEET_NODES, busy), lambda m: int(30 * GiB), lambda c: 4)
    assert p.resource == "nvidia.com/gpu" and p.gpu_product == "NVIDIA-A100-SXM4-40GB"
    assert "smallest GPU free now" in p.message
    free = place(spec(), read_fleet(FLEET_NODES, []), lambda m: int(30 * GiB), lambda c: 4)
    assert free.resource == "nvidia.com/mig-3g.40gb" and "smallest GPU that fits" in free.message


def test_nothing_free_waits_on_the_smallest_whole_gpu_size():
    busy = [gpu_pod(n, 8) for n in ("kwok-a100-40gb-0", "kwok-a100-80gb-0", "kwok-h100-0")]
    busy += [gpu_pod(n, 4) for n in ("kwok-t4-0", "kwok-l4-0")]
    busy += [gpu_pod("kwok-a100-mig-0", 2, "nvidia.com/mig-3g.40gb")]
    p = place(spec(), read_fleet(FLEET_NODES, busy), lambda m: int(20 * GiB), lambda c: 4)
    assert p.fits and p.resource == "nvidia.com/gpu" and p.gpu_product == "NVIDIA-L4"
    assert p.preferred_nodes == () and "waits or runs on a larger GPU" in p.message


def _job(gpus: int, parallelism: int = 1, suspend: bool = False, resource: str = "nvidia.com/gpu") -> dict:
    return {"kind": "Job", "spec": {"suspend": suspend, "parallelism": parallelism, "template": {"spec": {
        "containers": [{"name": "trainer", "resources": {"limits": {resource: str(gpus), "cpu": "2"}}}]}}}}


def test_expected_pods_of_new_jobs_spread_a_burst():
    # Four L4 jobs placed back to back on one cached fleet listing: each counts the GPUs the ones
    # before it claimed, so they do not all prefer the same L4; the fifth moves to the next size.
    pods: list[dict] = []
    chosen = []
    for _ in range(5):
        p = place(spec(resources={"gpusPerNode": 1}), read_fleet(FLEET_NODES, pods), lambda m: int(18 * GiB),
                  lambda c: 4)
        chosen.append((p.gpu_product, p.preferred_nodes[0]))
        pods += expected_pods(_job(1), list(p.preferred_nodes))
    assert chosen[:4] == [("NVIDIA-L4", "kwok-l4-0")] * 4
    assert chosen[4][0] != "NVIDIA-L4"
    free = {n.name: n.slots[0].free for n in read_fleet(FLEET_NODES, pods) if n.slots}
    assert free["kwok-l4-0"] == 0


def test_expected_pods_shape():
    assert expected_pods(_job(2, suspend=True), ["a"]) == []  # a suspended Job runs nothing
    two = expected_pods(_job(8, parallelism=2), ["a", "b", "c"])
    assert [q["spec"]["nodeName"] for q in two] == ["a", "b"]
    assert two[0]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    mig = expected_pods(_job(1, resource="nvidia.com/mig-1g.10gb"), ["kwok-a100-mig-0"])
    fleet = {n.name: n for n in read_fleet(FLEET_NODES, mig)}
    slot = {s.resource: s for s in fleet["kwok-a100-mig-0"].slots}["nvidia.com/mig-1g.10gb"]
    assert slot.free == slot.allocatable - 1
