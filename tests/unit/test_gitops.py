"""kubetune's GitOps health checks, evaluated as Argo CD and Flux evaluate them: integrations/argocd's
health.lua under gopher-lua with Argo CD's argocd-cm settings (no Lua string library), and
integrations/flux's healthCheckExprs under cel-go with kustomize-controller's rules. The harness
(tests/gitops/healthcheck) is built from Go modules on first use and cached by its source hash.

Marked `tools`: it needs Go and the module proxy (or a warm cache)."""
from __future__ import annotations

import json

import pytest
import yaml

from kubetune.api.v1alpha1 import FineTuneJob

from gitops_health import ARGO, argocd, flux

pytestmark = pytest.mark.tools


CASES = yaml.safe_load((ARGO / "health_test.yaml").read_text())["tests"]
TESTDATA = {c["inputPath"]: yaml.safe_load((ARGO / c["inputPath"]).read_text()) for c in CASES}


@pytest.mark.parametrize("path", sorted(TESTDATA))
def test_testdata_is_what_the_operator_writes(path):
    """Every field of each test object survives the API models (which ignore unknown status fields),
    so the health checks are tested on the status the operator really writes."""
    obj = TESTDATA[path]
    ftj = FineTuneJob.model_validate(obj)
    if "status" in obj:
        dumped = ftj.status.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)
        assert _norm(dumped) == _norm(obj["status"])


def _norm(v):
    """Compare values, not spellings: 21.3Gi and timestamps as the models print them."""
    return json.loads(json.dumps(v, default=str).replace("+00:00", "Z"))


def test_argocd_health_matches_health_test_yaml():
    """The upstream layout (resource_customizations/<group>/<Kind>/health_test.yaml): what Argo CD's own
    test suite would check if the script were contributed there."""
    got = argocd([TESTDATA[c["inputPath"]] for c in CASES])
    for case, result in zip(CASES, got):
        assert result == case["healthStatus"], case["inputPath"]


def test_flux_health_follows_kstatus_for_a_job():
    """Current once the trainer runs (as kstatus treats a batch Job), Failed when the operator cannot start
    it or the run failed, InProgress otherwise. An object with no status at all (only an older CRD,
    without the status: {} default, leaves one so) is an expression error: Flux reports Unknown and waits."""
    want = {"testdata/no-status.yaml": None, "testdata/pending-secret.yaml": "Failed",
            "testdata/unschedulable.yaml": "Failed", "testdata/starting.yaml": "InProgress",
            "testdata/running.yaml": "Current", "testdata/suspended.yaml": "Current",
            "testdata/succeeded.yaml": "Current", "testdata/failed.yaml": "Failed",
            "testdata/new-generation.yaml": "InProgress"}
    assert set(want) == set(TESTDATA)
    got = dict(zip(want, flux([TESTDATA[p] for p in want])))
    assert "no such attribute(s): status" in got.pop("testdata/no-status.yaml")["error"]
    assert {p: r["status"] for p, r in got.items()} == {p: s for p, s in want.items() if s}


def test_argocd_reports_a_bare_status_without_a_lua_error_and_says_what_a_finishing_trainer_does():
    base = TESTDATA["testdata/running.yaml"]
    odd = [{**base, "status": {"phase": "Running"}},  # no progress, no conditions
           {**base, "status": {"phase": "Starting", "conditions": []}},
           {**base, "status": {"phase": "Pending"}},
           {**base, "status": {**base["status"], "progress": {**base["status"]["progress"], "state": "uploading",
                                                              "step": 100, "percent": "100%"}}}]
    assert argocd(odd) == [
        {"status": "Progressing", "message": "Running: waiting for the trainer"},
        {"status": "Progressing", "message": "Starting: waiting for the trainer"},
        {"status": "Progressing", "message": "Pending"},
        {"status": "Progressing", "message": "Running: step 100/100 (100%), loss 1.25, uploading"},
    ]
