"""The Helm chart on the real control plane.

- `helm install` creates what the chart promises (under the `restricted` Pod Security Standard, so
  the apiserver itself checks the securityContext), and `helm uninstall` removes it.
- The chart's RBAC is enough, and only just: the operator runs locally as the chart's
  ServiceAccount (a token minted for it, in a kubeconfig of its own) and takes a FineTuneJob through
  placement, Running and deletion without a single Forbidden; an identity without the chart's RBAC
  gets Forbidden at once, so the log check can fail.
- Prometheus loads the alert rules and answers the dashboard's queries against a live operator.

KWOK also "runs" the chart's operator pods on a fake node: they do nothing, which is what lets the
local operator be the one that acts.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from kubetune.devenv.ground import prometheus_binary
from kubetune.devenv.ground import wait_until as wait_for

from opkit import Operator, _free_port, apply, put_progress, small_gpu_job, wait_phase

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
# 403 as a status, not the milliseconds of a log timestamp ("08:54:48,403")
DENIED = re.compile(r"Forbidden|(?<!,)\b403\b|Not enough permissions|APIForbiddenError")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["helm", *args], capture_output=True, text=True, timeout=180)
    if check and res.returncode:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{res.stderr}")
    return res


def gone(ground, *args: str) -> bool:
    res = ground.kubectl("get", *args, check=False)
    return res.returncode != 0 and "NotFound" in res.stderr


@contextmanager
def release(ground, namespace: str, *sets: str):
    """Install the chart as a uniquely named release; yields its full name; uninstalls at the end."""
    name = f"kt-{uuid.uuid4().hex[:6]}"
    helm("install", name, str(CHART), "-n", namespace, *[a for s in sets for a in ("--set", s)])
    try:
        yield f"{name}-kubetune"
    finally:
        helm("uninstall", name, "-n", namespace, "--wait", "--timeout", "60s", check=False)


@pytest.fixture
def extra_namespace(ground):
    name = f"it-{uuid.uuid4().hex[:8]}"
    ground.kubectl("create", "namespace", name)
    yield name
    ground.kubectl("delete", "namespace", name, "--wait=false", check=False)


# --- install / uninstall ----------------------------------------------------------------------------


def test_install_creates_the_operator_and_uninstall_removes_it(ground, namespace):
    # restricted: the apiserver's PodSecurity admission refuses the operator's pods unless the
    # chart's securityContext is right, and the rollout below would never complete
    ground.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    with release(ground, namespace) as full:
        dep = ground.kubectl_json("get", "deployment", full, "-n", namespace)
        assert dep["spec"]["replicas"] == 2
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert f"--peering={full}" in c["args"] and "--image=ghcr.io/kubetune/trainer:0.1.0" in c["args"]
        assert not any(a.startswith(("--standalone", "--namespace")) for a in c["args"])
        assert c["resources"]["limits"]["memory"] == "512Mi"
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz", "scheme": "HTTP"}
        ground.kubectl("rollout", "status", f"deployment/{full}", "-n", namespace, "--timeout=90s", timeout=120)

        sa = ground.kubectl_json("get", "serviceaccount", full, "-n", namespace)
        assert sa["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        binding = ground.kubectl_json("get", "clusterrolebinding", full)
        assert binding["roleRef"]["name"] == full
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": full, "namespace": namespace}]
        role = ground.kubectl_json("get", "clusterrole", full)
        assert any("finetunejobs" in r["resources"] for r in role["rules"])
        svc = ground.kubectl_json("get", "service", f"{full}-metrics", "-n", namespace)
        assert svc["spec"]["ports"][0]["port"] == 8080
        assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
        ground.kubectl("get", "clusterkopfpeering", full)
        assert ground.kubectl_json("get", "pdb", full, "-n", namespace)["spec"]["minAvailable"] == 1
        # the chart's crds/ are what is served (Helm skips CRDs that exist; they are identical)
        served = ground.kubectl_json("get", "crd", "finetunejobs.kubetune.io")
        chart_crd = yaml.safe_load((CHART / "crds" / "kubetune.io_finetunejobs.yaml").read_text())
        assert served["spec"]["versions"][0]["schema"] == chart_crd["spec"]["versions"][0]["schema"]
        ground.kubectl("get", "crd", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")
        status = helm("status", full.removesuffix("-kubetune"), "-n", namespace).stdout
        assert "STATUS: deployed" in status and "rollout status deployment/" + full in status

    for args in (("deployment", full, "-n", namespace), ("serviceaccount", full, "-n", namespace),
                 ("service", f"{full}-metrics", "-n", namespace), ("pdb", full, "-n", namespace),
                 ("clusterrole", full), ("clusterrolebinding", full), ("clusterkopfpeering", full)):
        wait_for(f"{args[0]} {full} deleted", lambda args=args: gone(ground, *args), 60)
    # CRDs outlive the release (Helm never deletes crds/): deleting them would delete every job
    ground.kubectl("get", "crd", "finetunejobs.kubetune.io")


def test_the_operator_names_its_peer_by_pod_not_by_a_passwd_lookup(ground):
    """kopf builds a peer identity with getpass unless POD_ID is set, and getpass needs a passwd entry
    that the image has not for uid 65532: without POD_ID the operator pod exits at start (seen on a
    real node, test_chart_operator.py). extraEnv comes after it, so it cannot drop it."""
    out = helm("template", "x", str(CHART), "--kube-version", "1.30.0",
               "--set", "extraEnv[0].name=HTTPS_PROXY,extraEnv[0].value=http://proxy:3128").stdout
    dep = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment")
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env == [{"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                   {"name": "HTTPS_PROXY", "value": "http://proxy:3128"}], env


def test_watch_namespaces_gives_roles_and_peerings_per_namespace(ground, namespace, extra_namespace):
    watched = [namespace, extra_namespace]
    with release(ground, namespace, f"watchNamespaces={{{','.join(watched)}}}", "replicaCount=1") as full:
        dep = ground.kubectl_json("get", "deployment", full, "-n", namespace)
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        assert [a for a in args if a.startswith("--namespace")] == [f"--namespace={n}" for n in watched]
        for ns in watched:
            binding = ground.kubectl_json("get", "rolebinding", full, "-n", ns)
            assert binding["subjects"][0] == {"kind": "ServiceAccount", "name": full, "namespace": namespace}
            ground.kubectl("get", "role", full, "-n", ns)
            ground.kubectl("get", "kopfpeering", full, "-n", ns)
        cluster_rules = ground.kubectl_json("get", "clusterrole", full)["rules"]
        assert not any("finetunejobs" in r["resources"] or "jobs" in r["resources"] for r in cluster_rules), \
            "the namespaced install must not grant FineTuneJobs or Jobs cluster-wide"
        assert gone(ground, "clusterkopfpeering", full)
        assert gone(ground, "pdb", full, "-n", namespace)  # one replica: no PDB
    for ns in watched:
        wait_for(f"role in {ns} deleted", lambda ns=ns: gone(ground, "role", full, "-n", ns), 60)
        wait_for(f"kopfpeering in {ns} deleted", lambda ns=ns: gone(ground, "kopfpeering", full, "-n", ns), 60)


# --- RBAC: the operator as the chart's ServiceAccount -----------------------------------------------


def sa_kubeconfig(ground, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig for the ServiceAccount: the ground's server and CA, a token minted for it."""
    token = ground.kubectl("create", "token", sa, "-n", namespace, "--duration", "1h").stdout.strip()
    admin = yaml.safe_load(Path(os.environ["KUBECONFIG"]).read_text())
    cluster = next(c for c in admin["clusters"]
                   if c["name"] == next(x for x in admin["contexts"]
                                        if x["name"] == admin["current-context"])["context"]["cluster"])
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "ground", "cluster": cluster["cluster"]}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "ground", "user": sa, "namespace": namespace}}],
    }))
    who = ground.kubectl_json("--kubeconfig", str(path), "auth", "whoami")
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:{sa}"
    return path


