"""kube-scheduler places GPU pods on the fake fleet by its GPU Feature Discovery labels, and KWOK runs
them to completion (or failure) so the job controller sees real Job conditions."""
from __future__ import annotations

import pytest

from kubetune.devenv.ground import wait_until as wait_for

pytestmark = pytest.mark.integration

NODES_80GB = {"kwok-a100-80gb-0", "kwok-h100-0"}


def gpu_job(name: str, resources: dict, min_memory_mib: int | None = None, annotations: dict | None = None,
            backoff_limit: int = 0) -> dict:
    affinity = {}
    if min_memory_mib is not None:
        affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "nvidia.com/gpu.memory", "operator": "Gt",
                                   "values": [str(min_memory_mib)]}]}]}}}
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"backoffLimit": backoff_limit, "template": {
            "metadata": {"annotations": annotations or {}},
            "spec": {"restartPolicy": "Never", "affinity": affinity, "containers": [{
                "name": "train", "image": "example.invalid/trainer:latest",
                "resources": {"requests": resources, "limits": resources}}]}}},
    }


def job_pod(ground, namespace: str, job: str) -> dict:
    pods = ground.kubectl_json("get", "pods", "-n", namespace, "-l", f"job-name={job}")["items"]
    return pods[0] if pods else {}


def job_condition(ground, namespace: str, job: str, kind: str) -> bool:
    conds = ground.kubectl_json("get", "job", job, "-n", namespace).get("status", {}).get("conditions", [])
    return any(c["type"] == kind and c["status"] == "True" for c in conds)


def test_80gb_gpu_job_lands_on_an_80gb_node_and_completes(ground, namespace):
    ground.apply(gpu_job("big", {"nvidia.com/gpu": "1"}, min_memory_mib=60000), namespace)
    pod = wait_for("the pod to be scheduled", lambda: (lambda p: p if p.get("spec", {}).get("nodeName") else None)(
        job_pod(ground, namespace, "big")))
    assert pod["spec"]["nodeName"] in NODES_80GB
    wait_for("job big to complete", lambda: job_condition(ground, namespace, "big", "Complete"))
    assert job_pod(ground, namespace, "big")["status"]["phase"] == "Succeeded"


def test_a_job_no_node_can_hold_stays_pending_with_the_schedulers_reason(ground, namespace):
    ground.apply(gpu_job("huge", {"nvidia.com/gpu": "1"}, min_memory_mib=90000), namespace)

    def failed_scheduling():
        events = ground.kubectl_json("get", "events", "-n", namespace,
                                     "--field-selector", "reason=FailedScheduling")["items"]
        return events[0]["message"] if events else None

    message = wait_for("a FailedScheduling event", failed_scheduling)
    assert "didn't match Pod's node affinity/selector" in message
    assert job_pod(ground, namespace, "huge")["status"]["phase"] == "Pending"


def test_a_mig_slice_request_lands_on_the_mig_node(ground, namespace):
    ground.apply(gpu_job("slice", {"nvidia.com/mig-1g.10gb": "1"}), namespace)
    wait_for("job slice to complete", lambda: job_condition(ground, namespace, "slice", "Complete"))
    assert job_pod(ground, namespace, "slice")["spec"]["nodeName"] == "kwok-a100-mig-0"


def test_too_many_gpus_for_any_node_is_unschedulable(ground, namespace):
    ground.apply(gpu_job("greedy", {"nvidia.com/gpu": "9"}), namespace)
    msg = wait_for("a FailedScheduling event", lambda: next((e["message"] for e in ground.kubectl_json(
        "get", "events", "-n", namespace, "--field-selector", "reason=FailedScheduling")["items"]), None))
    assert "Insufficient nvidia.com/gpu" in msg


def test_a_pod_annotated_to_fail_fails_with_that_exit_code(ground, namespace):
    # The kubetune KWOK stage `pod-fail`: lets operator tests see an OOMKilled trainer without a kubelet.
    ground.apply(gpu_job("oom", {"nvidia.com/gpu": "1"}, annotations={
        "kwok.kubetune.io/exit-code": "137", "kwok.kubetune.io/reason": "OOMKilled"}), namespace)
    wait_for("job oom to fail", lambda: job_condition(ground, namespace, "oom", "Failed"))
    term = job_pod(ground, namespace, "oom")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (137, "OOMKilled")


def test_a_delay_annotation_keeps_the_pod_running(ground, namespace):
    ground.apply(gpu_job("slow", {"cpu": "1"}, annotations={"pod-complete.stage.kwok.x-k8s.io/delay": "4s"}),
                 namespace)
    wait_for("pod running", lambda: job_pod(ground, namespace, "slow").get("status", {}).get("phase") == "Running")
    assert not job_condition(ground, namespace, "slow", "Complete")
    wait_for("job slow to complete", lambda: job_condition(ground, namespace, "slow", "Complete"), 30)
