"""The operator against the real control plane: kube-apiserver, kube-scheduler, the Job controller and
KWOK's fake GPU fleet. The operator runs as its own process (`kubetune operator`), as it would in a pod.

KWOK plays the kubelet: it runs trainer pods to Running and then Succeeded (or Failed with a given
exit code), after the delay in the pod annotation `pod-complete.stage.kwok.x-k8s.io/delay`. The
trainer's progress object is written to the real S3 server at the path the operator rendered into
the trainer config, exactly where the trainer writes it (the trainer's side is tested in tests/trainer).
"""
from __future__ import annotations

import copy
import json
import time

import pytest
import yaml

from kubetune.devenv.ground import wait_until as wait_for

from opkit import (
    SEEN_RUNNING,
    apply,
    cond,
    example,
    ftj,
    phase,
    put_progress,
    small_gpu_job,
    status,
    wait_ftj,
    wait_phase,
)

pytestmark = pytest.mark.integration


def _not_validated(obj: dict) -> bool:
    return cond(obj, "Validated").get("status") == "False"


def _validated_reason(reason: str):
    return lambda obj: cond(obj, "Validated").get("reason") == reason


# -------------------------------------------------------------------------------------------------


def test_life_through_every_phase(ground, operator, ns):
    apply(ground, ns, small_gpu_job("life", delay="25s"))
    obj = wait_phase(ground, ns, "life", "Running", 60)
    st = obj["status"]
    assert cond(obj, "Validated")["status"] == "True"
    sched = cond(obj, "Scheduled")
    assert sched["status"] == "True" and sched["reason"] == "Placed" and sched["observedGeneration"] == 1
    assert st["run"] == 1 and st["history"][0]["phase"] == "Running"
    assert st["estimate"]["perGpu"].endswith("Gi") and st["estimate"]["perGpuBytes"] > 0
    job = ground.kubectl_json("get", "job", "life-r1", "-n", ns)
    assert job["metadata"]["labels"]["kubetune.io/job"] == "life"
    assert job["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    pod = ground.kubectl_json("get", "pods", "-n", ns, "-l", "kubetune.io/job=life")["items"][0]
    assert pod["spec"]["nodeName"] == st["placement"]["node"]

    put_progress(ground, ns, "life", 1, step=40, total=100, loss=1.25, ckpt_step=40)
    obj = wait_ftj(ground, ns, "life", lambda o: (status(o).get("progress") or {}).get("step") == 40, 30,
                   what="progress mirrored")
    assert obj["status"]["progress"]["percent"] == "40%" and obj["status"]["progress"]["loss"] == 1.25
    assert cond(obj, "CheckpointSynced")["status"] == "True"
    assert obj["status"]["checkpoints"]["latestStep"] == 40
    # /metrics follows status within a reconcile; a scrape may land just between the two
    wait_for("step in /metrics",
             lambda: operator.metric("kubetune_training_step", namespace=ns, name="life") == 40.0, 10)

    # every printer column is filled
    row = ground.kubectl("get", "ftj", "life", "-n", ns, "--no-headers").stdout.split()
    assert row[0] == "life" and row[1] == "Running" and row[2] == "lora" and row[3] == "hf://Qwen/Qwen2.5-0.5B"
    assert row[4] == "40%" and row[5].endswith("Gi") and row[6].startswith("kwok-")

    obj = wait_phase(ground, ns, "life", "Succeeded", 60)
    assert cond(obj, "Succeeded")["status"] == "True" and cond(obj, "Running")["status"] == "False"
    assert obj["status"]["history"][0]["phase"] == "Succeeded" and obj["status"]["completionTime"]
    events = ground.kubectl_json("get", "events", "-n", ns, "--field-selector", "involvedObject.name=life")["items"]
    reasons = {e["reason"] for e in events}
    assert {"Placed", "TrainerRunning", "CheckpointCommitted", "Completed"} <= reasons, reasons
    assert operator.metric("kubetune_finetunejobs", phase="Succeeded") >= 1


def test_lora_8b_lands_on_the_smallest_gpu_that_fits(ground, operator, ns):
    from kubetune.api.validation import parse_job
    from kubetune.controller.fleet import read_fleet
    from kubetune.controller.reconcile import decide
    from kubetune.estimator import resolve_architecture

    obj = example("lora-8b")
    obj["spec"]["resources"]["podAnnotations"] = {"pod-complete.stage.kwok.x-k8s.io/delay": "60s"}
    apply(ground, ns, obj)
    got = wait_phase(ground, ns, "lora-8b", "Running", 60)
    placement = got["status"]["placement"]
    spec = parse_job(obj).spec
    nodes = ground.kubectl_json("get", "nodes")["items"]
    others = [p for p in ground.kubectl_json("get", "pods", "-A")["items"]
              if p["metadata"].get("labels", {}).get("kubetune.io/job") != "lora-8b"]
    fleet = read_fleet(nodes, others)
    need_mib = got["status"]["estimate"]["perGpuBytes"] / 0.95 / 2**20
    # Best fit: no GPU or MIG slice that holds the job (in bf16: of compute capability 8.0+) and had a free
    # unit is smaller than the one chosen.
    from kubetune.api.constants import bf16_refused

    def holds(s) -> bool:
        return s.memory_mib >= need_mib and bf16_refused(spec.training.precision, s.compute) is None

    sizes = sorted({s.memory_mib for n in fleet if n.schedulable for s in n.slots if holds(s) and s.free >= 1})
    assert placement["gpuMemoryMiB"] == sizes[0], (placement, sizes)
    assert placement["minGpuMemoryMiB"] >= need_mib
    # and kube-scheduler put the pod where that GPU is, requesting that resource
    pod = ground.kubectl_json("get", "pods", "-n", ns, "-l", "kubetune.io/job=lora-8b")["items"][0]
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}  # gated model
    node = next(n for n in fleet if n.name == pod["spec"]["nodeName"])
    slot = next(s for s in node.slots if s.memory_mib == sizes[0])
    assert pod["spec"]["containers"][0]["resources"]["limits"][slot.resource] == "1"
    d = decide(spec, resolve_architecture(spec.model), fleet)
    assert d.placement.gpu_memory_mib == sizes[0] and d.placement.resource == slot.resource
    # with the whole fleet free, the smallest size of all wins (a MIG slice here, the smallest that fits)
    everything = sorted({s.memory_mib for n in read_fleet(nodes, []) for s in n.slots if holds(s)})
    whole_fleet = decide(spec, resolve_architecture(spec.model), read_fleet(nodes, []))
    assert whole_fleet.placement.gpu_memory_mib == everything[0]