def start_operator(log: Path, kubeconfig: Path, peering: str, *extra: str) -> Operator:
    """`kubetune operator` as the chart runs it (peering on), but with the given identity. $KUBECONFIG
    stays the admin's: --kubeconfig alone must decide who the operator (kopf included) is."""
    op = Operator(log)
    op.proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune.cli", "operator", "--kubeconfig", str(kubeconfig), "--peering", peering,
         "--metrics-port", str(op.port), "--metrics-address", "127.0.0.1", "--liveness", "",
         "--progress-interval", "2", "--allow-endpoint", "127.0.0.1", *extra],
        stdout=log.open("a"), stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True)
    wait_for("operator /metrics", lambda: op.metrics() is not None, 30)
    return op


def run_a_job_through(ground, ns: str, op: Operator, name: str) -> None:
    apply(ground, ns, small_gpu_job(name, delay="120s"))
    obj = wait_phase(ground, ns, name, "Running", 60)
    assert obj["status"]["placement"]["node"].startswith("kwok-")
    job = ground.kubectl_json("get", "job", f"{name}-r1", "-n", ns)
    assert job["metadata"]["labels"]["kubetune.io/job"] == name
    ground.kubectl("get", "configmap", f"{name}-r1-config", "-n", ns)
    assert "kubetune.io/finalizer" in obj["metadata"]["finalizers"]
    wait_for("per-job phase metric", lambda: op.metric("kubetune_finetunejob_phase", namespace=ns, name=name,
                                                       phase="Running") == 1.0, 30)
    events = ground.kubectl_json("get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}")
    assert "Placed" in {e["reason"] for e in events["items"]}, "the operator could not post Events"

    ground.kubectl("delete", "ftj", name, "-n", ns, "--wait=false")
    wait_for(f"{name} finalized", lambda: gone(ground, "ftj", name, "-n", ns), 60)
    wait_for("its Job deleted", lambda: gone(ground, "job", f"{name}-r1", "-n", ns), 60)
    assert gone(ground, "configmap", f"{name}-r1-config", "-n", ns)
    # the children's DELETED events must not make the operator recreate them for the deleted job
    time.sleep(2)
    log = op.log.read_text(errors="replace")
    assert f"{name}: JobCreated" not in log[log.index(f"{name}: deleted"):], "Job recreated after deletion"
    assert gone(ground, "job", f"{name}-r1", "-n", ns)


