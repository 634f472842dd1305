"""The GitOps health checks (integrations/) on FineTuneJobs as the operator really leaves them on the
ground: what Argo CD and Flux would show for a running, finished, unschedulable, suspended and
misconfigured job. Evaluated with gopher-lua and cel-go, as Argo CD and Flux do (tests/gitops)."""
from __future__ import annotations

import json

import pytest

from gitops_health import argocd, flux
from opkit import _clean, apply, cond, example, put_progress, small_gpu_job, status, wait_ftj, wait_phase

pytestmark = pytest.mark.integration


def test_argocd_and_flux_read_the_operators_status(ground, operator, ns):
    held = small_gpu_job("held")
    held["spec"].setdefault("runPolicy", {})["suspend"] = True
    no_secret = small_gpu_job("no-secret")
    no_secret["spec"]["storage"]["credentialsSecret"] = {"name": "absent"}
    for job in (small_gpu_job("trains", delay="6s"), example("too-big", **{"metadata.name": "big"}), held, no_secret):
        apply(ground, ns, job)

    wait_phase(ground, ns, "trains", "Running", 60)
    put_progress(ground, ns, "trains", 1, step=40, total=100, loss=1.25)
    running = wait_ftj(ground, ns, "trains", lambda o: (status(o).get("progress") or {}).get("step") == 40, 30,
                       what="progress mirrored")
    big = wait_phase(ground, ns, "big", "Unschedulable", 60)
    held = wait_phase(ground, ns, "held", "Suspended", 60)
    no_secret = wait_ftj(ground, ns, "no-secret", lambda o: cond(o, "Validated").get("reason") == "SecretNotFound", 60,
                         what="SecretNotFound")
    done = wait_phase(ground, ns, "trains", "Succeeded", 60)

    objs = [running, done, big, held, no_secret]
    v = cond(no_secret, "Validated")
    assert argocd(objs) == [
        {"status": "Progressing", "message": "Running: step 40/100 (40%), loss 1.25"},
        {"status": "Healthy", "message": cond(done, "Succeeded")["message"]},
        {"status": "Degraded", "message": cond(big, "Scheduled")["message"]},
        {"status": "Suspended", "message": cond(held, "Suspended")["message"]},
        {"status": "Degraded", "message": f"SecretNotFound: {v['message']}"},
    ]
    assert "InsufficientGPUMemory" == cond(big, "Scheduled")["reason"] and "absent" in v["message"]
    assert [r["status"] for r in flux(objs)] == ["Current", "Current", "Failed", "Current", "Failed"]


def test_a_job_the_operator_has_not_reached_yet_is_in_progress_not_an_error(ground, ns):
    """No operator here: what the apiserver returns for a new job carries status {} (the CRD's default),
    so Flux's expressions read "no phase yet" (InProgress) instead of erroring on a missing status."""
    created = json.loads(ground.kubectl("create", "-n", ns, "-f", "-", "-o", "json",
                                        stdin=json.dumps(_clean(small_gpu_job("fresh")))).stdout)
    assert created["status"] == {}
    assert flux([created]) == [{"status": "InProgress"}]
    assert argocd([created])[0]["status"] == "Progressing"