def test_too_big_is_unschedulable_with_advice(ground, operator, ns):
    apply(ground, ns, example("too-big"))
    obj = wait_phase(ground, ns, "too-big", "Unschedulable", 60)
    c = cond(obj, "Scheduled")
    assert c["status"] == "False" and c["reason"] == "InsufficientGPUMemory"
    assert "GiB per GPU" in c["message"] and "the largest GPU available to this job has 80.0 GiB" in c["message"]
    assert "Options that fit:" in c["message"]
    assert ground.kubectl("get", "job", "-n", ns, "-l", "kubetune.io/job=too-big", "-o", "name").stdout.strip() == ""
    assert operator.metric("kubetune_placement_failures_total", reason="InsufficientGPUMemory") >= 1


def test_unschedulable_job_rechecks_when_a_node_appears(ground, operator, ns):
    obj = small_gpu_job("waits-for-b200", delay=SEEN_RUNNING)
    obj["spec"]["resources"]["gpuProduct"] = "NVIDIA-B200"
    apply(ground, ns, obj)
    got = wait_phase(ground, ns, "waits-for-b200", "Unschedulable", 60)
    assert cond(got, "Scheduled")["reason"] == "NoMatchingNodes"
    from kubetune.devenv.fleet import Gpu, NodeSpec, node_manifest
    node = node_manifest(NodeSpec(f"kwok-b200-{ns}", "b200", "64", "512Gi",
                                  Gpu("NVIDIA-B200", 183359, "blackwell", (10, 0)), 8))
    ground.apply(node)
    try:
        got = wait_phase(ground, ns, "waits-for-b200", "Running", 90)
        assert got["status"]["placement"]["gpuProduct"] == "NVIDIA-B200"
    finally:
        ground.kubectl("delete", "node", node["metadata"]["name"], "--wait=false", check=False)


