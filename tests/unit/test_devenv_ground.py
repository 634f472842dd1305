"""The ground's process commands and stage file, checked without starting anything."""
from pathlib import Path

import yaml

from kubetune.devenv import ground as g

STATE = {  # a ground with one real node (see test_devenv_node for the plan itself)
    "ports": {"etcd": 1, "etcd-peer": 2, "apiserver": 3, "controller-manager": 4, "scheduler": 5, "kwok": 6,
              "s3": 7},
    "bin": {"kubernetes": "/k", "etcd": "/e", "kwok": "/w", "s3s-fs": "/s"},
    "s3": {"access_key": "AK", "secret_key": "SK", "endpoint": "http://127.0.0.1:7"},
}


def argv(name):
    return g._argv(name, g.layout(Path("/dev-dir")), STATE)


def flag(args, name):
    return args[args.index(name) + 1]


def test_apiserver_runs_rbac_with_the_token_file_on_loopback():
    a = argv("kube-apiserver")
    assert flag(a, "--authorization-mode") == "Node,RBAC"
    assert flag(a, "--token-auth-file") == "/dev-dir/pki/tokens.csv"
    assert flag(a, "--bind-address") == "127.0.0.1"
    assert flag(a, "--etcd-servers") == "http://127.0.0.1:1"


def test_controller_manager_runs_the_required_controllers():
    controllers = set(flag(argv("kube-controller-manager"), "--controllers").split(","))
    required = {"job-controller", "garbage-collector-controller", "namespace-controller",
                "serviceaccount-controller", "ttl-after-finished-controller", "deployment-controller",
                "replicaset-controller"}
    assert required <= controllers


def test_every_listener_is_on_loopback():
    for name in ("etcd", "kube-controller-manager", "kube-scheduler", "kwok", "s3"):
        for arg in argv(name):
            assert not arg.startswith(("0.0.0.0", "http://0.0.0.0", ":")), (name, arg)
        assert "--bind-address" not in argv(name) or flag(argv(name), "--bind-address") == "127.0.0.1"
    assert flag(argv("s3"), "--host") == "127.0.0.1"
    assert flag(argv("kwok"), "--server-address") == "127.0.0.1:6"


def test_kwok_manages_only_annotated_nodes():
    a = argv("kwok")
    assert "--manage-all-nodes=false" in a
    assert "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake" in a


def test_stage_file_has_exclusive_complete_and_fail_stages():
    stages = {d["metadata"]["name"]: d for d in yaml.safe_load_all(
        (Path(g.__file__).parent / "data" / "kwok-stages.yaml").read_text())}
    assert {"node-initialize", "pod-ready", "pod-complete", "pod-fail", "pod-terminate", "pod-delete"} <= set(stages)

    def annotation_op(stage):
        return next(e["operator"] for e in stages[stage]["spec"]["selector"]["matchExpressions"]
                    if "kwok.kubetune.io/exit-code" in e["key"])
    assert (annotation_op("pod-complete"), annotation_op("pod-fail")) == ("DoesNotExist", "Exists")


REAL = {
    **STATE,
    "bin": {**STATE["bin"], "kubelet": "/kl", "containerd": "/c", "coredns": "/cd"},
    "real_nodes": {
        "net": {"bridge": "ktabc", "subnet": "10.89.0.0/24", "gateway": "10.89.0.1"},
        "chain": "KUBETUNE-ABC",
        "pod_endpoints": {"s3": "http://10.89.0.1:7"},
        "dns": {"corefile": "/dev-dir/coredns/Corefile", "ready_port": 11},
        "nodes": [{"name": "real-0", "dir": "/dev-dir/nodes/real-0", "gpu": True, "kubelet_port": 8, "healthz_port": 9,
                   "metrics_port": 10, "cgroup_root": "/kubetune-abc-real-0", "range_start": "10.89.0.16",
                   "range_end": "10.89.0.254", "containerd_bin": "/c"}],
    },
}


def test_apiserver_serves_a_ground_ca_certificate_that_pods_verify(tmp_path):
    a, cm = argv("kube-apiserver"), argv("kube-controller-manager")
    assert flag(a, "--tls-cert-file") == "/dev-dir/pki/apiserver.crt"
    assert "--cert-dir" not in a
    # kube-root-ca.crt, the ca.crt of every ServiceAccount token volume, is the CA that signed it
    assert flag(cm, "--root-ca-file") == "/dev-dir/pki/ca.crt"
    for san in ("IP:127.0.0.1", "IP:10.0.0.1", "DNS:kubernetes.default.svc"):
        assert san in g.APISERVER_SANS
    from kubetune.devenv import node

    node.make_ca(tmp_path / "ca.crt", tmp_path / "ca.key")
    crt, _ = node.sign_cert(tmp_path / "ca.crt", tmp_path / "ca.key", tmp_path / "apiserver", "kube-apiserver", (),
                            "serverAuth", g.APISERVER_SANS)
    import subprocess

    for check in (["-verify_ip", "10.0.0.1"], ["-verify_hostname", "kubernetes.default.svc"],
                  ["-verify_ip", "127.0.0.1"]):
        out = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), *check, str(crt)],
                             capture_output=True, text=True)
        assert out.returncode == 0, (check, out.stderr)


