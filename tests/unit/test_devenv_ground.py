"""The ground's process commands and stage file, checked without starting anything."""
from pathlib import Path

import yaml

from kubetune.devenv import ground as g

STATE = {
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
    assert flag(a, "--authorization-mode") == "RBAC"
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