def test_suspend_resume_and_delete_cleanup(ground, operator, ns):
    apply(ground, ns, small_gpu_job("pausable", delay="300s"))
    wait_phase(ground, ns, "pausable", "Running", 60)
    put_progress(ground, ns, "pausable", 1, step=10, total=100, loss=2.0, ckpt_step=10)
    ground.kubectl("patch", "ftj", "pausable", "-n", ns, "--type", "merge", "-p",
                   '{"spec":{"runPolicy":{"suspend":true}}}')
    obj = wait_phase(ground, ns, "pausable", "Suspended", 60)
    assert cond(obj, "Suspended")["status"] == "True"
    assert ground.kubectl_json("get", "job", "pausable-r1", "-n", ns)["spec"]["suspend"] is True
    wait_for("pods gone", lambda: not ground.kubectl_json(
        "get", "pods", "-n", ns, "-l", "kubetune.io/job=pausable")["items"], 60)
    # checkpoints stay: the progress object and the run's config are untouched
    assert obj["status"]["checkpoints"]["latestStep"] == 10
    ground.kubectl("patch", "ftj", "pausable", "-n", ns, "--type", "merge", "-p",
                   '{"spec":{"runPolicy":{"suspend":false}}}')
    obj = wait_phase(ground, ns, "pausable", "Running", 60)
    assert cond(obj, "Suspended")["status"] == "False" and obj["status"]["run"] == 1  # same run resumes
    # the resumed pod gets the same config, so the trainer finds the same checkpoints prefix
    assert ground.kubectl_json("get", "job", "pausable-r1", "-n", ns)["spec"]["suspend"] is False

    ground.kubectl("delete", "ftj", "pausable", "-n", ns, "--timeout=60s")
    for kind in ("job", "configmap"):
        left = ground.kubectl("get", kind, "-n", ns, "-l", "kubetune.io/job=pausable", "-o", "name").stdout.strip()
        assert left == "", f"{kind} left after delete: {left}"


def test_operator_restart_creates_no_duplicate_job(ground, operator, ns):
    apply(ground, ns, small_gpu_job("restart-me", delay="120s"))
    wait_phase(ground, ns, "restart-me", "Running", 60)
    operator.kill()
    uid_before = ground.kubectl_json("get", "job", "restart-me-r1", "-n", ns)["metadata"]["uid"]
    operator.start()
    # a reconcile after restart must find the existing Job (deterministic name), not make a second one
    ground.kubectl("annotate", "ftj", "restart-me", "-n", ns, "poke=1", "--overwrite")
    time.sleep(5)
    jobs = ground.kubectl_json("get", "jobs", "-n", ns, "-l", "kubetune.io/job=restart-me")["items"]
    assert [j["metadata"]["name"] for j in jobs] == ["restart-me-r1"]
    assert jobs[0]["metadata"]["uid"] == uid_before
    assert phase(ground, ns, "restart-me") == "Running"


