"""The Helm chart's sources, checked without any binary: CRDs in step with crds/, a strict values
schema, and alerts and dashboard that only use metrics the operator really exports.

helm and promtool checks (lint, render, schema errors as Helm prints them, promtool rule tests) are
in test_chart_tools.py, marked `tools`."""
from __future__ import annotations

import json
import re
import tomllib
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pytest
import yaml
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from kubetune.controller import metrics
from kubetune.controller.metrics import PHASES, JobRow, _Table

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
ALERTS = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
RULES = [r for g in ALERTS["groups"] for r in g["rules"]]
DASHBOARD = json.loads((CHART / "files" / "dashboard.json").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


# --- chart metadata and CRDs ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kubetune.io_finetunejobs.yaml", "kopf-peering.yaml"])
def test_chart_crds_are_identical_to_crds_folder(name):
    # crds/ is checked against the API models in test_crd.py; the chart ships the same bytes
    assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), \
        f"charts/kubetune/crds/{name} differs from crds/{name}: run `make crd`"


def test_chart_crds_folder_has_nothing_else():
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted(p.name for p in (REPO / "crds").iterdir())


def test_chart_app_version_is_the_package_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["apiVersion"] == "v2" and chart["name"] == "kubetune"
    assert chart["appVersion"] == version
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])


# --- values schema --------------------------------------------------------------------------------

# Kubernetes types passed through as they are: their own schema is the apiserver's.
PASSTHROUGH = {"podSecurityContext", "securityContext", "affinity", "global", "extraEnv[]"}


def _objects(node: dict, path: str = ""):
    if node.get("type") == "object":
        yield path, node
    for k, v in (node.get("properties") or {}).items():
        yield from _objects(v, f"{path}.{k}" if path else k)
    if isinstance(node.get("items"), dict):
        yield from _objects(node["items"], f"{path}[]")


def test_values_yaml_passes_its_schema():
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.Draft7Validator(SCHEMA).validate(VALUES)


def test_schema_is_strict_and_described():
    for path, node in _objects(SCHEMA):
        if path and not node.get("description"):
            pytest.fail(f"values.schema.json: {path} has no description")
        if node.get("properties") and path not in PASSTHROUGH:
            assert node.get("additionalProperties") is False, f"{path or 'the root'} accepts unknown keys"
    # and every value in values.yaml is declared (not only allowed by a loose parent)
    def walk(values: dict, schema: dict, path: str):
        for k, v in values.items():
            sub = (schema.get("properties") or {}).get(k)
            assert sub is not None, f"values.yaml: {path}{k} is not in values.schema.json"
            if isinstance(v, dict) and sub.get("properties"):
                walk(v, sub, f"{path}{k}.")
    walk(VALUES, SCHEMA, "")


@pytest.mark.parametrize("change,path,message", [
    ({"replicaCount": "two"}, ["replicaCount"], "is not of type 'integer'"),
    ({"replicas": 3}, [], "'replicas' was unexpected"),
    ({"image": {"pullPolicy": "Sometimes"}}, ["image", "pullPolicy"], "is not one of"),
    ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, ["metrics", "serviceMonitor", "enabled"], "not of type"),
    ({"watchNamespaces": ["Team_A"]}, ["watchNamespaces", 0], "does not match"),
    ({"operator": {"peeringName": "Kubetune"}}, ["operator", "peeringName"], "does not match"),
    ({"operator": {"retryInterval": 0}}, ["operator", "retryInterval"], "less than or equal to the minimum of 0"),
    ({"operator": {"peeringLifetime": 5}}, ["operator", "peeringLifetime"], "less than the minimum of 15"),
    ({"prometheusRule": {"disabledAlerts": ["HighCPU"]}}, ["prometheusRule", "disabledAlerts", 0], "does not match"),
    ({"podDisruptionBudget": {"minAvailable": "half"}}, ["podDisruptionBudget", "minAvailable"], "is not valid"),
])
def test_schema_rejects_bad_values_naming_them(change, path, message):
    def merge(base, over):
        return {**base, **{k: merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict)
                           else v for k, v in over.items()}}
    errors = list(jsonschema.Draft7Validator(SCHEMA).iter_errors(merge(VALUES, change)))
    assert len(errors) == 1, [e.message for e in errors]
    assert list(errors[0].absolute_path) == path and message in errors[0].message, errors[0].message


# --- metric names in alerts and dashboard ----------------------------------------------------------


def _exported() -> dict[str, tuple[str, set[str]]]:
    """Every series name the operator can export -> (family, its label names). Counters and
    histograms are read from their definitions (a labelled counter has no samples until its first
    increment); the per-job table from a row with every field set."""
    out: dict[str, tuple[str, set[str]]] = {}
    for obj in vars(metrics.Counters()).values():
        if hasattr(obj, "_labelnames") and hasattr(obj, "_type") and hasattr(obj, "_name"):
            labels = set(obj._labelnames)
            if obj._type == "counter":
                out[f"{obj._name}_total"] = (obj._name, labels)
            elif obj._type == "histogram":
                for suffix in ("_bucket", "_count", "_sum"):
                    out[obj._name + suffix] = (obj._name, labels | ({"le"} if suffix == "_bucket" else set()))
            else:
                out[obj._name] = (obj._name, labels)
    table = _Table()
    table.rows[("ns", "job")] = JobRow(phase="Running", step=1, total_steps=2, loss=1.0, eval_loss=1.0,
                                       tokens_per_second=1.0, checkpoint_time=datetime.now(timezone.utc),
                                       estimate_bytes=1, peak_bytes=1, objective_metrics={"rewardAccuracy": 1.0},
                                       evaluation={("tuned", "exactMatch"): 1.0})
    for fam in table.collect():
        assert isinstance(fam, (GaugeMetricFamily, CounterMetricFamily, HistogramMetricFamily))
        assert fam.samples, f"{fam.name}: no sample from a full row"
        out[fam.name] = (fam.name, set(fam.samples[0].labels))
    # The trainer pods' own series, as the chart's PodMonitor scrapes and relabels them.
    trainer = pytest.importorskip("kubetune_trainer.progress")
    m = trainer.Metrics(int(_free_port()))
    assert m.enabled
    for fam in m.registry.collect():
        for sample in fam.samples:
            out[sample.name] = (fam.name, {"namespace", "pod", "name", "run"})
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EXPORTED = _exported()