def finalize_all(ground, ns: str) -> None:
    """Delete what a test left while its operator still runs, so nothing waits on a finalizer."""
    ground.kubectl("delete", "ftj", "--all", "-n", ns, "--wait=false", check=False)
    wait_for(f"FineTuneJobs in {ns} finalized",
             lambda: not ground.kubectl("get", "ftj", "-n", ns, "-o", "name").stdout.strip(), 60)


def assert_never_denied(op: Operator) -> None:
    op.stop()
    log = op.log.read_text(errors="replace")
    print(f"--- {op.log} (last 6 kB)\n{log[-6000:]}")
    denied = [line for line in log.splitlines() if DENIED.search(line)]
    assert not denied, "the chart's RBAC denied the operator:\n" + "\n".join(denied[:20])


def test_cluster_wide_rbac_is_enough_for_the_operator(ground, crds, ns, tmp_path):
    with release(ground, ns) as full:
        kc = sa_kubeconfig(ground, ns, full, tmp_path / "sa.kubeconfig")
        op = start_operator(tmp_path / "operator.log", kc, full)
        try:
            run_a_job_through(ground, ns, op, "chart-rbac")
            peering = ground.kubectl_json("get", "clusterkopfpeering", full)
            assert peering.get("status"), "the operator never wrote its keep-alive into the peering object"
        finally:
            finalize_all(ground, ns)
            assert_never_denied(op)


def test_namespaced_rbac_is_enough_for_the_operator(ground, crds, ns, tmp_path):
    with release(ground, ns, f"watchNamespaces={{{ns}}}") as full:
        kc = sa_kubeconfig(ground, ns, full, tmp_path / "sa.kubeconfig")
        op = start_operator(tmp_path / "operator.log", kc, full, "--namespace", ns)
        try:
            run_a_job_through(ground, ns, op, "chart-rbac-ns")
            assert ground.kubectl_json("get", "kopfpeering", full, "-n", ns).get("status")
            # and it really is confined: the same identity cannot touch FineTuneJobs elsewhere
            can = ground.kubectl("--kubeconfig", str(kc), "auth", "can-i", "list", "finetunejobs.kubetune.io",
                                 "-n", "default", check=False)
            assert can.stdout.strip() == "no"
        finally:
            finalize_all(ground, ns)
            assert_never_denied(op)