def test_spec_change_after_finish_starts_a_new_run_and_keeps_history(ground, operator, ns):
    apply(ground, ns, small_gpu_job("retrain"))
    wait_phase(ground, ns, "retrain", "Succeeded", 60)
    obj = small_gpu_job("retrain")
    obj["spec"]["training"]["learningRate"] = 1.0e-4
    apply(ground, ns, obj)
    got = wait_ftj(ground, ns, "retrain", lambda o: status(o).get("run") == 2, 60, what="run 2")
    assert [h["run"] for h in got["status"]["history"]] == [1, 2]
    assert got["status"]["history"][0]["phase"] == "Succeeded" and got["status"]["history"][1]["generation"] == 2
    wait_phase(ground, ns, "retrain", "Succeeded", 60)
    # the same spec again (data updated in place): runPolicy.rerun, as docs/operator.md shows it
    ground.kubectl("patch", "ftj", "retrain", "-n", ns, "--type=merge",
                   "-p", '{"spec":{"runPolicy":{"rerun":"data-v2"}}}')
    got = wait_ftj(ground, ns, "retrain", lambda o: status(o).get("run") == 3, 60, what="run 3")
    assert got["status"]["history"][2]["generation"] == 3
    wait_phase(ground, ns, "retrain", "Succeeded", 60)
    assert {j["metadata"]["name"] for j in ground.kubectl_json("get", "jobs", "-n", ns)["items"]} >= {
        "retrain-r1", "retrain-r2", "retrain-r3"}


def test_spec_change_while_running_queues_the_next_run(ground, operator, ns):
    apply(ground, ns, small_gpu_job("busy", delay="20s"))
    wait_phase(ground, ns, "busy", "Running", 60)
    obj = small_gpu_job("busy", delay="1s")
    obj["spec"]["training"]["learningRate"] = 5.0e-5
    apply(ground, ns, obj)
    time.sleep(3)
    got = ftj(ground, ns, "busy")
    assert got["status"]["run"] == 1 and got["status"]["phase"] == "Running"  # not disturbed
    got = wait_ftj(ground, ns, "busy", lambda o: status(o).get("run") == 2, 90, what="run 2 after run 1")
    assert got["status"]["history"][0]["phase"] == "Succeeded" and got["status"]["history"][1]["generation"] == 2


def test_oom_sets_reason_and_retries_once_with_a_smaller_batch(ground, operator, ns):
    obj = small_gpu_job("oom")
    # what the trainer does on CUDA OOM: exit 6 with its termination JSON
    term = {"reason": "OutOfMemory", "message": "CUDA out of memory at step 1: tried to allocate 2.00 GiB"}
    obj["spec"]["resources"]["podAnnotations"] = {"kwok.kubetune.io/exit-code": "6",
                                                   "kwok.kubetune.io/message": json.dumps(term),
                                                   "pod-complete.stage.kwok.x-k8s.io/delay": "1s"}
    apply(ground, ns, obj)
    got = wait_ftj(ground, ns, "oom", lambda o: len(status(o).get("history", [])) >= 2, 90, what="OOM retry run")
    first, second = got["status"]["history"][:2]
    assert first["reason"] == "OutOfMemoryRetry"
    assert second["overrides"] == {"microBatchSize": 1, "gradientAccumulationSteps": 16}
    cm = ground.kubectl_json("get", "configmap", "oom-r2-config", "-n", ns)
    assert yaml.safe_load(cm["data"]["trainer.yaml"])["resolved"]["microBatchSize"] == 1
    got = wait_phase(ground, ns, "oom", "Failed", 90)  # the retry OOMs too (same annotation): no third run
    assert cond(got, "Failed")["reason"] == "OutOfMemory" and len(got["status"]["history"]) == 2
    assert operator.metric("kubetune_runs_oom_total") >= 2


def test_a_kernel_oom_kill_asks_for_host_memory_and_is_not_retried(ground, operator, ns):
    obj = small_gpu_job("host-oom")
    obj["spec"]["resources"]["podAnnotations"] = {"kwok.kubetune.io/exit-code": "137",
                                                   "kwok.kubetune.io/reason": "OOMKilled",
                                                   "pod-complete.stage.kwok.x-k8s.io/delay": "1s"}
    apply(ground, ns, obj)
    got = wait_phase(ground, ns, "host-oom", "Failed", 90)
    c = cond(got, "Failed")
    assert c["reason"] == "HostOutOfMemory"
    assert "Raise spec.resources.memory" in c["message"] and "(8Gi)" in c["message"]
    assert len(got["status"]["history"]) == 1  # a smaller batch would not help: no OOM retry
    assert operator.metric("kubetune_runs_failed_total", reason="HostOutOfMemory") >= 1


