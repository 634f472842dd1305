"""Real nodes' configuration, rendered without starting anything: containerd's config, the CNI conflist,
the KubeletConfiguration, the plan (ports, cgroups, pod ranges) and the host bookkeeping parsers."""
import ipaddress
import tomllib
from pathlib import Path

import pytest

from kubetune.devenv import node, paths

ROOT = Path("/dev-dir")
NET = node.Net("ktabcdef12", "10.89.3.0/24", "10.89.3.1")


def plans(n=2, root=ROOT):
    return node.plan_nodes(root, n, NET.subnet, list(range(20000, 20000 + 3 * n)))


def test_plan_gives_each_node_its_own_ports_cgroup_and_range():
    a, b = plans()
    assert (a.name, b.name) == ("real-0", "real-1")
    assert a.gpu and b.gpu  # every real node: a 2-node FineTuneJob (gpusPerNode 1) needs two that fit
    assert len({a.kubelet_port, a.healthz_port, a.metrics_port, b.kubelet_port, b.healthz_port, b.metrics_port}) == 6
    assert a.cgroup_root != b.cgroup_root and a.cgroup_root.startswith("/kubetune-")
    ra = range(int(ipaddress.ip_address(a.range_start)), int(ipaddress.ip_address(a.range_end)) + 1)
    rb = range(int(ipaddress.ip_address(b.range_start)), int(ipaddress.ip_address(b.range_end)) + 1)
    assert not set(ra) & set(rb)
    assert ipaddress.ip_address(NET.gateway) not in [ipaddress.ip_address(x) for x in (*ra, *rb)]
    assert all(ipaddress.ip_address(x) in ipaddress.ip_network(NET.subnet) for x in (ra[0], rb[-1]))


def test_two_grounds_never_share_names():
    a, b = node.ground_id(Path("/g/one")), node.ground_id(Path("/g/two"))
    assert a != b
    assert node.bridge_name(a) != node.bridge_name(b) and len(node.bridge_name(a)) <= 15
    assert node.chain_name(a) != node.chain_name(b)
    assert plans(1, Path("/g/one"))[0].cgroup_root != plans(1, Path("/g/two"))[0].cgroup_root


def test_subnet_avoids_routes_the_ground_and_other_grounds():
    taken = ["10.0.0.0/24", "10.244.0.0/16", "192.0.2.0/24", "10.89.0.0/24", "10.89.1.5/32"]
    assert str(node.pick_subnet(taken)) == "10.89.2.0/24"
    with pytest.raises(node.NodeError, match="no free /24"):
        node.pick_subnet(["10.89.0.0/16"])


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        node.plan_nodes(ROOT, -1, NET.subnet, [])
    with pytest.raises(ValueError, match="ports"):
        node.plan_nodes(ROOT, 2, NET.subnet, [1, 2, 3])
    with pytest.raises(node.NodeError, match="too deep"):
        node.plan_nodes(Path("/" + "d" * 70), 1, NET.subnet, [1, 2, 3])