def test_an_identity_without_the_charts_rbac_is_denied(ground, crds, namespace, tmp_path):
    """The control for the two tests above: without the chart's RBAC the log shows Forbidden, so
    their clean logs mean something (and --kubeconfig really is what kopf logs in with)."""
    ground.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    kc = sa_kubeconfig(ground, namespace, "nobody", tmp_path / "nobody.kubeconfig")
    op = start_operator(tmp_path / "operator.log", kc, "kubetune")
    try:
        wait_for("Forbidden in the log", lambda: DENIED.search(op.log.read_text(errors="replace")), 30)
    finally:
        op.stop()


# --- alerts and dashboard against a real Prometheus --------------------------------------------------


@contextmanager
def prometheus(tmp_path: Path, target: str):
    """Prometheus scraping one target every second, with the chart's alert rules loaded."""
    port = _free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(CHART / "files" / "alerts.yaml")],
        "scrape_configs": [{"job_name": "kubetune-operator", "static_configs": [{"targets": [target]}]}],
    }))
    log = tmp_path / "prometheus.log"
    proc = subprocess.Popen([prometheus_binary(), f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False
    try:
        wait_for("prometheus ready", ready, 60)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


def api(url: str, path: str, **params) -> dict:
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def dashboard_queries(namespace: str) -> list[tuple[str, str]]:
    dash = json.loads((CHART / "files" / "dashboard.json").read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            expr = (t["expr"].replace("$__rate_interval", "1m").replace("$namespace", namespace)
                    .replace("$job", ".*"))
            out.append((p["title"], expr))
    return out


def test_prometheus_loads_the_alerts_and_answers_the_dashboard(ground, crds, ns, tmp_path):
    op = Operator(tmp_path / "operator.log")
    op.start()
    try:
        apply(ground, ns, small_gpu_job("dash", delay="120s"))
        wait_phase(ground, ns, "dash", "Running", 60)
        put_progress(ground, ns, "dash", 1, step=40, total=100, loss=1.25, ckpt_step=40)
        wait_for("progress in /metrics", lambda: op.metric("kubetune_training_step", namespace=ns, name="dash"), 30)
        with prometheus(tmp_path, f"127.0.0.1:{op.port}") as url:
            groups = api(url, "rules")["groups"]
            rules = {r["name"]: r for g in groups for r in g["rules"]}
            source = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
            assert set(rules) == {r["alert"] for g in source["groups"] for r in g["rules"]}
            # the rule manager evaluates them against the live operator without an error
            wait_for("rules evaluated", lambda: all(r.get("lastEvaluation", "").startswith("20") for r in
                                                    (r for g in api(url, "rules")["groups"] for r in g["rules"])), 30)
            bad = {r["name"]: r.get("lastError") for g in api(url, "rules")["groups"] for r in g["rules"]
                   if r["health"] != "ok"}
            assert not bad, bad
            def three_scrapes() -> bool:
                result = api(url, "query", query="kubetune_finetunejobs[1m]")["result"]
                return bool(result) and len(result[0]["values"]) >= 3

            wait_for("three scrapes for rate()", three_scrapes, 30)
            # the operator is scraped: the absence alert (pending before the first scrape) goes quiet
            wait_for("KubetuneOperatorAbsent inactive", lambda: next(
                r for g in api(url, "rules")["groups"] for r in g["rules"]
                if r["name"] == "KubetuneOperatorAbsent")["state"] == "inactive", 30)
            results = {}
            for title, expr in dashboard_queries(ns):
                results[(title, expr)] = api(url, "query", query=expr)["result"]  # every query parses and runs
            must_have_data = ["FineTuneJobs by phase", "Runs per hour", "Progress", "Step", "Loss",
                              "Tokens per second", "Seconds since checkpoint", "GPU memory per GPU: estimate vs peak",
                              "FineTuneJobs"]
            for title in must_have_data:
                assert any(r for (t, _), r in results.items() if t == title), f"dashboard panel {title!r}: no data"
            progress = next(r for (t, _), r in results.items() if t == "Progress")
            assert any(s["metric"] == {"namespace": ns, "name": "dash"} and float(s["value"][1]) == 0.4
                       for s in progress)
    finally:
        ground.kubectl("delete", "ftj", "dash", "-n", ns, "--wait=false", check=False)
        wait_for("dash finalized", lambda: gone(ground, "ftj", "dash", "-n", ns), 60)
        op.stop()