def test_missing_secret_waits_with_a_clear_message(ground, operator, namespace):
    apply(ground, namespace, small_gpu_job("no-secret", delay=SEEN_RUNNING))
    obj = wait_ftj(ground, namespace, "no-secret", _not_validated, 60, what="Validated=False")
    c = cond(obj, "Validated")
    assert c["reason"] == "SecretNotFound"
    assert (f"Secret 'kubetune-s3' (spec.storage.credentialsSecret) does not exist in namespace {namespace}"
            in c["message"])
    assert obj["status"]["phase"] == "Pending"
    st = ground.state["s3"]
    ground.kubectl("create", "secret", "generic", "kubetune-s3", "-n", namespace,
                   f"--from-literal=AWS_ACCESS_KEY_ID={st['access_key']}",
                   f"--from-literal=AWS_SECRET_ACCESS_KEY={st['secret_key']}")
    wait_phase(ground, namespace, "no-secret", "Running", 60)

    # a gated model's Hub token: same wait, same message shape, then the run starts
    gated = small_gpu_job("no-token", delay=SEEN_RUNNING)
    gated["spec"]["model"]["tokenSecret"] = {"name": "hf-token", "key": "token"}
    apply(ground, namespace, gated)
    obj = wait_ftj(ground, namespace, "no-token", _not_validated, 60, what="Validated=False")
    assert cond(obj, "Validated")["message"] == (
        f"Secret 'hf-token' (spec.model.tokenSecret) does not exist in namespace {namespace}: create it with key token "
        f"(kubectl create secret generic hf-token -n {namespace} --from-literal=token=hf_...)")
    ground.kubectl("create", "secret", "generic", "hf-token", "-n", namespace, "--from-literal=HF_TOKEN=hf_test")
    obj = wait_ftj(ground, namespace, "no-token",
                   lambda o: "has no key token" in cond(o, "Validated").get("message", ""), 60, what="the key named")
    assert cond(obj, "Validated")["reason"] == "SecretNotFound" and obj["status"]["phase"] == "Pending"
    ground.kubectl("patch", "secret", "hf-token", "-n", namespace, "--type=merge", "-p",
                   json.dumps({"stringData": {"token": "hf_test"}}))
    wait_phase(ground, namespace, "no-token", "Running", 60)


def test_workload_identity_waits_for_its_service_account_then_the_trainer_runs_as_it(ground, operator, ns):
    """spec.storage.serviceAccountName instead of credentialsSecret (EKS IRSA, GKE Workload Identity).
    The apiserver's ServiceAccount admission would refuse the pod; the operator says so first."""
    obj = small_gpu_job("irsa", delay=SEEN_RUNNING)
    obj["spec"]["storage"] = {"serviceAccountName": "trainer-s3"}
    apply(ground, ns, obj)
    got = wait_ftj(ground, ns, "irsa", _validated_reason("ServiceAccountNotFound"), 60, what="ServiceAccountNotFound")
    assert cond(got, "Validated")["message"] == (
        f"ServiceAccount 'trainer-s3' (spec.storage.serviceAccountName) does not exist in namespace {ns}: create it "
        f"(kubectl create serviceaccount trainer-s3 -n {ns}) with the annotation your cloud's workload identity needs")
    assert got["status"]["phase"] == "Pending"
    ground.kubectl("create", "serviceaccount", "trainer-s3", "-n", ns)
    wait_phase(ground, ns, "irsa", "Running", 60)
    pod = ground.kubectl_json("get", "pods", "-n", ns, "-l", "kubetune.io/job=irsa")["items"][0]
    assert pod["spec"]["serviceAccountName"] == "trainer-s3"
    env = {e["name"] for e in pod["spec"]["containers"][0]["env"]}
    assert not env & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # the pod's identity, no keys