def test_headless_services_get_endpointslices():
    assert "endpointslice-controller" in flag(argv("kube-controller-manager"), "--controllers").split(",")


def test_apiserver_can_call_kubelets_for_logs_and_exec():
    a = argv("kube-apiserver")
    assert flag(a, "--kubelet-preferred-address-types") == "InternalIP,Hostname"
    assert flag(a, "--kubelet-client-certificate") == "/dev-dir/pki/apiserver-kubelet-client.crt"
    assert flag(a, "--kubelet-certificate-authority") == flag(a, "--client-ca-file") == "/dev-dir/pki/ca.crt"


def test_real_node_processes_rank_after_s3_and_before_prometheus():
    names = ["prometheus", "kubelet/real-0", "s3", "containerd/real-0", "etcd", "coredns"]
    assert sorted(names, key=g.rank) == ["etcd", "s3", "coredns", "containerd/real-0", "kubelet/real-0",
                                         "prometheus"]


def test_real_node_commands_and_endpoints():
    lay = g.layout(Path("/dev-dir"))
    assert g._argv("containerd/real-0", lay, REAL) == ["/c/containerd", "--config",
                                                        "/dev-dir/nodes/real-0/containerd/config.toml"]
    kubelet = g._argv("kubelet/real-0", lay, REAL)
    assert kubelet[0] == "/kl/kubelet" and flag(kubelet, "--hostname-override") == "real-0"
    eps = g._endpoints(REAL)
    assert eps["containerd/real-0"] == "http://127.0.0.1:10/v1/metrics"
    assert eps["kubelet/real-0"] == "http://127.0.0.1:9/healthz"
    assert g._argv("coredns", lay, REAL) == ["/cd/coredns", "-conf", "/dev-dir/coredns/Corefile"]
    assert eps["coredns"] == "http://127.0.0.1:11/ready"


def test_env_names_the_pod_endpoint_of_s3(tmp_path):
    lay = g.layout(tmp_path)
    g.save_state(lay, {**REAL, "procs": {"s3": {}}})
    env = g.env_values(lay)
    assert env["KUBETUNE_S3_ENDPOINT"] == "http://127.0.0.1:7"  # host users keep loopback
    assert env["KUBETUNE_S3_POD_ENDPOINT"] == "http://10.89.0.1:7"
    assert env["KUBETUNE_REAL_NODES"] == "real-0"
    g.save_state(lay, {**STATE, "procs": {"s3": {}}})
    assert "KUBETUNE_S3_POD_ENDPOINT" not in g.env_values(lay)


def test_negative_real_node_count_is_refused(tmp_path):
    import pytest

    with pytest.raises(g.GroundError, match="0 or more"):
        g.up(g.layout(tmp_path), real_nodes=-1)


def test_stop_keeps_the_record_and_start_brings_it_back_on_the_same_port(tmp_path):
    """An outage of one component (S3 in test_real_resilience): stop, then start the same command."""
    import sys

    from kubetune.devenv import procs

    lay = g.layout(tmp_path)
    port = procs.free_port()
    (tmp_path / "healthz").write_text("ok")  # a stand-in for kwok: its readiness is a 200 for /healthz
    proc = procs.spawn("kwok", [sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(port)],
                       tmp_path / "kwok.log", cwd=tmp_path)
    g.save_state(lay, {"ports": {"kwok": port}, "procs": {"kwok": proc.to_dict()}})
    try:
        g._wait_ready(proc, g._ready_check("kwok", lay, g.load_state(lay)), 30)
        stopped = g.stop("kwok", lay, log=lambda m: None)
        assert not procs.alive(stopped) and g._http_get(f"http://127.0.0.1:{port}/healthz") is None
        assert not g.is_up(lay)  # still recorded, so the ground shows it dead
        again = g.start("kwok", lay, log=lambda m: None)
        assert again.pid != proc.pid and again.argv == proc.argv
        assert g._http_get(f"http://127.0.0.1:{port}/healthz") == "ok" and g.is_up(lay)
        assert g.start("kwok", lay, log=lambda m: None).pid == again.pid  # a live one is left alone
    finally:
        for p in g.recorded(g.load_state(lay)).values():
            procs.stop(p)


def test_stop_and_start_refuse_an_unknown_name(tmp_path):
    import pytest

    lay = g.layout(tmp_path)
    g.save_state(lay, {"procs": {}})
    with pytest.raises(g.GroundError, match="not running"):
        g.stop("s3", lay)
    with pytest.raises(g.GroundError, match="never started"):
        g.start("s3", lay)
