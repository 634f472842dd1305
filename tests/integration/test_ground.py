"""The ground itself: every process alive, versions stamped, fleet Ready with its GPUs, the controllers
doing their jobs, helm and Prometheus usable."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

from kubetune.devenv import fleet
from kubetune.devenv import ground as g
from kubetune.devenv.ground import wait_until as wait_for

pytestmark = pytest.mark.integration


def test_every_process_is_alive_with_an_endpoint(ground):
    rows = g.status_rows(ground.lay)
    names = {r[0] for r in rows}
    assert {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "s3"} <= names
    for name, pid, alive, endpoint in rows:
        assert alive and pid > 0 and endpoint.startswith("http"), name
        assert "127.0.0.1" in endpoint


def test_server_version_is_stamped_and_recent(ground):
    v = json.loads(ground.kubectl("version", "-o", "json").stdout)
    assert v["serverVersion"]["gitVersion"] == ground.state["versions"]["kubernetes"]
    assert (int(v["serverVersion"]["major"]), int(v["serverVersion"]["minor"])) >= (1, 35)
    assert v["clientVersion"]["gitVersion"] == v["serverVersion"]["gitVersion"]


def test_etcd_is_36(ground):
    out = subprocess.run([ground.bin("etcd", "etcd"), "--version"], capture_output=True, text=True).stdout
    assert "etcd Version: 3.6." in out


def test_fleet_nodes_are_ready_with_gpu_allocatable(ground):
    nodes = {n["metadata"]["name"]: n for n in
             ground.kubectl_json("get", "nodes", "-l", f"{fleet.FLEET_LABEL}=true")["items"]}
    assert set(nodes) == {s.name for s in fleet.FLEET}
    for n in nodes.values():
        ready = [c for c in n["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", n["metadata"]["name"]
    assert nodes["kwok-h100-0"]["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert nodes["kwok-h100-0"]["metadata"]["labels"]["nvidia.com/gpu.memory"] == "81559"
    assert nodes["kwok-a100-mig-0"]["status"]["allocatable"]["nvidia.com/mig-1g.10gb"] == "7"


def test_deployment_and_replicaset_controllers_run_pods_on_kwok(ground, namespace):
    ground.kubectl("create", "deployment", "web", "--image=example.invalid/web:1", "--replicas=2", "-n", namespace)
    ground.kubectl("rollout", "status", "deployment/web", "-n", namespace, "--timeout=60s", timeout=90)
    pods = ground.kubectl_json("get", "pods", "-n", namespace, "-l", "app=web")["items"]
    assert len(pods) == 2 and all(p["status"]["phase"] == "Running" for p in pods)


def test_ttl_after_finished_and_garbage_collector(ground, namespace):
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "ttl"},
           "spec": {"ttlSecondsAfterFinished": 1, "template": {"spec": {"restartPolicy": "Never", "containers": [
               {"name": "c", "image": "example.invalid/x:1", "resources": {"requests": {"cpu": "100m"}}}]}}}}
    ground.apply(job, namespace)
    # ttl-after-finished deletes the Job; the garbage collector then deletes its pod.
    wait_for("the finished job to be deleted", lambda: ground.kubectl(
        "get", "job", "ttl", "-n", namespace, check=False).returncode != 0, 60)
    wait_for("its pod to be collected", lambda: not ground.kubectl_json(
        "get", "pods", "-n", namespace, "-l", "job-name=ttl")["items"], 60)


def test_helm_is_built_and_on_path(ground):
    out = subprocess.run(["helm", "version", "--short"], capture_output=True, text=True, check=True).stdout
    assert out.startswith(ground.state["versions"]["helm"])


def test_env_command_prints_exports(ground):
    out = subprocess.run([sys.executable, "-m", "kubetune.cli", "dev", "env"], capture_output=True, text=True,
                         check=True).stdout
    for key in ("KUBECONFIG", "AWS_ENDPOINT_URL_S3", "KUBETUNE_S3_ENDPOINT", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "PATH"):
        assert f"export {key}=" in out
    # And it works: a shell that evals it reaches the cluster with the built kubectl.
    res = subprocess.run(["bash", "-c", out + "kubectl get ns default -o name"], capture_output=True, text=True)
    assert res.stdout.strip() == "namespace/default", res.stderr


def test_prometheus_scrapes_given_targets(ground):
    etcd = f"127.0.0.1:{ground.state['ports']['etcd']}"      # etcd serves /metrics on its client port
    g.start_prometheus(ground.lay, [etcd], log=lambda m: None)
    url = g.env_values(ground.lay)["KUBETUNE_PROMETHEUS_URL"]

    def up_value():
        with urllib.request.urlopen(f"{url}/api/v1/query?query=up", timeout=5) as r:
            result = json.load(r)["data"]["result"]
        return [s["value"][1] for s in result if s["metric"]["instance"] == etcd] == ["1"]

    wait_for("prometheus to scrape etcd", up_value, 60, 1)