def test_an_s3_endpoint_signed_by_a_private_ca_is_verified_with_the_ca_bundle(ground, operator, ns, tls_proxy):
    """spec.storage.caBundle: the job waits for its ConfigMap; then the operator reads the trainer's
    progress over https from an endpoint only that CA verifies, and the pod gets the bundle mounted
    as AWS_CA_BUNDLE."""
    proxy = tls_proxy(int(ground.state["s3"]["endpoint"].rsplit(":", 1)[1]))
    obj = small_gpu_job("private-ca", delay="30s")
    obj["spec"]["storage"]["endpoint"] = proxy.url
    obj["spec"]["storage"]["caBundle"] = {"name": "s3-ca"}
    apply(ground, ns, obj)
    got = wait_ftj(ground, ns, "private-ca", _validated_reason("ConfigMapNotFound"), 60, what="ConfigMapNotFound")
    assert cond(got, "Validated")["message"] == (
        f"ConfigMap 's3-ca' (spec.storage.caBundle) does not exist in namespace {ns}: create it "
        f"(kubectl create configmap s3-ca -n {ns} --from-file=ca.crt=ca.pem)")
    ground.kubectl("create", "configmap", "s3-ca", "-n", ns, f"--from-file=ca.crt={proxy.ca_file}")
    wait_phase(ground, ns, "private-ca", "Running", 60)
    pod = ground.kubectl_json("get", "pods", "-n", ns, "-l", "kubetune.io/job=private-ca")["items"][0]["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == "ca")
    assert vol["configMap"] == {"name": "s3-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}], "defaultMode": 420}
    c = pod["containers"][0]
    assert {"name": "ca", "mountPath": "/etc/kubetune-ca", "readOnly": True} in c["volumeMounts"]
    assert {"name": "AWS_CA_BUNDLE", "value": "/etc/kubetune-ca/ca.crt"} in c["env"]
    put_progress(ground, ns, "private-ca", 1, step=7, total=100, loss=2.5)  # plain http, straight to S3
    wait_ftj(ground, ns, "private-ca", lambda o: (status(o).get("progress") or {}).get("step") == 7, 30,
             what="progress read over https")


def test_a_pvc_dataset_waits_for_its_claim_then_is_mounted_read_only(ground, operator, ns):
    obj = small_gpu_job("pvc-data", delay=SEEN_RUNNING)
    obj["spec"]["dataset"]["uri"] = "pvc://train-data/alpaca/train.jsonl"
    apply(ground, ns, obj)
    got = wait_ftj(ground, ns, "pvc-data", _validated_reason("VolumeClaimNotFound"), 60, what="VolumeClaimNotFound")
    assert cond(got, "Validated")["message"] == (
        f"PersistentVolumeClaim 'train-data' (spec.dataset.uri) does not exist in namespace {ns}: create it, "
        "or fix the URI")
    assert got["status"]["phase"] == "Pending"
    # a statically provisioned volume; the real PV controller binds the claim to it
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{ns}-train-data"},
          "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                   "hostPath": {"path": "/tmp/kubetune-train-data"},
                   "claimRef": {"namespace": ns, "name": "train-data"}}}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "train-data"},
           "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": f"{ns}-train-data",
                    "resources": {"requests": {"storage": "1Gi"}}}}
    ground.kubectl("apply", "-f", "-", stdin=json.dumps(pv))
    ground.kubectl("apply", "-n", ns, "-f", "-", stdin=json.dumps(pvc))
    try:
        wait_phase(ground, ns, "pvc-data", "Running", 90)
        pod = ground.kubectl_json("get", "pods", "-n", ns, "-l", "kubetune.io/job=pvc-data")["items"][0]
        vol = next(v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v)
        assert vol["persistentVolumeClaim"] == {"claimName": "train-data", "readOnly": True}
        mount = next(m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == vol["name"])
        assert mount == {"name": vol["name"], "mountPath": "/mnt/pvc/train-data", "readOnly": True}
    finally:
        ground.kubectl("delete", "pv", f"{ns}-train-data", "--wait=false", check=False)