def test_containerd_config_is_toml_with_every_path_under_the_node():
    plan = plans(1)[0]
    cfg = tomllib.loads(node.toml(node.containerd_config(plan)))
    assert cfg["version"] == 3
    assert cfg["grpc"]["address"] == plan.socket
    runtime = cfg["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True
    assert runtime["netns_mounts_under_state_dir"] is True
    runc = runtime["containerd"]["runtimes"]["runc"]
    assert runc["options"]["SystemdCgroup"] is False
    assert runtime["cni"]["conf_dir"].startswith(plan.dir)
    images = cfg["plugins"]["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == paths.PAUSE_IMAGE
    assert images["snapshotter"] == "overlayfs"
    for key in ("root", "state", "temp"):
        assert cfg[key].startswith(plan.dir + "/"), key
    assert runc["options"]["Root"].startswith(plan.dir + "/")
    assert cfg["plugins"]["io.containerd.internal.v1.opt"]["path"].startswith(plan.dir + "/")
    assert cfg["metrics"]["address"] == f"127.0.0.1:{plan.metrics_port}"


def test_toml_quotes_dotted_keys_and_refuses_what_it_cannot_write():
    doc = tomllib.loads(node.toml({"a": {"io.x.y": {"k": "v \"q\"", "n": [1, 2], "b": False}}}))
    assert doc == {"a": {"io.x.y": {"k": 'v "q"', "n": [1, 2], "b": False}}}
    with pytest.raises(TypeError):
        node.toml({"f": 1.5})


def test_cni_conflist_keeps_pods_on_this_host():
    plan = plans(1)[0]
    conf = node.cni_conflist(plan, NET)
    bridge, portmap = conf["plugins"]
    assert (bridge["type"], portmap["type"]) == ("bridge", "portmap")
    assert bridge["bridge"] == NET.bridge
    assert bridge["ipMasq"] is False and bridge["isGateway"] is False
    rng = bridge["ipam"]["ranges"][0][0]
    assert rng["subnet"] == NET.subnet and rng["gateway"] == NET.gateway
    assert (rng["rangeStart"], rng["rangeEnd"]) == (plan.range_start, plan.range_end)
    # No default route (nothing beyond this host): only the `kubernetes` Service's address, via the host.
    assert bridge["ipam"]["routes"] == [{"dst": "10.0.0.1/32", "gw": NET.gateway}]
    assert bridge["ipam"]["dataDir"].startswith(plan.dir)
    net = ipaddress.ip_network(NET.subnet)
    for cidr in ("10.0.0.0/24", "10.244.0.0/16", "192.0.2.0/24"):
        assert not net.overlaps(ipaddress.ip_network(cidr))


def test_kubelet_config_for_this_host():
    plan = plans(1)[0]
    cfg = node.kubelet_config(plan, NET, "/dev-dir/pki/ca.crt")
    assert cfg["failCgroupV1"] is False and cfg["failSwapOn"] is False
    assert cfg["cgroupDriver"] == "cgroupfs" and cfg["cgroupRoot"] == plan.cgroup_root
    assert cfg["readOnlyPort"] == 0
    assert (cfg["port"], cfg["healthzPort"]) == (plan.kubelet_port, plan.healthz_port)
    assert cfg["imageGCHighThresholdPercent"] == 100
    assert cfg["containerRuntimeEndpoint"] == f"unix://{plan.socket}"
    assert cfg["authentication"]["anonymous"]["enabled"] is False
    assert cfg["authentication"]["webhook"]["enabled"] is True
    assert cfg["authentication"]["x509"]["clientCAFile"] == "/dev-dir/pki/ca.crt"
    assert cfg["authorization"]["mode"] == "Webhook"
    assert cfg["makeIPTablesUtilChains"] is False
    assert {"key": node.TAINT_KEY, "value": "true", "effect": "NoSchedule"} in cfg["registerWithTaints"]
    for key in ("podLogsDir", "volumePluginDir", "tlsCertFile", "tlsPrivateKeyFile"):
        assert cfg[key].startswith(plan.dir + "/"), key
    assert (cfg["clusterDNS"], cfg["clusterDomain"]) == ([NET.gateway], "cluster.local")


def test_corefile_serves_only_cluster_local_on_the_gateway():
    text = node.corefile(NET, "/dev-dir/kubeconfig", 4321)
    blocks = [line for line in text.splitlines() if line.endswith("{") and not line.startswith(" ")]
    assert blocks == ["cluster.local:53 {"]  # one zone: any other name is refused, never forwarded
    words = text.split()
    assert words[words.index("bind") + 1] == NET.gateway
    assert words[words.index("ready") + 1] == "127.0.0.1:4321"
    assert words[words.index("kubeconfig") + 1] == "/dev-dir/kubeconfig"
    assert "forward" not in words and "proxy" not in words
    assert node.coredns_argv("/b", "/dev-dir/coredns/Corefile") == ["/b/coredns", "-conf", "/dev-dir/coredns/Corefile"]


def test_kubernetes_vip_is_the_first_address_of_the_service_cidr():
    from kubetune.devenv import ground

    assert node.KUBERNETES_VIP == str(next(ipaddress.ip_network(ground.SERVICE_CIDR).hosts()))


def test_kubelet_argv_keeps_its_state_under_the_node_and_labels_the_gpu_node():
    import dataclasses

    gpu, second = plans()
    cpu = dataclasses.replace(second, gpu=False)
    argv = node.kubelet_argv("/bin-dir", gpu, NET)
    for flag in ("--root-dir", "--cert-dir", "--config", "--kubeconfig"):
        assert argv[argv.index(flag) + 1].startswith(gpu.dir + "/"), flag
    assert argv[argv.index("--node-ip") + 1] == NET.gateway
    labels = dict(kv.split("=") for kv in argv[argv.index("--node-labels") + 1].split(","))
    assert labels["nvidia.com/gpu.present"] == "true" and labels[node.LABEL] == "true"
    assert "nvidia.com/gpu.present" not in node.node_labels(cpu)


def test_gpu_status_patch_sets_capacity_and_allocatable():
    ops = node.gpu_status_patch(2)
    assert {o["path"] for o in ops} == {"/status/capacity/nvidia.com~1gpu", "/status/allocatable/nvidia.com~1gpu"}
    assert all(o["value"] == "2" for o in ops)


def test_cert_inputs_are_checked():
    assert node.cert_subject("system:node:real-0", ("system:nodes",)) == "/O=system:nodes/CN=system:node:real-0"
    with pytest.raises(ValueError):
        node.cert_subject("a/b")
    with pytest.raises(ValueError):
        node.cert_extensions("codeSigning")
    ext = node.cert_extensions("serverAuth", ("IP:10.89.3.1", "DNS:real-0"))
    assert "extendedKeyUsage=serverAuth" in ext and "subjectAltName=IP:10.89.3.1,DNS:real-0" in ext


def test_ca_signs_certificates(tmp_path):
    node.make_ca(tmp_path / "ca.crt", tmp_path / "ca.key")
    crt, key = node.sign_cert(tmp_path / "ca.crt", tmp_path / "ca.key", tmp_path / "k", "system:node:x",
                              ("system:nodes",), "clientAuth")
    import subprocess
    out = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(crt)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert key.stat().st_mode & 0o077 == 0


def test_dnat_exposes_only_the_given_ports_at_the_gateway():
    cmds = node.dnat_rules("KUBETUNE-X", NET, [9000])
    assert ["-t", "nat", "-N", "KUBETUNE-X"] in cmds
    jump = next(c for c in cmds if "PREROUTING" in c)
    assert jump[jump.index("-i") + 1] == NET.bridge  # only traffic from the pods' bridge
    dnat = cmds[-1]
    assert dnat[dnat.index("-d") + 1] == "10.89.3.1/32" and dnat[-1] == "127.0.0.1:9000"
    assert not any("443" in c for c in cmds)


def test_host_processes_reach_the_pod_endpoint_too():
    """nat OUTPUT sends only what goes to the gateway address into the chain, whose rules match only the
    exposed ports: an operator on the host uses the pods' S3 endpoint."""
    cmds = node.dnat_rules("KUBETUNE-X", NET, [9000])
    out = next(c for c in cmds if "OUTPUT" in c)
    assert out[:3] == ["-t", "nat", "-A"]
    assert out[out.index("-d") + 1] == "10.89.3.1/32" and out[-2:] == ["-j", "KUBETUNE-X"]
    assert "-i" not in out  # locally generated: no input interface
    # down deletes exactly the jumps up added
    assert [["-t", "nat", "-A", *j] for j in node.jump_rules("KUBETUNE-X", NET)] == [
        c for c in cmds if c[3] in ("PREROUTING", "OUTPUT")
    ]


def test_kubernetes_service_address_is_dnated_from_the_bridge_only():
    cmds = node.dnat_rules("KUBETUNE-X", NET, [9000], apiserver_port=6443)
    vip = next(c for c in cmds if "10.0.0.1/32" in c)
    assert vip[vip.index("-i") + 1] == NET.bridge  # not the host's own traffic, not another ground's pods
    assert vip[vip.index("--dport") + 1] == "443" and vip[-1] == "127.0.0.1:6443"


SAVE = """# Generated by iptables-save
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBETUNE-X - [0:0]
-A PREROUTING -i br -j KUBETUNE-X
COMMIT
*filter
:INPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
COMMIT
"""


def test_iptables_save_parsing():
    assert node.chains(SAVE) == {"nat": {"PREROUTING", "POSTROUTING", "KUBETUNE-X"},
                                 "filter": {"INPUT", "KUBE-FIREWALL"}, "mangle": {"PREROUTING"}}
    assert node.chains(SAVE, user_only=True)["nat"] == {"KUBETUNE-X"}
    assert node.empty_tables(SAVE) == ["mangle"]


MOUNTINFO = """22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 22 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
31 22 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
40 22 254:0 /g/n/kubelet/root /g/n/kubelet/root rw - ext4 /dev/vda rw
41 40 0:50 / /g/n/kubelet/root/pods/x/vol rw - tmpfs tmpfs rw
42 22 0:51 / /g/n/with\\040space rw - tmpfs tmpfs rw
43 22 0:52 / /gother rw - tmpfs tmpfs rw
"""


def test_mountinfo_parsing():
    assert node.cgroup_v1_hierarchies(MOUNTINFO) == ["/sys/fs/cgroup/memory"]
    assert node.cgroup_hierarchies(MOUNTINFO) == ["/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified"]
    under = node.mounts_under(Path("/g"), MOUNTINFO)
    # the last mounted first, so a mount over another comes off before it
    assert under == ["/g/n/with space", "/g/n/kubelet/root/pods/x/vol", "/g/n/kubelet/root"]
