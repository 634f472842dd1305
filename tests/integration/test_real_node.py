"""Real kubelet nodes (kubetune dev up --real-nodes): pods really run in containerd + runc, `kubectl logs`
and `exec` go through the kubelet, pods reach the ground's S3 (and the host reaches it at the same
endpoint), pods reach the apiserver as in-cluster clients and resolve cluster names through CoreDNS, and
`down` leaves the host as it found it."""
from __future__ import annotations

import json
import socket
import struct
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


def pod(name: str, node_name: str, command: str, image: str = oci.BASE_REF, argv: list[str] | None = None,
        **spec) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"kubernetes.io/hostname": node_name},
            "tolerations": [{"key": node.TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": image, "imagePullPolicy": "IfNotPresent",
                            "command": argv or ["sh", "-c", command]}],
            **spec,
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


def test_host_reaches_s3_at_the_pod_endpoint(ground, real):
    """One endpoint for the operator (a host process here) and the trainer pods: nat OUTPUT DNATs the
    host's own connections to the gateway address as PREROUTING does the pods'."""
    import boto3
    from botocore.config import Config

    env = g.env_values(ground.lay)
    s3 = boto3.client("s3", endpoint_url=env["KUBETUNE_S3_POD_ENDPOINT"], region_name=env["AWS_DEFAULT_REGION"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                      config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2))
    assert set(g.S3_BUCKETS) <= {b["Name"] for b in s3.list_buckets()["Buckets"]}


@pytest.fixture(scope="module")
def operator_image(ground, real) -> str:
    """The operator image, built (cached layers) and imported into every real node of the ground."""
    from kubetune.devenv import images

    images.build(["operator"], Path(__file__).resolve().parents[2])
    archive, ref = images.archive("operator"), images.IMAGES["operator"].ref()
    for n in ground.state["real_nodes"]["nodes"]:
        node.import_image(n, archive, ref)  # skipped when the node has the ref already
    return ref


LIST_NAMESPACES = ("from kubernetes import client, config; config.load_incluster_config(); "
                   "print([n.metadata.name for n in client.CoreV1Api().list_namespace().items])")


def test_pod_reaches_the_apiserver_as_an_in_cluster_client(ground, namespace, real, operator_image):
    """KUBERNETES_SERVICE_HOST:PORT (the `kubernetes` Service, 10.0.0.1:443, DNATed from the bridge) and the
    serving certificate checked against the ServiceAccount volume's ca.crt, as in any cluster."""
    role = f"{namespace}-list-namespaces"
    rbac = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "lister", "namespace": namespace}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": role},
         "rules": [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": role},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
         "subjects": [{"kind": "ServiceAccount", "name": "lister", "namespace": namespace}]},
    ]
    ground.apply({"apiVersion": "v1", "kind": "List", "items": rbac})
    try:
        ground.apply(pod("incluster", real, "", image=operator_image, argv=["python3", "-c", LIST_NAMESPACES],
                         serviceAccountName="lister"), namespace)
        wait_for("pod incluster to finish",
                 lambda: phase(ground.kubectl, "incluster", namespace) in ("Succeeded", "Failed"), 120)
        logs = ground.kubectl("logs", "incluster", "-n", namespace).stdout
        assert phase(ground.kubectl, "incluster", namespace) == "Succeeded", logs
        assert "'default'" in logs and f"'{namespace}'" in logs, logs
    finally:
        ground.kubectl("delete", "clusterrolebinding,clusterrole", role, "--wait=false", check=False)