def malformed_specs() -> list[tuple[str, dict]]:
    """50 broken FineTuneJobs: each must be refused by the apiserver or marked Failed/Pending with a
    message, and none may crash the operator."""
    base = small_gpu_job("x")["spec"]
    cases: list[tuple[str, dict]] = []

    def bad(tag, **changes):
        spec = copy.deepcopy(base)
        for dotted, value in changes.items():
            node = spec
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            if value is ...:
                node.pop(leaf, None)
            else:
                node[leaf] = value
        cases.append((tag, spec))

    bad("no-model", model=...)
    bad("no-dataset", dataset=...)
    bad("no-method", method=...)
    bad("no-training", training=...)
    bad("no-checkpoints", checkpoints=...)
    bad("model-not-a-map", model="hf://x/y")
    bad("model-http", **{"model.uri": "http://example.com/m"})
    bad("model-empty", **{"model.uri": ""})
    bad("model-unknown-hf", **{"model.uri": "hf://nobody/does-not-exist-model"})
    bad("model-pvc-no-arch", **{"model.uri": "pvc://models/x"})
    bad("dataset-ftp", **{"dataset.uri": "ftp://x/y"})
    bad("dataset-format", **{"dataset.format": "csv"})
    bad("seq-too-small", **{"dataset.maxSeqLength": 1})
    bad("seq-string", **{"dataset.maxSeqLength": "long"})
    bad("split-1", **{"dataset.validationSplit": 1.5})
    bad("split-and-uri", **{"dataset.validationUri": "s3://kubetune-data/v.jsonl"})
    bad("method-dpo", **{"method.type": "dpo"})
    bad("lora-on-full", **{"method.type": "full"})
    bad("lora-rank-0", **{"method.lora.rank": 0})
    bad("lora-rank-huge", **{"method.lora.rank": 100000})
    bad("lora-dropout-1", **{"method.lora.dropout": 1.0})
    bad("lora-targets-empty", **{"method.lora.targetModules": []})
    bad("quant-on-lora", **{"method.quantization": {"bits": 4}})
    bad("qlora-3bit", **{"method.type": "qlora", "method.quantization": {"bits": 3}})
    bad("freeze-missing", **{"method": {"type": "freeze"}})
    bad("virtual-on-lora", **{"method.virtualTokens": 10})
    bad("epochs-and-steps", **{"training.epochs": 1})
    bad("neither", **{"training.maxSteps": ...})
    bad("steps-0", **{"training.maxSteps": 0})
    bad("mbs-0", **{"training.microBatchSize": 0})
    bad("mbs-word", **{"training.microBatchSize": "max"})
    bad("lr-negative", **{"training.learningRate": -0.1})
    bad("scheduler", **{"training.scheduler": "exponential"})
    bad("precision", **{"training.precision": "int4"})
    bad("optimizer", **{"training.optimizer": "sgd"})
    bad("warmup-1", **{"training.warmupRatio": 1.0})
    bad("es-no-eval", **{"training.earlyStopping": {"patience": 2}})
    bad("gpus-17", **{"resources.gpusPerNode": 17})
    bad("nodes-0", **{"resources.nodes": 0})
    bad("cpu-word", **{"resources.cpu": "lots"})
    bad("memory-word", **{"resources.memory": "big"})
    bad("multi-node-cpu", **{"resources.nodes": 2, "resources.gpusPerNode": 0})
    bad("toleration-op", **{"resources.tolerations": [{"key": "a", "operator": "Maybe"}]})
    bad("endpoint", **{"storage.endpoint": "minio:9000"})
    bad("secret-name", **{"storage.credentialsSecret": {"name": "Not_Valid"}})
    bad("ckpt-gs", **{"checkpoints.uri": "gs://bucket/x"})
    bad("ckpt-keep-0", **{"checkpoints.keep": 0})
    bad("merge-on-full", **{"method": {"type": "full"}, "output.mergeAdapter": True})
    bad("backoff-neg", **{"runPolicy.backoffLimit": -1})
    bad("unknown-field", **{"training.learningrate": 0.1})
    return cases