def _queries() -> list[tuple[str, str]]:
    out = [(f"alerts.yaml {r['alert']}", r["expr"]) for r in RULES]
    for p in DASHBOARD["panels"]:
        out += [(f"dashboard.json panel {p['title']!r}", t["expr"]) for t in p.get("targets", [])]
    out += [(f"dashboard.json variable {v['name']}", v["query"]["query"])
            for v in DASHBOARD["templating"]["list"] if v["type"] == "query"]
    return out


SELECTOR = re.compile(r"\b(kubetune_[a-z_]+)\b(\{[^}]*\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


@pytest.mark.parametrize("where,expr", _queries(), ids=lambda x: x if len(x) < 60 else None)
def test_queries_use_only_exported_metrics_and_labels(where, expr):
    found = SELECTOR.findall(expr)
    assert found, f"{where}: no kubetune metric in {expr!r}"
    for name, braces in found:
        assert name in EXPORTED, f"{where}: {name} is not a metric the operator or the trainer exports"
        labels = EXPORTED[name][1]
        for label, op, value in MATCHER.findall(braces or ""):
            assert label in labels, f"{where}: {name} has no label {label!r} (it has {sorted(labels)})"
            if label == "phase" and op == "=":
                assert value in PHASES, f"{where}: phase {value!r} is not one of {PHASES}"
    # by()/without() clauses only name labels that some metric of the query carries
    carried = set().union(*(EXPORTED[n][1] for n, _ in found))
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        for label in filter(None, (x.strip() for x in clause.split(","))):
            assert label in carried, f"{where}: groups by {label!r}, which none of its metrics has"


def test_the_check_above_catches_a_typo():
    # the metric set is not vacuous: a misspelt name is not in it
    assert "kubetune_training_step" in EXPORTED and "kubetune_training_steps" not in EXPORTED
    assert "kubetune_runs_failed_total" in EXPORTED and EXPORTED["kubetune_runs_failed_total"][1] == {"reason"}


# --- alert rules ------------------------------------------------------------------------------------

REQUIRED_ALERTS = {
    "KubetuneOperatorAbsent", "KubetuneReconcileErrors", "KubetuneRunFailed", "KubetuneRunOutOfMemory",
    "KubetuneJobUnschedulable", "KubetuneCheckpointStale", "KubetuneTrainingStalled", "KubetuneGPUMemoryAboveEstimate",
    "KubetuneCheckpointUploadsFailing",
}


def test_alerts_are_complete_and_actionable():
    names = [r["alert"] for r in RULES]
    assert len(names) == len(set(names)) and set(names) == REQUIRED_ALERTS
    for r in RULES:
        assert re.fullmatch(r"\d+[smh]", r.get("for", "")), f"{r['alert']}: no `for:`"
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"]["summary"] and len(r["annotations"]["description"]) > 120, r["alert"]
        assert set(r["annotations"]) == {"summary", "description"}


def test_every_alert_has_a_promtool_test_that_fires_it_and_one_that_stays_quiet():
    tests = yaml.safe_load((CHART / "files" / "alerts_test.yaml").read_text())
    assert tests["rule_files"] == ["alerts.yaml"]
    cases = [c for t in tests["tests"] for c in t["alert_rule_test"]]
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert fired == REQUIRED_ALERTS and quiet == REQUIRED_ALERTS


def test_per_job_alerts_name_the_job():
    for r in RULES:
        if "kubetune_finetunejob_phase" in r["expr"]:
            assert "{{ $labels.namespace }}/{{ $labels.name }}" in r["annotations"]["summary"], r["alert"]


# --- dashboard -------------------------------------------------------------------------------------

REQUIRED_PANELS = {
    "FineTuneJobs by phase", "Runs per hour", "Failed runs per hour by reason", "Reconcile duration",
    "Placement failures per hour by reason", "Progress", "Step", "Loss", "Tokens per second",
    "Seconds since checkpoint", "GPU memory per GPU: estimate vs peak",
}


def test_dashboard_has_variables_and_panels():
    assert 36 <= DASHBOARD["schemaVersion"] <= 41 and DASHBOARD["uid"]
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "job"} <= set(variables)
    panels = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
    assert REQUIRED_PANELS <= {p["title"] for p in panels}
    assert len({p["id"] for p in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
    quantiles = {t["legendFormat"] for p in panels if p["title"] == "Reconcile duration" for t in p["targets"]}
    assert quantiles == {"p50", "p99"}


def test_per_job_panels_follow_the_namespace_and_job_variables():
    for p in DASHBOARD["panels"]:
        for t in p.get("targets", []):
            if re.search(r"kubetune_(training|gpu_memory|finetunejob_phase)", t["expr"]):
                assert '{namespace=~"$namespace", name=~"$job"}' in t["expr"], (p["title"], t["expr"])


def test_dashboard_panels_do_not_overlap():
    cells: dict[tuple[int, int], str] = {}
    for p in DASHBOARD["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
