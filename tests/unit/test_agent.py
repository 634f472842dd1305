"""The local agent's pure parts: path remapping and its node (tainted, not managed by KWOK)."""
from kubetune.devenv.agent import TAINT_KEY, node_manifest, remap


def test_remap_uses_the_longest_mount():
    mounts = {"/tmp": "/w/volumes/work", "/etc/kubetune": "/w/volumes/config", "/tmp/kubetune/hf": "/w/hf"}
    assert remap("/etc/kubetune/trainer.yaml", mounts) == "/w/volumes/config/trainer.yaml"
    assert remap("/tmp/kubetune/hf/x", mounts) == "/w/hf/x"
    assert remap("/tmp", mounts) == "/w/volumes/work"
    assert remap("/tmpfoo", mounts) == "/tmpfoo"
    assert remap("--config", mounts) == "--config"


def test_agent_node_is_tainted_and_not_kwok():
    n = node_manifest("local-0", "2", "8Gi")
    assert n["spec"]["taints"] == [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}]
    assert "kwok.x-k8s.io/node" not in n["metadata"].get("annotations", {})