def test_fifty_malformed_specs_are_rejected_or_failed_and_the_operator_survives(ground, operator, ns):
    cases = malformed_specs()
    assert len(cases) == 50
    accepted = []
    for i, (tag, spec) in enumerate(cases):
        obj = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
               "metadata": {"name": f"bad-{i:02d}-{tag}"[:50].rstrip("-")}, "spec": spec}
        r = ground.kubectl("create", "-n", ns, "-f", "-", stdin=json.dumps(obj), check=False)
        if r.returncode != 0:
            assert "FineTuneJob" in r.stderr and ("Invalid value" in r.stderr or "Required value" in r.stderr
                                                  or "Unsupported value" in r.stderr or "unknown field" in r.stderr
                                                  or "must" in r.stderr), f"{tag}: {r.stderr}"
        else:
            accepted.append(obj["metadata"]["name"])
    # Whatever the schema let through must be held back by the operator, with a message.
    for name in accepted:
        obj = wait_ftj(ground, ns, name, lambda o: _not_validated(o) or status(o).get("phase") == "Failed", 60,
                       what="Validated=False or Failed")
        c = cond(obj, "Validated")
        assert c.get("message"), f"{name}: no message"
        assert "spec.model" in c["message"] or "catalog" in c["message"], c["message"]
    assert set(accepted) <= {n for n in accepted if "model" in n}, accepted
    assert operator.alive(), "the operator crashed"
    assert operator.metric("kubetune_reconcile_errors_total") == 0.0


def test_deadline_fails_the_run_and_ttl_cleans_the_job(ground, operator, ns):
    slow = small_gpu_job("deadline", delay="300s")
    slow["spec"]["runPolicy"] = {"activeDeadlineSeconds": 3, "backoffLimit": 0}
    apply(ground, ns, slow)
    obj = wait_phase(ground, ns, "deadline", "Failed", 60)
    c = cond(obj, "Failed")
    assert c["reason"] == "DeadlineExceeded" and "runPolicy.activeDeadlineSeconds" in c["message"]

    quick = small_gpu_job("ttl")
    quick["spec"]["runPolicy"] = {"ttlSecondsAfterFinished": 0}
    apply(ground, ns, quick)
    wait_phase(ground, ns, "ttl", "Succeeded", 60)
    wait_for("ttl-after-finished removes the Job", lambda: ground.kubectl(
        "get", "job", "ttl-r1", "-n", ns, check=False).returncode != 0, 60)
    time.sleep(3)  # the operator sees the deletion and must not recreate a finished run's Job
    assert ground.kubectl("get", "job", "ttl-r1", "-n", ns, check=False).returncode != 0
    assert phase(ground, ns, "ttl") == "Succeeded"


def test_preempted_pod_is_retried_without_counting_against_backoff(ground, operator, ns):
    job = small_gpu_job("preempt", delay="300s")
    job["spec"]["runPolicy"] = {"backoffLimit": 0}
    apply(ground, ns, job)
    wait_phase(ground, ns, "preempt", "Running", 60)
    pod = ground.kubectl_json("get", "pods", "-n", ns, "-l", "kubetune.io/job=preempt")["items"][0]
    # What the scheduler's preemption does: mark the pod with DisruptionTarget, then delete it.
    # The eviction API sets the condition the same way; the Job's podFailurePolicy ignores it.
    ground.kubectl("create", "--raw", f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}/eviction", "-f", "-",
                   stdin=json.dumps({"apiVersion": "policy/v1", "kind": "Eviction",
                                     "metadata": {"name": pod["metadata"]["name"], "namespace": ns}}))
    wait_for("a replacement pod", lambda: any(
        p["metadata"]["uid"] != pod["metadata"]["uid"] for p in
        ground.kubectl_json("get", "pods", "-n", ns, "-l", "kubetune.io/job=preempt")["items"]), 60)
    job_obj = ground.kubectl_json("get", "job", "preempt-r1", "-n", ns)
    assert not any(c["type"] == "Failed" and c["status"] == "True" for c in job_obj["status"].get("conditions", []))
    assert phase(ground, ns, "preempt") in ("Running", "Starting")
