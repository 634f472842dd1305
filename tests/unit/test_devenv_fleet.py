"""The fake GPU fleet's node manifests: GFD labels and extended resources, no cluster needed."""
from kubetune.devenv import fleet


def by_name():
    return {m["metadata"]["name"]: m for m in fleet.manifests()}


def test_every_node_is_kwok_managed_and_marked():
    for m in fleet.manifests():
        assert m["metadata"]["annotations"] == {fleet.KWOK_ANNOTATION: "fake"}
        assert m["metadata"]["labels"][fleet.FLEET_LABEL] == "true"
        assert m["status"]["capacity"] == m["status"]["allocatable"]


def test_fleet_covers_the_required_gpus_with_gfd_labels():
    products = {}
    for m in fleet.manifests():
        labels = m["metadata"]["labels"]
        if labels.get("nvidia.com/gpu.present") == "true":
            products.setdefault(labels["nvidia.com/gpu.product"], set()).add(int(labels["nvidia.com/gpu.memory"]))
    assert products["Tesla-T4"] == {15360}
    assert products["NVIDIA-L4"] == {23034}
    assert products["NVIDIA-A100-SXM4-40GB"] == {40960}
    assert products["NVIDIA-A100-SXM4-80GB"] == {81920}
    assert products["NVIDIA-H100-80GB-HBM3"] == {81559}


def test_h100_node_has_eight_allocatable_gpus():
    h100 = by_name()["kwok-h100-0"]
    assert h100["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert h100["metadata"]["labels"]["nvidia.com/gpu.count"] == "8"
    assert h100["metadata"]["labels"]["nvidia.com/mig.strategy"] == "single"


def test_mig_node_offers_slices_and_no_whole_gpu():
    mig = by_name()["kwok-a100-mig-0"]
    labels, alloc = mig["metadata"]["labels"], mig["status"]["allocatable"]
    assert labels["nvidia.com/mig.strategy"] == "mixed"
    assert alloc["nvidia.com/gpu"] == "0"
    assert alloc["nvidia.com/mig-1g.10gb"] == "7"
    assert labels["nvidia.com/mig-1g.10gb.count"] == "7"
    assert labels["nvidia.com/mig-1g.10gb.product"] == "NVIDIA-A100-SXM4-80GB-MIG-1g.10gb"


def test_cpu_nodes_carry_no_gpu_labels_or_resources():
    cpu = [m for m in fleet.manifests() if not any(k.startswith("nvidia.com/") for k in m["metadata"]["labels"])]
    assert len(cpu) >= 2
    for m in cpu:
        assert not any(k.startswith("nvidia.com/") for k in m["status"]["allocatable"])


def test_only_the_80gb_nodes_pass_a_60000_mib_affinity_with_a_whole_gpu():
    # What the integration test asks kube-scheduler to enforce, checked here on the data alone.
    fits = [m["metadata"]["name"] for m in fleet.manifests()
            if int(m["metadata"]["labels"].get("nvidia.com/gpu.memory", 0)) > 60000
            and int(m["status"]["allocatable"].get("nvidia.com/gpu", 0)) >= 1]
    assert sorted(fits) == ["kwok-a100-80gb-0", "kwok-h100-0"]


def test_label_values_are_valid_kubernetes_label_values():
    import re
    value = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
    for m in fleet.manifests():
        for k, v in m["metadata"]["labels"].items():
            assert len(v) <= 63 and value.match(v), (k, v)
