"""The chart's operator as a real pod: `helm install` charts/kubetune with the operator image on the
real kubelet node real-0 (containerd, runc), under the chart's ServiceAccount and the restricted Pod
Security Standard, reaching the apiserver in-cluster and S3 at the pods' endpoint.

- The quickstart goes through that operator to Succeeded, its trainer pod in the trainer image on real-0.
- The leader is force-deleted while it reconciles a FineTuneJob: after leader election the job still
  Succeeds, with exactly one Job for its run (no duplicate from the new leader).

test_chart.py covers the chart's objects and RBAC with a host-process operator; this is what only a
real node shows: the image, its securityContext and the in-cluster wiring, as `make demo` runs them.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kubetune.demo import chart_values, quickstart_for_node
from kubetune.devenv import images
from kubetune.devenv.ground import wait_until as wait_for

from opkit import apply, prepare_real_nodes, wait_phase

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"


@pytest.fixture(scope="module")
def real_node(ground, crds) -> dict:
    """real-0 with both images imported."""
    return prepare_real_nodes(ground, names=("operator", "trainer"))[0]


@pytest.fixture
def operator_ns(ground) -> Iterator[str]:
    """The release's namespace, enforcing restricted: the apiserver refuses the operator's pod unless
    the chart's securityContext meets it."""
    name = f"it-op-{uuid.uuid4().hex[:6]}"
    ground.kubectl("create", "namespace", name)
    ground.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
    yield name
    ground.kubectl("delete", "namespace", name, "--wait=false", check=False)


