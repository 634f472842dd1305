"""The Helm chart through the real tools: `helm lint --strict`, `helm template` under several value
sets (kinds, valid YAML, least-privilege RBAC, security context), the values schema as Helm
enforces it, and `promtool check/test rules` on the alerts.

Marked `tools`: they need the helm the test ground builds (`kubetune dev build`) and promtool (the
Debian prometheus package), so `make test-fast` stays binary-free; `make test` runs them after
building. A missing binary is a failure that says how to get it, never a skip. No cluster is used.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kubetune.devenv import paths

pytestmark = pytest.mark.tools

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
KUBE_VERSION = paths.KUBERNETES_VERSIONS[0]  # render for the ground's Kubernetes


def _helm() -> str:
    pinned = paths.bin_cache("helm", paths.HELM_VERSION) / "helm"
    found = str(pinned) if pinned.exists() else shutil.which("helm")
    if not found:
        pytest.fail(f"helm not found ({pinned} or on PATH): build it with `kubetune dev build` (or make ground-build)",
                    pytrace=False)
    return found


def _promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        from kubetune.devenv.ground import GroundError, prometheus_binary

        try:  # installs the Debian prometheus package (which has promtool) when root, as the ground does
            found = shutil.which("promtool", path=str(Path(prometheus_binary()).parent))
        except GroundError:
            found = None
    if not found:
        pytest.fail("promtool not found: install the prometheus package (`apt-get install prometheus`, which "
                    "`kubetune dev prometheus` does when root)", pytrace=False)
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([_helm(), *args], capture_output=True, text=True, timeout=60)
    if check and res.returncode:
        pytest.fail(f"helm {' '.join(args)}:\n{res.stderr}", pytrace=False)
    return res


def render(*sets: str, namespace: str = "kubetune", check: bool = True) -> list[dict]:
    args = ["template", "kt", str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    out = helm(*args, check=check).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def kinds(docs: list[dict]) -> list[tuple[str, str | None, str]]:
    return sorted((d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs)


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


MONITORING = ("metrics.serviceMonitor.enabled=true", "podMonitor.enabled=true", "prometheusRule.enabled=true",
              "dashboard.enabled=true")
VALUE_SETS = {
    "defaults": (),
    "watchNamespaces": ("watchNamespaces={team-a,team-b}",),
    "one replica": ("replicaCount=1",),
    "monitoring": MONITORING,
    "everything": (*MONITORING, "watchNamespaces={team-a}", "replicaCount=3", "image.digest=sha256:" + "a" * 64,
                   "serviceAccount.annotations.team=ml", "podAnnotations.a=b", "priorityClassName=high",
                   "operator.verbose=true", "operator.extraArgs={--priority=7}", "extraEnv[0].name=X",
                   "extraEnv[0].value=y", "nodeSelector.pool=system", "tolerations[0].operator=Exists",
                   "livenessProbe.enabled=false", "metrics.service.enabled=false",
                   "huggingface.endpoint=https://hf-mirror.internal", "operator.peeringLifetime=20"),
}


def test_helm_lint_strict():
    res = helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, check=False)
    assert res.returncode == 0 and "0 chart(s) failed" in res.stdout, res.stdout + res.stderr


def test_lint_strict_with_everything_on():
    sets = [a for s in VALUE_SETS["everything"] for a in ("--set", s)]
    res = helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *sets, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_document_is_a_valid_labelled_object(name):
    docs = render(*VALUE_SETS[name])
    assert docs
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), d
        labels = d["metadata"].get("labels") or {}
        assert labels.get("app.kubernetes.io/name") == "kubetune", (d["kind"], labels)
        assert labels.get("app.kubernetes.io/instance") == "kt" and labels.get("app.kubernetes.io/managed-by") == "Helm"
        assert labels.get("helm.sh/chart") == "kubetune-0.1.0"
    names = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "two objects with one name"


def test_defaults_render_the_cluster_wide_operator():
    assert kinds(render()) == [
        ("ClusterKopfPeering", None, "kt-kubetune"),
        ("ClusterRole", None, "kt-kubetune"),
        ("ClusterRoleBinding", None, "kt-kubetune"),
        ("Deployment", "kubetune", "kt-kubetune"),
        ("PodDisruptionBudget", "kubetune", "kt-kubetune"),
        ("Service", "kubetune", "kt-kubetune-metrics"),
        ("ServiceAccount", "kubetune", "kt-kubetune"),
    ]


def test_watch_namespaces_render_roles_and_peerings_per_namespace():
    assert kinds(render("watchNamespaces={team-a,team-b}")) == [
        ("ClusterRole", None, "kt-kubetune"),
        ("ClusterRoleBinding", None, "kt-kubetune"),
        ("Deployment", "kubetune", "kt-kubetune"),
        ("KopfPeering", "team-a", "kt-kubetune"),
        ("KopfPeering", "team-b", "kt-kubetune"),
        ("PodDisruptionBudget", "kubetune", "kt-kubetune"),
        ("Role", "team-a", "kt-kubetune"),
        ("Role", "team-b", "kt-kubetune"),
        ("RoleBinding", "team-a", "kt-kubetune"),
        ("RoleBinding", "team-b", "kt-kubetune"),
        ("Service", "kubetune", "kt-kubetune-metrics"),
        ("ServiceAccount", "kubetune", "kt-kubetune"),
    ]


def test_monitoring_objects_only_when_enabled():
    base = {k for k, _, _ in kinds(render())}
    assert not base & {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"}
    assert {k for k, _, _ in kinds(render(*MONITORING))} - base == {"ServiceMonitor", "PodMonitor", "PrometheusRule",
                                                                    "ConfigMap"}


def _rules(role: dict) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


NAMESPACED = {
    *{("kubetune.io", "finetunejobs", v) for v in ("get", "list", "watch", "patch")},
    ("kubetune.io", "finetunejobs/status", "patch"), ("kubetune.io", "finetunejobs/finalizers", "update"),
    *{("batch", "jobs", v) for v in ("get", "list", "watch", "create", "patch", "delete")},
    *{("", r, v) for r in ("configmaps", "services") for v in ("get", "list", "create", "delete")},
    ("", "pods", "list"), ("", "secrets", "get"), ("", "persistentvolumeclaims", "get"), ("", "serviceaccounts", "get"),
    ("", "events", "create"), ("", "events", "list"),
}
CLUSTER = {("", "nodes", "list"), ("", "nodes", "watch"), ("", "pods", "list"),
           ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
           ("apiextensions.k8s.io", "customresourcedefinitions", "watch")}
PEERING = lambda plural: {("kopf.dev", plural, v) for v in ("list", "watch", "patch")}  # noqa: E731


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses():
    # tests/integration/test_chart.py proves it is enough; this pins that it is no more
    role = one(render(), "ClusterRole")
    assert _rules(role) == NAMESPACED | CLUSTER | PEERING("clusterkopfpeerings")
    assert not any("*" in x for rule in role["rules"] for x in (*rule["resources"], *rule["verbs"]))


def test_namespaced_rbac_grants_jobs_only_in_the_watched_namespaces():
    docs = render("watchNamespaces={team-a,team-b}")
    cluster = one(docs, "ClusterRole")
    assert _rules(cluster) == CLUSTER | {("", "namespaces", "list"), ("", "namespaces", "watch")}
    roles = [d for d in docs if d["kind"] == "Role"]
    assert {r["metadata"]["namespace"] for r in roles} == {"team-a", "team-b"}
    for role in roles:
        assert _rules(role) == NAMESPACED | PEERING("kopfpeerings")
    for b in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": "kubetune"}]


def test_no_rbac_when_disabled_and_an_existing_service_account_is_required():
    assert not {"ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding"} & {
        k for k, _, _ in kinds(render("rbac.create=false"))}
    res = helm("template", "kt", str(CHART), "--kube-version", KUBE_VERSION, "--set", "serviceAccount.create=false",
               check=False)
    assert res.returncode != 0 and "serviceAccount.name is required" in res.stderr
    dep = one(render("serviceAccount.create=false", "serviceAccount.name=ops"), "Deployment")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


def _container(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_deployment_runs_peered_restricted_and_bounded():
    docs = render()
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = _container(docs)
    assert dep["spec"]["replicas"] == 2
    assert c["args"] == ["--peering=kt-kubetune", "--image=ghcr.io/kubetune/trainer:0.1.0", "--metrics-port=8080",
                         "--liveness=http://0.0.0.0:8081/healthz", "--progress-interval=10", "--retry-interval=30",
                         "--peering-lifetime=60"]
    assert c["image"] == "ghcr.io/kubetune/operator:0.1.0" and "command" not in c  # the image's entrypoint
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert c["resources"]["limits"] == {"memory": "512Mi"} and c["resources"]["requests"]["memory"] == "256Mi"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http-metrics": 8080, "healthz": 8081}
    svc = one(docs, "Service")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http-metrics"
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "kt-kubetune"  # what --peering names
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["podAffinityTerm"]["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_one_replica_keeps_peering_and_has_no_pdb():
    docs = render("replicaCount=1")
    assert "--peering=kt-kubetune" in _container(docs)["args"]
    assert not any(a.startswith("--standalone") for a in _container(docs)["args"])
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]


def test_values_reach_the_deployment():
    docs = render(*VALUE_SETS["everything"])
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = _container(docs)
    assert dep["spec"]["replicas"] == 3
    assert c["image"] == "ghcr.io/kubetune/operator@sha256:" + "a" * 64
    assert c["args"] == ["--peering=kt-kubetune", "--image=ghcr.io/kubetune/trainer:0.1.0",
                         "--hf-endpoint=https://hf-mirror.internal", "--metrics-port=8080",
                         "--liveness=", "--progress-interval=10", "--retry-interval=30",
                         "--peering-lifetime=20", "--namespace=team-a",
                         "--verbose", "--priority=7"]
    assert "livenessProbe" not in c and [p["name"] for p in c["ports"]] == ["http-metrics"]
    # POD_ID first: kopf's peer identity (the image has no passwd entry for getpass to read); then extraEnv
    assert c["env"] == [{"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "X", "value": "y"}]
    assert pod["priorityClassName"] == "high" and pod["nodeSelector"] == {"pool": "system"}
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert dep["spec"]["template"]["metadata"]["annotations"] == {"a": "b"}
    assert one(docs, "ServiceAccount")["metadata"]["annotations"] == {"team": "ml"}
    assert not [d for d in docs if d["kind"] == "Service"]
    pm = one(docs, "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}


def test_trainer_image_follows_its_values():
    args = _container(render("trainer.image.repository=registry.local/trainer", "trainer.image.tag=dev"))["args"]
    assert "--image=registry.local/trainer:dev" in args


def test_a_hub_mirror_reaches_the_operator_and_a_bad_one_is_refused_at_install():
    assert not any(a.startswith("--hf-endpoint") for a in _container(render())["args"])
    args = _container(render("huggingface.endpoint=https://hf-mirror.internal"))["args"]
    assert "--hf-endpoint=https://hf-mirror.internal" in args
    res = helm("template", "kt", str(CHART), "--set", "huggingface.endpoint=hf-mirror:8080", check=False)
    assert res.returncode != 0 and "/huggingface/endpoint" in res.stderr and "does not match pattern" in res.stderr


def test_trainer_env_reaches_the_operator_quoted_and_a_bad_name_is_refused_at_install():
    args = _container(render("trainer.env.HTTPS_PROXY=http://proxy:3128",
                             "trainer.env.NO_PROXY=.svc\\,10.0.0.0/8 # internal"))["args"]
    assert [a for a in args if a.startswith("--trainer-env")] == [
        "--trainer-env=HTTPS_PROXY=http://proxy:3128", "--trainer-env=NO_PROXY=.svc,10.0.0.0/8 # internal"]
    res = helm("template", "kt", str(CHART), "--set", "trainer.env.bad-name=x", check=False)
    # the error names the value's path (propertyNames made Helm name a neighbouring one)
    assert res.returncode != 0 and "at '/trainer/env': additional properties 'bad-name' not allowed" in res.stderr


def test_monitors_select_what_the_operator_labels():
    docs = render(*MONITORING)
    sm = one(docs, "ServiceMonitor")
    svc = one(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True  # keep the FineTuneJob's namespace label
    pm = one(docs, "PodMonitor")
    from kubetune.controller.manifests import LABEL_JOB, METRICS_PORT, RunIdentity

    assert pm["spec"]["selector"] == {"matchExpressions": [{"key": LABEL_JOB, "operator": "Exists"}]}
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    # the trainer container really names its metrics port so
    from kubetune.controller import manifests

    assert '"name": "metrics", "containerPort": METRICS_PORT' in Path(manifests.__file__).read_text()
    assert METRICS_PORT and LABEL_JOB in RunIdentity("n", "j", "u", 1).labels()


def test_dashboard_configmap_carries_the_dashboard_for_the_sidecar():
    cm = one(render("dashboard.enabled=true", "dashboard.namespace=monitoring",
                    "dashboard.annotations.grafana_folder=ML"), "ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ML"}
    assert json.loads(cm["data"]["kubetune.json"]) == json.loads((CHART / "files" / "dashboard.json").read_text())


def test_prometheus_rule_wraps_alerts_yaml(tmp_path):
    source = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    pr = one(render("prometheusRule.enabled=true", "prometheusRule.labels.release=kps"), "PrometheusRule")
    assert pr["metadata"]["labels"]["release"] == "kps"
    assert pr["spec"] == source  # one copy: the same rules, in the same order
    pr = one(render("prometheusRule.enabled=true", "prometheusRule.additionalRuleLabels.team=ml",
                    "prometheusRule.additionalRuleLabels.severity=page",
                    "prometheusRule.disabledAlerts={KubetuneTrainingStalled,KubetuneCheckpointStale}"),
             "PrometheusRule")
    rules = {r["alert"]: r for g in pr["spec"]["groups"] for r in g["rules"]}
    assert set(rules) == {r["alert"] for g in source["groups"] for r in g["rules"]} - {
        "KubetuneTrainingStalled", "KubetuneCheckpointStale"}
    assert rules["KubetuneOperatorAbsent"]["labels"] == {"severity": "critical", "team": "ml"}  # own severity wins
    # what the Prometheus Operator will load is a valid rule file
    (tmp_path / "rendered.yaml").write_text(yaml.safe_dump(pr["spec"]))
    res = subprocess.run([_promtool(), "check", "rules", str(tmp_path / "rendered.yaml")], capture_output=True,
                         text=True)
    assert res.returncode == 0 and "SUCCESS: 7 rules found" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("setting,where,why", [
    ("replicaCount=two", "'/replicaCount'", "got string, want integer"),
    ("replicas=3", "''", "additional properties 'replicas' not allowed"),
    ("image.pullPolicy=Sometimes", "'/image/pullPolicy'", "value must be one of"),
    ("image.tagg=1.0", "'/image'", "additional properties 'tagg' not allowed"),
    ("watchNamespaces[0]=Team_A", "'/watchNamespaces/0'", "does not match pattern"),
    ("metrics.serviceMonitor.enabled=yes", "'/metrics/serviceMonitor/enabled'", "got string, want boolean"),
    ("metrics.port=80800", "'/metrics/port'", "maximum"),
    ("prometheusRule.disabledAlerts[0]=HighCPU", "'/prometheusRule/disabledAlerts/0'", "does not match pattern"),
])
def test_helm_rejects_bad_values_naming_them(setting, where, why):
    res = helm("template", "kt", str(CHART), "--kube-version", KUBE_VERSION, "--set", setting, check=False)
    assert res.returncode != 0
    assert "values don't meet the specifications of the schema" in res.stderr, res.stderr
    assert f"at {where}: " in res.stderr and why in res.stderr, res.stderr


def test_promtool_checks_the_alert_rules():
    res = subprocess.run([_promtool(), "check", "rules", str(CHART / "files" / "alerts.yaml")], capture_output=True,
                         text=True)
    assert res.returncode == 0 and "SUCCESS: 9 rules found" in res.stdout, res.stdout + res.stderr


def test_promtool_rule_tests_pass():
    # each alert fires on the synthetic series of its failure and stays quiet on a healthy fleet
    res = subprocess.run([_promtool(), "test", "rules", str(CHART / "files" / "alerts_test.yaml")],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


def test_promtool_rule_tests_can_fail(tmp_path):
    # the rule tests are not vacuous: without the clause for a counter's first sample, the first
    # failure of a new reason goes unseen and the tests say so
    text = (CHART / "files" / "alerts.yaml").read_text()
    broken = text.replace('(kubetune_runs_failed_total{reason!="OutOfMemory"} unless kubetune_runs_failed_total '
                          'offset 10m)', '(vector(0) > 1)')
    assert broken != text
    (tmp_path / "alerts.yaml").write_text(broken)
    shutil.copy(CHART / "files" / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    res = subprocess.run([_promtool(), "test", "rules", str(tmp_path / "alerts_test.yaml")], capture_output=True,
                         text=True)
    assert res.returncode != 0 and "alertname: KubetuneRunFailed, time: 32m" in res.stdout + res.stderr