def dns_query(server: str, name: str, tcp: bool = False) -> tuple[int, list[str]]:
    """(rcode, A records) of one query to server:53, hand-built (no DNS library in the project)."""
    q = struct.pack(">HHHHHH", 0x4b54, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.connect((server, 53))
        if tcp:
            s.sendall(struct.pack(">H", len(q)) + q)
            size = struct.unpack(">H", s.recv(2))[0]
            r = b""
            while len(r) < size:
                r += s.recv(size - len(r))
        else:
            s.send(q)
            r = s.recv(4096)
    rcode, answers = r[3] & 0xF, struct.unpack(">H", r[6:8])[0]
    i = len(q)  # the question is echoed as sent
    out = []
    for _ in range(answers):
        i += 2 if r[i] & 0xC0 == 0xC0 else r.index(b"\0", i) + 1 - i  # a compressed or a plain name
        rtype, _cls, _ttl, rdlen = struct.unpack(">HHIH", r[i:i + 10])
        if rtype == 1:
            out.append(socket.inet_ntoa(r[i + 10:i + 14]))
        i += 10 + rdlen
    return rcode, out


def test_coredns_answers_cluster_local_only(ground, real):
    """From the host, over UDP and TCP: the `kubernetes` Service's name gives its ClusterIP; a name outside
    cluster.local is REFUSED (no forwarder: nothing beyond the host is asked)."""
    gw = ground.state["real_nodes"]["net"]["gateway"]
    for tcp in (False, True):
        assert dns_query(gw, "kubernetes.default.svc.cluster.local", tcp) == (0, [node.KUBERNETES_VIP])
        assert dns_query(gw, "example.com", tcp) == (5, [])
    with pytest.raises(OSError):  # on the bridge address only
        dns_query("127.0.0.1", "kubernetes.default.svc.cluster.local", tcp=True)


def test_pods_resolve_services_and_headless_peers(ground, namespace, real):
    """What a 2-node trainer run needs: w0.<headless svc>.<ns>.svc.cluster.local from another pod."""
    ground.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "peers"},
                  "spec": {"clusterIP": "None", "selector": {"app": "w0"},
                           "ports": [{"name": "rdzv", "port": 29500}]}}, namespace)
    ground.apply(pod("w0", real, "sleep 600", hostname="w0", subdomain="peers"), namespace)
    ground.apply(pod("asker", real, "sleep 600"), namespace)
    for p in ("w0", "asker"):
        ground.kubectl("wait", "--for=condition=Ready", f"pod/{p}", "-n", namespace, "--timeout=90s", timeout=120)
    w0_ip = ground.kubectl("get", "pod", "w0", "-n", namespace, "-o", "jsonpath={.status.podIP}").stdout

    def getent(name: str) -> subprocess.CompletedProcess:
        return ground.kubectl("exec", "asker", "-n", namespace, "--", "getent", "hosts", name, check=False)

    assert getent("kubernetes.default.svc.cluster.local").stdout.split()[:1] == [node.KUBERNETES_VIP]
    fqdn = f"w0.peers.{namespace}.svc.cluster.local"
    found = wait_for(f"{fqdn} to resolve", lambda: getent(fqdn).stdout.split()[:1], 30)
    assert found == [w0_ip]
    assert getent("kubernetes.default").stdout.split()[:1] == [node.KUBERNETES_VIP]  # the pod's search path
    resolv = ground.kubectl("exec", "asker", "-n", namespace, "--", "cat", "/etc/resolv.conf").stdout
    assert [line.split()[1] for line in resolv.splitlines() if line.startswith("nameserver")] == [
        ground.state["real_nodes"]["net"]["gateway"]]
    assert getent("example.com").returncode == 2  # not found: no answer from beyond the host


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
    mine: dict = {}
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
    # A process killed a moment ago can still be in /proc while the kernel tears it down (CI saw one such
    # pid once): gone means gone within a few seconds, or a zombie (exit status only, nothing held).
    def running(p: int) -> bool:
        try:
            return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    g.wait_until("the ground's processes gone", lambda: not [p for p in pids if running(p)], 15)
    assert not [p for p in pids if running(p)]
    assert not node.shim_pids(plan.socket)
    assert not node.cgroup_pids(plan.cgroup_root)
    for h in node.cgroup_hierarchies():
        assert not Path(h, plan.cgroup_root.lstrip("/")).exists(), h
    assert _host_snapshot(tmp_path) == before
    # No rule of this ground left (the snapshot compares chains; rules of other grounds come and go).
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    for word in (mine["chain"], mine["net"]["bridge"], mine["net"]["gateway"] + "/"):
        assert word not in rules, word
    # The session ground's node is untouched.
    assert ground.kubectl("get", "node", real, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}"
                          ).stdout == "True"