def helm(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run(["helm", *args], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"helm {' '.join(args)} failed:\n{res.stderr}"
    return res


@contextmanager
def chart_operator(ground, namespace: str, node: dict, jobs_ns: str, replicas: int,
                   peering_lifetime: int = 60) -> Iterator[str]:
    """The chart installed with the demo's values (pinned to the real node); yields the full name.
    At the end the jobs namespace's FineTuneJobs are deleted while the operator can still finalize
    them, then the release is uninstalled."""
    name = f"kt-{uuid.uuid4().hex[:6]}"
    with tempfile.NamedTemporaryFile("w", suffix=".json") as vf:
        # the release's mark on its trainer pods (--trainer-env): proof that this operator made the Job
        values = chart_values(node["name"], replicas, 2, trainer_env={"TEST_CHART_RELEASE": name})
        values["operator"]["peeringLifetime"] = peering_lifetime
        json.dump(values, vf)
        vf.flush()
        t0 = time.monotonic()
        helm("install", name, str(CHART), "-n", namespace, "-f", vf.name, "--wait", "--timeout", "180s")
        print(f"\nhelm install --wait: {time.monotonic() - t0:.1f} s")
    full = f"{name}-kubetune"
    try:
        # Ready is the liveness port only; a peer record is kopf running (a crash at start passed --wait)
        pods = [p["metadata"]["name"] for p in _operator_pods(ground, namespace)]
        wait_for("every replica in the peering", lambda: all(
            p in (ground.kubectl_json("get", "clusterkopfpeering", full).get("status") or {}) for p in pods), 90)
        yield full
    finally:
        ground.kubectl("delete", "ftj", "--all", "-n", jobs_ns, "--timeout=90s", check=False, timeout=120)
        subprocess.run(["helm", "uninstall", name, "-n", namespace, "--wait", "--timeout", "90s"],
                       capture_output=True, timeout=120)


def _job(name: str, ground, node: dict, steps: int) -> dict:
    obj = quickstart_for_node(ground.state["real_nodes"]["pod_endpoints"]["s3"], node["name"])
    obj["metadata"]["name"] = name
    obj["spec"]["training"] |= {"maxSteps": steps, "evalSteps": steps // 2, "loggingSteps": 1}
    obj["spec"]["checkpoints"] |= {"saveSteps": steps // 2}
    return obj


def _operator_pods(ground, namespace: str) -> list[dict]:
    return ground.kubectl_json("get", "pods", "-n", namespace, "-l", "app.kubernetes.io/name=kubetune")["items"]


def _trainer_pods(ground, ns: str, name: str) -> list[dict]:
    return ground.kubectl_json("get", "pods", "-n", ns, "-l", f"kubetune.io/job={name}")["items"]


def _leader(ground, peering: str, pods: list[str]) -> str | None:
    """The pod whose peer has the highest priority in the ClusterKopfPeering: the one that acts (the
    chart names each peer by its pod, POD_ID)."""
    peers = ground.kubectl_json("get", "clusterkopfpeering", peering).get("status") or {}
    ranked = sorted(((p.get("priority", 0), ident) for ident, p in peers.items() if p), reverse=True)
    return next((ident for _, ident in ranked if ident in pods), None)


def test_the_quickstart_succeeds_through_the_charts_operator_pod(ground, real_node, ns, operator_ns):
    t0 = time.monotonic()
    with chart_operator(ground, operator_ns, real_node, ns, replicas=1) as full:
        (op,) = _operator_pods(ground, operator_ns)
        assert op["spec"]["nodeName"] == real_node["name"]
        assert op["spec"]["serviceAccountName"] == full
        psc = op["spec"]["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 65532, psc
        (ocs,) = op["status"]["containerStatuses"]
        assert ocs["containerID"].startswith("containerd://") and ocs["ready"], ocs
        assert ocs["image"].endswith(images.IMAGES["operator"].ref()), ocs["image"]

        apply(ground, ns, _job("chart-quickstart", ground, real_node, 40))
        done = wait_phase(ground, ns, "chart-quickstart", "Succeeded", 600)

        (pod,) = _trainer_pods(ground, ns, "chart-quickstart")
        assert pod["spec"]["nodeName"] == real_node["name"]
        (cs,) = pod["status"]["containerStatuses"]
        assert cs["containerID"].startswith("containerd://"), cs
        assert cs["image"].endswith(images.IMAGES["trainer"].ref()), cs["image"]
        assert cs["state"]["terminated"]["exitCode"] == 0
        sec = pod["spec"]["securityContext"]
        assert sec["runAsNonRoot"] and sec["runAsUser"] == 1000, sec  # the image's user, not root
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env") or []}
        assert env.get("TEST_CHART_RELEASE") == full.removesuffix("-kubetune"), env

        m = done["status"]["result"]["metrics"]
        assert m["steps"] == 40 and m["evalLoss"] < m["baseEvalLoss"], m
        ev = done["status"]["result"]["evaluation"]
        assert ev["tuned"]["loss"] < ev["base"]["loss"], ev
        bucket, _, key = done["status"]["result"]["adapterUri"][len("s3://"):].partition("/")
        got = {o["Key"] for o in ground.s3().list_objects_v2(Bucket=bucket, Prefix=key)["Contents"]}
        assert f"{key.rstrip('/')}/adapter_model.safetensors" in got, got
        # no other operator runs in this module: the pod is the one peer of its release's peering
        assert _leader(ground, full, [op["metadata"]["name"]]) == op["metadata"]["name"]
    print(f"operator pod {op['metadata']['name']} (sa {full}, uid 65532) on {op['spec']['nodeName']}; trainer "
          f"{cs['containerID'][:25]}...; eval loss {m['baseEvalLoss']:.2f} -> {m['evalLoss']:.2f} in {m['steps']} "
          f"steps; {time.monotonic() - t0:.0f} s in all")


def test_the_leader_killed_mid_reconcile_leaves_one_job_that_succeeds(ground, real_node, ns, operator_ns):
    """Two replicas share the release's ClusterKopfPeering; the leader is force-deleted (no grace, as a
    node loss would) as soon as the run's Job exists, while it is still reconciling the FineTuneJob.
    The standby, or the Deployment's replacement pod, takes over when the dead peer's record lapses
    (operator.peeringLifetime 15 s here, 60 by default), finds the Job by its name and adopts it
    instead of creating another."""
    with chart_operator(ground, operator_ns, real_node, ns, replicas=2, peering_lifetime=15) as full:
        names = [p["metadata"]["name"] for p in _operator_pods(ground, operator_ns)]
        assert len(names) == 2, names
        leader = wait_for("a leader in the peering", lambda: _leader(ground, full, names), 60)

        apply(ground, ns, _job("chart-failover", ground, real_node, 60))  # short: the failover, not the run, is tested
        jobs = wait_for("the run's Job", lambda: ground.kubectl_json("get", "jobs", "-n", ns)["items"], 120, 0.2)
        at_kill = (ground.kubectl_json("get", "ftj", "chart-failover", "-n", ns).get("status") or {}).get("phase")
        t_kill = time.monotonic()
        ground.kubectl("delete", "pod", leader, "-n", operator_ns, "--grace-period=0", "--force")

        done = wait_phase(ground, ns, "chart-failover", "Succeeded", 600)
        took = time.monotonic() - t_kill
        after = [p["metadata"]["name"] for p in _operator_pods(ground, operator_ns)]
        new_leader = _leader(ground, full, after)
        final_jobs = ground.kubectl_json("get", "jobs", "-n", ns)["items"]

    assert leader not in after and new_leader is not None and new_leader != leader, (leader, after, new_leader)
    assert [j["metadata"]["name"] for j in final_jobs] == [jobs[0]["metadata"]["name"]] == ["chart-failover-r1"]
    assert done["status"]["run"] == 1, done["status"]
    env = {e["name"]: e.get("value") for e in final_jobs[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env.get("TEST_CHART_RELEASE") == full.removesuffix("-kubetune"), env
    assert done["status"]["result"]["metrics"]["steps"] == 60
    print(f"\nleader {leader} force-deleted with the job {at_kill} and its Job created; {new_leader} led after; "
          f"one Job ({final_jobs[0]['metadata']['name']}), Succeeded {took:.0f} s after the kill")
