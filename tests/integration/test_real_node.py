"""Real kubelet nodes (kubetune dev up --real-nodes): pods really run in containerd + runc, `kubectl logs`
and `exec` go through the kubelet, pods reach the ground's S3, and `down` leaves the host as it found it."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kubetune.devenv import ground as g
from kubetune.devenv import node, oci
from kubetune.devenv.ground import wait_until as wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def real(ground) -> str:
    """The GPU real node's name; a ground reused without real nodes is an error, not a skip."""
    rn = ground.state.get("real_nodes")
    assert rn, (f"the ground in {ground.lay.root} has no real node: "
                "`kubetune dev down && kubetune dev up --real-nodes 1`")
    return next(n["name"] for n in rn["nodes"] if n["gpu"])


def pod(name: str, node_name: str, command: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"kubernetes.io/hostname": node_name},
            "tolerations": [{"key": node.TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": oci.BASE_REF, "imagePullPolicy": "IfNotPresent",
                            "command": ["sh", "-c", command]}],
        },
    }


def phase(kubectl, name: str, ns: str) -> str:
    return kubectl("get", "pod", name, "-n", ns, "-o", "jsonpath={.status.phase}", check=False).stdout


def test_pod_runs_to_completion_with_logs(ground, namespace, real):
    ground.apply(pod("hi", real, "echo hi; id"), namespace)
    wait_for("pod hi to finish", lambda: phase(ground.kubectl, "hi", namespace) in ("Succeeded", "Failed"), 90)
    p = ground.kubectl_json("get", "pod", "hi", "-n", namespace)
    status = p["status"]["containerStatuses"][0]
    assert p["status"]["phase"] == "Succeeded", json.dumps(p["status"], indent=1)
    assert status["state"]["terminated"]["reason"] == "Completed"
    assert status["containerID"].startswith("containerd://")
    wide = ground.kubectl("get", "pod", "hi", "-n", namespace, "-o", "wide").stdout
    assert real in wide.splitlines()[1].split()
    logs = ground.kubectl("logs", "hi", "-n", namespace).stdout.splitlines()
    assert logs[0] == "hi" and logs[1].startswith("uid=0(root)")


def test_exec_into_a_running_pod_and_reach_s3(ground, namespace, real):
    ground.apply(pod("sleeper", real, "sleep 600"), namespace)
    ground.kubectl("wait", "--for=condition=Ready", "pod/sleeper", "-n", namespace, "--timeout=60s", timeout=90)
    out = ground.kubectl("exec", "sleeper", "-n", namespace, "--", "sh", "-c", "echo $((6*7))").stdout
    assert out.strip() == "42"
    # Inside a pod 127.0.0.1 is the pod: S3 is reached at the node's bridge address (an anonymous GET is
    # refused by S3 itself, which proves the connection).
    host, port = g.env_values(ground.lay)["KUBETUNE_S3_POD_ENDPOINT"].removeprefix("http://").split(":")
    req = (f"exec 3<>/dev/tcp/{host}/{port}; printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3; head -1 <&3")
    first = ground.kubectl("exec", "sleeper", "-n", namespace, "--", "bash", "-c", req).stdout
    assert first.startswith("HTTP/1.") and " 403 " in first, first


def test_gpu_node_has_allocatable_gpus_labels_and_taint(ground, real):
    n = ground.kubectl_json("get", "node", real)
    assert n["status"]["allocatable"]["nvidia.com/gpu"] == str(node.GPU_SPEC.gpu_count)
    labels = n["metadata"]["labels"]
    assert labels["nvidia.com/gpu.present"] == "true"
    assert labels["nvidia.com/gpu.product"] == node.GPU_SPEC.gpu.product
    assert any(t["key"] == node.TAINT_KEY for t in n["spec"]["taints"])
    assert n["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://2.")
    ready = next(c for c in n["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"


def _host_snapshot(root: Path) -> dict:
    def save(tool: str) -> list[str]:
        out = subprocess.run([f"{tool}-save"], capture_output=True, text=True).stdout
        return sorted(line.split(" [")[0] for line in out.splitlines() if line.startswith(("*", ":")))

    return {
        "chains": save("iptables") + save("ip6tables"),
        "sysctls": node.read_sysctls(),
        # Links on a bridge are pods' veths, which come and go with the session ground's pods; a veth of
        # ours left behind would have lost its bridge and show up here.
        "links": sorted(link["ifname"] for link in json.loads(subprocess.run(
            ["ip", "-j", "link"], capture_output=True, text=True, check=True).stdout) if "master" not in link),
        "mounts": node.mounts_under(root),
        "cgroups": sorted(str(c) for h in node.cgroup_hierarchies() for c in Path(h).glob("kubetune-*")),
    }


@pytest.fixture
def short_tmp():
    """A short directory: unix sockets under a real node's state must fit in 108 bytes."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="kt-", dir="/tmp"))
    yield d
    if not node.mounts_under(d):
        shutil.rmtree(d, ignore_errors=True)


def test_down_undoes_every_host_change(ground, real, short_tmp):
    """A second ground with one real node beside the session's: no name collides, and after its `down`
    nothing of it is left (processes, shims, bridge, chains, sysctls, mounts, cgroups)."""
    tmp_path = short_tmp
    before = _host_snapshot(tmp_path)
    lay = g.layout(tmp_path / "g")
    try:
        state = g.up(lay, real_nodes=1, log=lambda m: None)
        mine, theirs = state["real_nodes"], ground.state["real_nodes"]
        assert mine["net"]["bridge"] != theirs["net"]["bridge"]
        assert mine["net"]["subnet"] != theirs["net"]["subnet"]
        assert mine["chain"] != theirs["chain"]
        assert mine["nodes"][0]["cgroup_root"] != theirs["nodes"][0]["cgroup_root"]
        # A running pod makes what down must undo: a veth, a netns, overlay and tmpfs mounts, a shim.
        g.kubectl(state, lay, "apply", "-f", "-", stdin=json.dumps(pod("busy", "real-0", "sleep 600")))
        g.kubectl(state, lay, "wait", "--for=condition=Ready", "pod/busy", "--timeout=60s", timeout=90)
        plan = node.plans_of(state)[0]
        assert node.shim_pids(plan.socket) and node.cgroup_pids(plan.cgroup_root)
        assert node.mounts_under(tmp_path)
        pids = [p["pid"] for p in state["procs"].values()]
    finally:
        stuck = g.down(lay, log=lambda m: None)
    assert not stuck
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]
    assert not node.shim_pids(plan.socket)
    assert not node.cgroup_pids(plan.cgroup_root)
    for h in node.cgroup_hierarchies():
        assert not Path(h, plan.cgroup_root.lstrip("/")).exists(), h
    assert _host_snapshot(tmp_path) == before
    # The session ground's node is untouched.
    assert ground.kubectl("get", "node", real, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}"
                          ).stdout == "True"
