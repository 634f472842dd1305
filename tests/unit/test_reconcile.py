"""The operator's state machine, on observations built by hand (pure: no API, no clock)."""
from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone

from kubetune.api.v1alpha1 import FineTuneJobStatus, TrainerProgress
from kubetune.api.validation import parse_spec
from kubetune.controller.fleet import read_fleet
from kubetune.controller.reconcile import Observed, reconcile, status_patch
from kubetune.estimator import resolve_architecture

from builders import OPERATOR_SPEC, ready_nodes

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
SPEC = OPERATOR_SPEC  # shared with test_operator_state
FLEET = read_fleet(ready_nodes(), [])


def observe(spec=None, status=None, generation=1, **kw) -> Observed:
    s = parse_spec(spec or SPEC)
    return Observed(name="demo", namespace="ml", uid="u1", generation=generation, spec=s,
                    status=status or FineTuneJobStatus(), fleet=FLEET, arch=resolve_architecture(s.model), **kw)


def job(conds=(), suspend=False, failed=0):
    return {"metadata": {"name": "demo-r1", "labels": {}}, "spec": {"suspend": suspend},
            "status": {"conditions": [{"type": t, "status": "True", **extra} for t, extra in conds], "failed": failed}}


def pod(phase="Running", terminated=None, node="kwok-l4-0"):
    cs = [{"name": "trainer", "state": {"terminated": terminated} if terminated else {"running": {}}}]
    return {"metadata": {"name": "demo-r1-abc"}, "spec": {"nodeName": node},
            "status": {"phase": phase, "containerStatuses": cs}}


def cond(status, type_):
    return next((c for c in status.conditions if c.type == type_), None)


def started():
    out = reconcile(observe(), T0)
    return out, out.status


def test_new_job_is_validated_placed_and_gets_children():
    out, st = started()
    assert st.phase == "Starting" and st.run == 1 and st.observed_generation == 1
    assert [o["kind"] for o in out.create] == ["ConfigMap", "Job"]
    assert cond(st, "Validated").status == "True" and cond(st, "Scheduled").reason == "Placed"
    assert st.estimate.per_gpu_bytes > 0 and st.estimate.per_gpu.endswith("Gi")
    assert st.placement.gpu_product and st.placement.micro_batch_size == 4
    assert st.history[0].run == 1 and st.history[0].generation == 1 and st.history[0].start_time == T0
    # one Event for the new job: Placed says it was valid too
    assert [e[1] for e in out.events] == ["Placed"]


def test_reconcile_is_idempotent():
    a = reconcile(observe(), T0)
    b = reconcile(observe(), T0)
    assert status_patch(a.status) == status_patch(b.status) and a.create == b.create
    # and a second pass over its own result changes nothing and makes nothing
    again = reconcile(observe(status=a.status, job=job(), pods=[]), T0 + timedelta(seconds=5))
    assert again.create == [] and again.status.run == 1


def test_auto_batch_resolves_and_keeps_the_effective_batch():
    spec = copy.deepcopy(SPEC)
    spec["training"] = {"maxSteps": 10, "microBatchSize": "auto", "effectiveBatchSize": 32}
    spec["resources"] = {"gpusPerNode": 2}
    st = reconcile(observe(spec), T0).status
    mbs, ga = st.placement.micro_batch_size, st.placement.gradient_accumulation_steps
    assert mbs >= 1 and mbs * ga * 2 >= 32 and mbs * (ga - 1) * 2 < 32


def test_the_estimate_prices_the_accumulation_the_run_will_use():
    """effectiveBatchSize 16 at micro batch 2 on one GPU: 8 accumulation steps. Accumulated gradients
    live through each forward, which a full fine-tune without accumulation never holds: the status
    estimate is that of the plan with 8, not the spec's default of 1. (Without checkpointing, where the
    forward's end is the peak: with it, this tied model peaks at the backward's end, where every
    gradient is alive either way.)"""
    from kubetune.estimator import estimate
    from kubetune.plan import plan_from_spec

    spec = copy.deepcopy(SPEC)
    spec["method"] = {"type": "full"}
    spec["training"] = {"maxSteps": 10, "microBatchSize": 2, "effectiveBatchSize": 16, "gradientCheckpointing": False}
    o = observe(spec)
    st = reconcile(o, T0).status
    assert st.placement.gradient_accumulation_steps == 8
    with_ga = estimate(o.arch, plan_from_spec(o.spec, gradient_accumulation_steps=8)).total_bytes
    without = estimate(o.arch, plan_from_spec(o.spec)).total_bytes
    print(f"\nfull, micro batch 2: {with_ga / 2**30:.2f} GiB with 8 accumulation steps, {without / 2**30:.2f} without")
    assert st.estimate.per_gpu_bytes == with_ga > without


def test_too_big_is_unschedulable_with_fit_advice():
    spec = copy.deepcopy(SPEC)
    spec["model"]["uri"] = "hf://meta-llama/Llama-3.1-70B"
    spec["method"] = {"type": "full"}
    out = reconcile(observe(spec), T0)
    st = out.status
    assert st.phase == "Unschedulable" and out.create == []
    c = cond(st, "Scheduled")
    assert c.status == "False" and c.reason == "InsufficientGPUMemory"
    assert "the largest GPU available to this job has 80.0 GiB" in c.message and "Options that fit:" in c.message
    assert "qlora" in c.message.lower() or "fsdp" in c.message.lower()
    assert out.events[-1][0] == "Warning"
    # FSDP advice also names the host memory rank 0 then needs (the whole 70B in bf16: 131 GiB)
    fsdp = [o for o in c.message.split("Options that fit: ")[1].split("; ") if "with FSDP" in o]
    assert fsdp and all(o.rstrip(".").endswith(", with spec.resources.memory at least 153Gi)") for o in fsdp), c.message
    spec["resources"] = {"memory": "200Gi"}
    c = cond(reconcile(observe(spec), T0).status, "Scheduled")
    assert "with FSDP" in c.message and "spec.resources.memory" not in c.message


def test_qlora_under_fsdp_that_fits_only_once_sharded_says_the_load_sets_the_peak():
    spec = copy.deepcopy(SPEC)
    spec["model"]["uri"] = "hf://meta-llama/Llama-3.1-70B"
    spec["method"] = {"type": "qlora"}
    spec["training"] = {"maxSteps": 100, "microBatchSize": 1, "sharding": "fsdp"}
    spec["resources"] = {"gpusPerNode": 4, "gpuProduct": "NVIDIA-L4"}
    out = reconcile(observe(spec), T0)
    c = cond(out.status, "Scheduled")
    assert out.status.phase == "Unschedulable" and c.reason == "InsufficientGPUMemory", c
    assert "the largest GPU available to this job has 22.5 GiB" in c.message
    assert "every GPU holds the whole 4-bit model" in c.message and "use LoRA with FSDP" in c.message, c.message
    assert c.message.endswith("Options that fit: as written it fits NVIDIA-H100-80GB-HBM3 GPUs (79.6 GiB), which its "
                              "resources rule out (gpuProduct, minGpuMemory, nodeSelector, tolerations or "
                              "gpusPerNode): "
                              "relax them."), c.message
    spec["resources"] = {"gpusPerNode": 4, "gpuProduct": "NVIDIA-A100-SXM4-80GB"}  # holds the whole 4-bit model
    assert cond(reconcile(observe(spec), T0).status, "Scheduled").reason == "Placed"


def test_a_missing_volume_claim_waits_in_pending_naming_it():
    msg = "PersistentVolumeClaim 'models' (spec.model.uri) does not exist in namespace ml: create it, or fix the URI"
    out = reconcile(observe(absent={"VolumeClaimNotFound": msg}), T0)
    c = cond(out.status, "Validated")
    assert out.status.phase == "Pending" and c.reason == "VolumeClaimNotFound" and c.message == msg
    assert out.create == []


def test_a_pod_too_small_to_hold_the_model_it_reads_whole_waits_instead_of_being_oom_killed():
    # Llama-3.1-8B LoRA on 4 GPUs with FSDP: rank 0 reads all 16 GB into host memory
    spec = copy.deepcopy(SPEC)
    spec.update(model={"uri": "hf://meta-llama/Llama-3.1-8B"}, resources={"gpusPerNode": 4, "memory": "12Gi"})
    spec["training"] = {**spec["training"], "sharding": "fsdp"}
    out = reconcile(observe(spec), T0)
    c = cond(out.status, "Validated")
    assert out.status.phase == "Pending" and c.status == "False" and c.reason == "InsufficientHostMemory"
    assert out.create == [] and out.status.estimate is not None
    assert c.message.startswith("spec.resources.memory 12Gi cannot hold the whole model, 15.0 GiB, which the trainer "
                                "reads into host memory (rank 0 reads it whole under FSDP)"), c.message
    need = int(c.message.rsplit("at least ", 1)[1].removesuffix("Gi"))
    assert 15.0 * 1.1 + 8 <= need < 15.0 * 1.1 + 10
    spec["resources"]["memory"] = f"{need}Gi"
    out = reconcile(observe(spec), T0)
    assert cond(out.status, "Validated").status == "True" and out.status.phase in ("Starting", "Unschedulable")
    # a single GPU streams the model onto itself: no host-memory floor; merging the adapter has one
    one = copy.deepcopy(SPEC)
    one["resources"] = {"gpusPerNode": 1, "memory": "1Gi"}
    assert cond(reconcile(observe(one), T0).status, "Validated").status == "True"
    one["output"] = {"mergeAdapter": True}
    c = cond(reconcile(observe(one), T0).status, "Validated")
    assert c.reason == "InsufficientHostMemory"
    assert ("model, 0.9 GiB, which the trainer reads into host memory (output.mergeAdapter loads it whole)"
            in c.message)


def test_a_missing_service_account_waits_in_pending_naming_it():
    msg = "ServiceAccount 'trainer-s3' (spec.storage.serviceAccountName) does not exist in namespace ml: create it"
    out = reconcile(observe(absent={"ServiceAccountNotFound": msg}), T0)
    c = cond(out.status, "Validated")
    assert out.status.phase == "Pending" and c.reason == "ServiceAccountNotFound" and c.message == msg
    assert out.create == []


def test_missing_secret_and_unknown_model_wait_in_pending():
    out = reconcile(observe(absent={"SecretNotFound": "Secret 's3' does not exist",
                                    "ServiceAccountNotFound": "ServiceAccount 'trainer' does not exist"}), T0)
    assert out.status.phase == "Pending" and cond(out.status, "Validated").reason == "SecretNotFound"
    assert out.create == []
    o = observe()
    o.arch, o.arch_error = None, "spec.model.uri hf://x/y: not in kubetune's model catalog"
    out = reconcile(o, T0)
    c = cond(out.status, "Validated")
    assert c.reason == "ModelConfigUnavailable" and "set spec.model.architecture" in c.message
    # once the Secret exists, becoming valid is news of its own
    later = reconcile(observe(status=out.status), T0 + timedelta(seconds=30))
    assert [e[1] for e in later.events] == ["Valid", "Placed"] and later.status.phase == "Starting"


def test_invalid_spec_fails_with_the_field():
    o = Observed(name="demo", namespace="ml", uid="u1", generation=1, spec=None,
                 spec_error="spec.training: set exactly one of training.epochs and training.maxSteps")
    out = reconcile(o, T0)
    assert out.status.phase == "Failed"
    assert cond(out.status, "Validated").message.startswith("spec.training: set exactly one")


def test_running_mirrors_progress_and_checkpoints():
    _, st = started()
    prog = TrainerProgress.model_validate({
        "progress": {"step": 25, "totalSteps": 100, "loss": 1.5, "tokensPerSecond": 999.0, "etaSeconds": 30},
        "checkpoints": {"latestUri": "s3://ckpt/runs/ml/demo/run-1/checkpoints/step-20/", "latestStep": 20,
                        "latestTime": T0.isoformat(), "count": 1}})
    out = reconcile(observe(status=st, job=job(), pods=[pod()], progress=prog), T0 + timedelta(seconds=30))
    s = out.status
    assert s.phase == "Running" and s.placement.node == "kwok-l4-0"
    assert s.progress.percent == "25%" and s.progress.loss == 1.5
    assert cond(s, "CheckpointSynced").status == "True" and s.checkpoints.latest_step == 20
    assert "step 25/100" in cond(s, "Running").message
    assert s.progress.state == "training"
    assert cond(s, "Running").message == "run 1 is training on kwok-l4-0, step 25/100"


def test_a_deleted_namesakes_progress_is_not_shown_as_this_runs():
    """A FineTuneJob deleted with deletionPolicy Retain leaves its progress object where a new one of the
    same name reads: progress another UID wrote is as if not written; this UID's (or an older trainer's,
    without a UID) is mirrored."""
    _, st = started()
    ckpt = {"latestUri": "s3://ckpt/runs/ml/demo/run-1/checkpoints/step-240/", "latestStep": 240, "count": 12}

    def prog(**kw):
        return TrainerProgress.model_validate({"progress": {"step": 250, "totalSteps": 250}, "checkpoints": ckpt, **kw})

    out = reconcile(observe(status=st, job=job(), pods=[pod()], progress=prog(jobUid="u0")), T0 + timedelta(seconds=30))
    assert out.status.progress.step == 0 and out.status.checkpoints is None
    assert cond(out.status, "CheckpointSynced") is None  # no checkpoint of this run's yet
    assert cond(out.status, "Running").message == "run 1 is training on kwok-l4-0"  # no step/250 from the old run
    for mine in (prog(jobUid="u1"), prog()):
        out = reconcile(observe(status=st, job=job(), pods=[pod()], progress=mine), T0 + timedelta(seconds=30))
        assert out.status.progress.step == 250 and out.status.checkpoints.latest_step == 240


def test_an_s3_outage_shows_in_checkpoint_synced_and_clears_when_s3_answers_again():
    """The operator's progress read failing is not a frozen status: CheckpointSynced turns False with
    StorageUnreachable and what was last read stays; the first read after the outage sets it True."""
    _, st = started()
    ckpt = {"latestUri": "s3://ckpt/runs/ml/demo/run-1/checkpoints/step-20/", "latestStep": 20,
            "latestTime": T0.isoformat(), "count": 1}
    prog = TrainerProgress.model_validate({"progress": {"step": 25, "totalSteps": 100}, "checkpoints": ckpt})
    st = reconcile(observe(status=st, job=job(), pods=[pod()], progress=prog), T0 + timedelta(seconds=30)).status
    err = ("cannot read the trainer's progress s3://ckpt/runs/ml/demo/run-1/progress.json: EndpointConnectionError: "
           'Could not connect to the endpoint URL: "http://s3.local:9000/ckpt/runs/ml/demo/run-1/progress.json"')
    out = reconcile(observe(status=st, job=job(), pods=[pod()], progress_error=err), T0 + timedelta(seconds=60))
    c = cond(out.status, "CheckpointSynced")
    assert (c.status, c.reason) == ("False", "StorageUnreachable") and c.message.startswith(err), c
    assert "newest checkpoint: step 20" in c.message and "retries its uploads" in c.message
    assert out.status.phase == "Running" and out.status.progress.step == 25 and out.status.checkpoints.latest_step == 20
    assert [(kind, reason) for kind, reason, _ in out.events] == [("Warning", "StorageUnreachable")]
    # the same outage on the next reconcile: no second Event
    again = reconcile(observe(status=out.status, job=job(), pods=[pod()], progress_error=err),
                      T0 + timedelta(seconds=90))
    assert again.events == [] and cond(again.status, "CheckpointSynced").reason == "StorageUnreachable"
    # S3 answers: the same checkpoint (none newer was committed meanwhile) is synced again
    back = reconcile(observe(status=again.status, job=job(), pods=[pod()], progress=prog),
                     T0 + timedelta(seconds=120))
    c = cond(back.status, "CheckpointSynced")
    assert (c.status, c.reason) == ("True", "CheckpointCommitted") and "step 20" in c.message, c


def test_the_running_condition_says_what_a_trainer_whose_step_does_not_move_is_doing():
    """Loading a 70B model or uploading a merged one takes minutes at a step that does not move."""
    _, st = started()
    for state, doing in (("starting", "is loading the model and data on kwok-l4-0"),
                         ("evaluating", "is evaluating on kwok-l4-0, step 100/100"),
                         ("uploading", "is uploading its outputs on kwok-l4-0, step 100/100")):
        step = 0 if state == "starting" else 100
        prog = TrainerProgress.model_validate({"state": state, "progress": {"step": step, "totalSteps": 100}})
        s = reconcile(observe(status=st, job=job(), pods=[pod()], progress=prog), T0 + timedelta(seconds=30)).status
        assert s.progress.state == state and cond(s, "Running").message == f"run 1 {doing}"


def test_completion_records_the_result():
    _, st = started()
    term = {"reason": "Completed", "message": "done",
            "result": {"adapterUri": "s3://ckpt/runs/ml/demo/run-1/final/",
                       "metrics": {"evalLoss": 1.2, "perplexity": 3.32, "baseEvalLoss": 2.5}}}
    out = reconcile(observe(status=st, job=job([("Complete", {})]),
                            pods=[pod("Succeeded", {"exitCode": 0, "message": json.dumps(term)})]), T0)
    s = out.status
    assert s.phase == "Succeeded" and cond(s, "Succeeded").status == "True"
    assert s.result.adapter_uri.endswith("/final/") and s.result.metrics["evalLoss"] == 1.2
    assert "eval loss 1.2" in cond(s, "Succeeded").message
    assert s.history[0].phase == "Succeeded" and s.history[0].result.metrics["perplexity"] == 3.32
    assert reconcile(observe(status=s), T0).create == []  # finished and unchanged: nothing to do


def test_a_multi_node_run_takes_its_result_from_rank_0_which_holds_the_outputs():
    """Every rank writes a termination message; only rank 0 uploads, so only its result names the adapter.
    Seen on two real nodes: rank 1 finished a second later and its message (no adapterUri) was taken."""
    _, st = started()
    metrics = {"evalLoss": 1.2, "baseEvalLoss": 2.5, "steps": 30.0}
    rank0 = {"reason": "Completed", "message": "trained 30 steps",
             "result": {"adapterUri": "s3://ckpt/runs/ml/demo/run-1/final/", "metrics": metrics}}
    rank1 = {"reason": "Completed", "message": "trained 30 steps", "result": {"metrics": metrics}}

    def ranked(index: int, term: dict, finished: str) -> dict:
        p = pod("Succeeded", {"exitCode": 0, "message": json.dumps(term), "finishedAt": finished})
        p["metadata"]["annotations"] = {"batch.kubernetes.io/job-completion-index": str(index)}
        return p

    for order in ((0, 1), (1, 0)):
        pods = {0: ranked(0, rank0, "2026-01-01T00:00:10Z"), 1: ranked(1, rank1, "2026-01-01T00:00:11Z")}
        out = reconcile(observe(status=st, job=job([("Complete", {})]), pods=[pods[i] for i in order]), T0)
        assert out.status.phase == "Succeeded"
        assert out.status.result.adapter_uri == "s3://ckpt/runs/ml/demo/run-1/final/", order
    # a rank that failed later than rank 0 says why the run failed, whatever rank 0 said
    bad = {"reason": "BadData", "message": "train.jsonl line 7: missing 'output'"}
    out = reconcile(observe(status=st, job=job([("Failed", {"reason": "PodFailurePolicy"})]),
                            pods=[ranked(0, {"reason": "Error", "message": "peer gone"}, "2026-01-01T00:00:10Z"),
                                  ranked(1, bad, "2026-01-01T00:00:11Z")]), T0)
    assert cond(out.status, "Failed").reason == "BadData"


def test_bad_data_failure_names_the_fix():
    _, st = started()
    term = {"reason": "BadData", "message": "train.jsonl lines 3, 7: missing 'output'"}
    out = reconcile(observe(status=st, job=job([("Failed", {"reason": "PodFailurePolicy"})]),
                            pods=[pod("Failed", {"exitCode": 3, "message": json.dumps(term)})]), T0)
    c = cond(out.status, "Failed")
    assert out.status.phase == "Failed" and c.reason == "BadData"
    assert "lines 3, 7" in c.message and "dataset.onBadLine: skip" in c.message
    assert "change spec.runPolicy.rerun to run again" in c.message  # data fixed in place is no spec change


def test_a_model_the_trainer_cannot_load_fails_at_once_naming_the_fix():
    _, st = started()
    term = {"reason": "ModelLoadFailed",
            "message": "hf://meta-llama/Llama-3.1-8B: gated on the Hugging Face Hub, and no token was given: set "
                       "spec.model.tokenSecret to a Secret holding an HF_TOKEN with access"}
    out = reconcile(observe(status=st, job=job([("Failed", {"reason": "PodFailurePolicy"})]),
                            pods=[pod("Failed", {"exitCode": 4, "message": json.dumps(term)})]), T0)
    c = cond(out.status, "Failed")
    assert out.status.phase == "Failed" and c.reason == "ModelLoadFailed" and out.create == []
    assert "set spec.model.tokenSecret" in c.message and "Fix spec.model" in c.message


def test_oom_retries_once_with_half_the_batch_then_fails():
    _, st = started()
    term = {"reason": "OutOfMemory", "message": "CUDA out of memory at step 3 (micro batch 4)"}
    oom_pod = pod("Failed", {"exitCode": 6, "reason": "Error", "message": json.dumps(term)})
    out = reconcile(observe(status=st, job=job([("Failed", {"reason": "PodFailurePolicy"})]), pods=[oom_pod]), T0)
    s = out.status
    assert s.run == 2 and [h.reason for h in s.history] == ["OutOfMemoryRetry", None]
    assert s.history[1].overrides.micro_batch_size == 2 and s.history[1].overrides.gradient_accumulation_steps == 2
    assert [o["metadata"]["name"] for o in out.create] == ["demo-r2-config", "demo-r2"]
    assert "microBatchSize: 2" in out.create[0]["data"]["trainer.yaml"]
    again = reconcile(observe(status=s, job=job([("Failed", {})]), pods=[oom_pod]), T0)
    assert again.status.phase == "Failed" and cond(again.status, "Failed").reason == "OutOfMemory"
    assert again.create == [] and "microBatchSize" in cond(again.status, "Failed").message


def test_a_pod_the_kernel_oom_killed_needs_host_memory_not_a_smaller_batch():
    _, st = started()
    killed = pod("Failed", {"exitCode": 137, "reason": "OOMKilled"})
    out = reconcile(observe(status=st, job=job([("Failed", {"reason": "PodFailurePolicy"})]), pods=[killed]), T0)
    c = cond(out.status, "Failed")
    assert out.status.phase == "Failed" and c.reason == "HostOutOfMemory" and out.create == []  # no retry
    assert [h.reason for h in out.status.history] == ["HostOutOfMemory"]
    assert "Raise spec.resources.memory" in c.message and "(32Gi)" in c.message
    # the trainer's own CUDA OOM report wins over the exit code of a worker killed after it
    term = {"reason": "OutOfMemory", "message": "CUDA out of memory"}
    both = pod("Failed", {"exitCode": 137, "reason": "OOMKilled", "message": json.dumps(term)})
    out = reconcile(observe(status=st, job=job([("Failed", {"reason": "PodFailurePolicy"})]), pods=[both]), T0)
    assert [h.reason for h in out.status.history] == ["OutOfMemoryRetry", None]


def test_suspend_patches_the_job_and_resume_clears_it():
    _, st = started()
    spec = copy.deepcopy(SPEC)
    spec["runPolicy"] = {"suspend": True}
    out = reconcile(observe(spec, status=st, job=job(), pods=[pod()]), T0)
    assert out.job_patch == {"spec": {"suspend": True}} and out.status.phase == "Suspended"
    assert cond(out.status, "Suspended").status == "True"
    back = reconcile(observe(SPEC, status=out.status, job=job(suspend=True), pods=[]), T0)
    assert back.job_patch == {"spec": {"suspend": False}}
    assert cond(back.status, "Suspended").status == "False" and back.status.run == 1


def test_job_created_suspended_is_suspended_at_once():
    spec = copy.deepcopy(SPEC)
    spec["runPolicy"] = {"suspend": True}
    out = reconcile(observe(spec), T0)
    assert out.create[-1]["spec"]["suspend"] is True
    assert out.status.phase == "Suspended" and out.status.history[0].phase == "Suspended"
    assert cond(out.status, "Suspended").status == "True" and cond(out.status, "Running").reason == "Suspended"
    assert [e[1] for e in out.events] == ["Placed", "Suspended"]
    # the Job controller's Suspended condition then changes nothing: no status write, no Event
    again = reconcile(observe(spec, status=out.status, job=job([("Suspended", {})], suspend=True), pods=[]), T0)
    assert again.status == out.status and again.events == [] and again.job_patch is None


def test_spec_change_after_finish_starts_run_two_keeping_history():
    _, st = started()
    done = reconcile(observe(status=st, job=job([("Complete", {})]), pods=[]), T0).status
    out = reconcile(observe(status=done, generation=2), T0 + timedelta(hours=1))
    assert out.status.run == 2 and [h.run for h in out.status.history] == [1, 2]
    assert out.status.history[0].phase == "Succeeded" and out.status.history[1].generation == 2
    assert out.create[-1]["metadata"]["name"] == "demo-r2"


def test_rerun_starts_a_new_run_of_a_failed_job_with_the_same_spec():
    """runPolicy.rerun is only a spec change: a failed run is retried once its cause is fixed (here,
    data fixed in place) without touching anything else."""
    _, st = started()
    failed = reconcile(observe(status=st, job=job([("Failed", {"reason": "BackoffLimitExceeded"})]), pods=[]),
                       T0).status
    assert failed.phase == "Failed"
    same = reconcile(observe(status=failed), T0 + timedelta(minutes=5))
    assert same.create == [] and same.status.run == 1  # nothing changed: nothing starts
    rerun = copy.deepcopy(SPEC)
    rerun.setdefault("runPolicy", {})["rerun"] = "data-v2"
    out = reconcile(observe(rerun, status=failed, generation=2), T0 + timedelta(hours=1))
    assert out.status.run == 2 and [h.phase for h in out.status.history] == ["Failed", "Starting"]
    assert out.create[-1]["metadata"]["name"] == "demo-r2"


def test_spec_change_while_running_is_queued():
    _, st = started()
    out = reconcile(observe(status=st, generation=2, job=job(), pods=[pod()]), T0)
    assert out.create == [] and out.status.run == 1 and out.status.phase == "Running"
    assert ("Normal", "SpecChangeQueued", "generation 2 will start as run 2 when run 1 ends") in out.events


def test_queued_spec_change_starts_when_the_run_ends():
    _, st = started()
    running = reconcile(observe(status=st, generation=2, job=job(), pods=[pod()]), T0).status
    again = reconcile(observe(status=running, generation=2, job=job(), pods=[pod()]), T0)
    assert not any(e[1] == "SpecChangeQueued" for e in again.events)  # said once, not every resync
    out = reconcile(observe(status=running, generation=2, job=job([("Complete", {})]), pods=[]), T0)
    assert out.status.run == 2 and out.status.history[0].phase == "Succeeded"
    assert out.status.history[1].generation == 2 and out.create[-1]["metadata"]["name"] == "demo-r2"


def test_deleted_job_of_an_active_run_is_recreated():
    _, st = started()
    out = reconcile(observe(status=st, job=None), T0)
    assert [o["metadata"]["name"] for o in out.create] == ["demo-r1-config", "demo-r1"]
    assert out.status.run == 1


def test_status_patch_clears_what_a_new_run_resets():
    _, st = started()
    body = status_patch(st)
    assert body["checkpoints"] is None and body["result"] is None and body["phase"] == "Starting"


def test_kueue_suspended_job_is_queued_not_unsuspended():
    spec = copy.deepcopy(SPEC)
    spec["runPolicy"] = {"queueName": "team-a"}
    out, st = reconcile(observe(spec), T0), None
    st = out.status
    j = job(suspend=True)
    j["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a"}
    out = reconcile(observe(spec, status=st, job=j, pods=[]), T0)
    assert out.job_patch is None and out.status.phase == "Pending"
    assert cond(out.status, "Scheduled").reason == "Queued"


def test_a_preempted_pod_is_reported_while_its_replacement_starts():
    _, st = started()
    msg = "stopped by SIGTERM at step 37/100: checkpoint checkpoint-00000037 committed; the next pod resumes from it"
    gone = pod("Failed", terminated={"exitCode": 143, "finishedAt": "2026-11-23T12:05:00Z",
                                     "message": json.dumps({"reason": "Preempted", "message": msg, "step": 37})})
    pending = pod("Pending")
    pending["status"] = {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False",
         "message": "0/8 nodes are available: 8 Insufficient nvidia.com/gpu"}]}
    out = reconcile(observe(status=st, job=job(failed=1), pods=[gone, pending]), T0 + timedelta(minutes=5))
    c = cond(out.status, "Running")
    assert out.status.phase == "Starting" and c.status == "False" and c.reason == "Preempted"
    assert c.message.startswith("run 1: stopped by SIGTERM at step 37/100: checkpoint checkpoint-00000037 committed")
    assert "waiting for the replacement pod (pod demo-r1-abc is not scheduled yet: 0/8 nodes are available" in c.message
    assert out.create == []
    # once the replacement runs, it is an ordinary running run again
    out = reconcile(observe(status=out.status, job=job(failed=1), pods=[gone, pod("Running")]),
                    T0 + timedelta(minutes=6))
    assert out.status.phase == "Running" and cond(out.status, "Running").reason == "TrainerRunning"


def test_a_preempted_pod_already_deleted_is_reported_from_the_trainers_progress():
    """An evicted pod is deleted soon after it exits, often before the operator lists pods: the
    trainer's progress object carries the same message."""
    _, st = started()
    msg = "stopped by SIGTERM at step 37/100: checkpoint checkpoint-00000037 committed; the next pod resumes from it"
    progress = TrainerProgress.model_validate({"state": "preempted", "message": msg,
                                               "progress": {"step": 37, "totalSteps": 100}})
    out = reconcile(observe(status=st, job=job(), pods=[], progress=progress), T0 + timedelta(minutes=5))
    c = cond(out.status, "Running")
    assert out.status.phase == "Starting" and (c.status, c.reason) == ("False", "Preempted")
    assert c.message == (f"run 1: {msg}; waiting for the replacement pod (waiting for the Job controller to create "
                         "the pod)")
    # the replacement running wins over the stale progress object
    out = reconcile(observe(status=out.status, job=job(), pods=[pod("Running")], progress=progress),
                    T0 + timedelta(minutes=6))
    assert out.status.phase == "Running" and cond(out.status, "Running").reason == "TrainerRunning"
    # a progress object from before the message field still reads as preempted
    old = TrainerProgress.model_validate({"state": "preempted", "progress": {"step": 37}})
    out = reconcile(observe(status=st, job=job(), pods=[], progress=old), T0 + timedelta(minutes=5))
    assert cond(out.status, "Running").message.startswith("run 1: stopped at step 37; waiting for the replacement pod")


def test_a_pod_that_cannot_pull_its_image_says_which_image_and_where_to_fix_it():
    _, st = started()
    p = pod("Pending")
    p["status"] = {"phase": "Pending", "containerStatuses": [{"name": "trainer", "image": "ghcr.io/acme/trainer:nope",
        "state": {"waiting": {"reason": "ImagePullBackOff",
                              "message": 'Back-off pulling image "ghcr.io/acme/trainer:nope"'}}}]}
    out = reconcile(observe(status=st, job=job(), pods=[p]), T0)
    c = cond(out.status, "Running")
    assert out.status.phase == "Starting" and (c.status, c.reason) == ("False", "ImagePullFailed")
    assert c.message == ('pod demo-r1-abc is ImagePullBackOff: Back-off pulling image "ghcr.io/acme/trainer:nope"; '
                         "check that image ghcr.io/acme/trainer:nope exists and that the node can pull it "
                         "(spec.runPolicy.image or the chart's trainer image; spec.runPolicy.imagePullSecrets for a "
                         "private registry)")
    # an image still being pulled is only pending
    p["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "ContainerCreating"}}
    out = reconcile(observe(status=st, job=job(), pods=[p]), T0)
    c = cond(out.status, "Running")
    assert (c.reason, c.message) == ("PodPending", "pod demo-r1-abc is ContainerCreating")


def test_a_run_failed_by_repeated_stops_says_how_to_let_it_continue():
    _, st = started()
    gone = pod("Failed", terminated={"exitCode": 143, "finishedAt": "2026-11-23T12:05:00Z",
                                     "message": json.dumps({"reason": "Preempted",
                                                            "message": "stopped by SIGTERM at step 9/100"})})
    out = reconcile(observe(status=st, job=job([("Failed", {"reason": "BackoffLimitExceeded"})], failed=7),
                            pods=[gone]), T0 + timedelta(minutes=5))
    c = cond(out.status, "Failed")
    assert out.status.phase == "Failed" and c.reason == "Preempted" and "raise runPolicy.backoffLimit" in c.message



def test_a_failed_run_with_checkpoints_says_how_to_continue_from_the_newest():
    _, st = started()
    prog = TrainerProgress.model_validate({"progress": {"step": 640, "totalSteps": 1000}, "checkpoints": {
        "latestUri": "s3://ckpt/runs/ml/demo/run-1/checkpoints/checkpoint-00000600", "latestStep": 600, "count": 3}})
    st = reconcile(observe(status=st, job=job(), pods=[pod()], progress=prog), T0).status
    out = reconcile(observe(status=st, job=job([("Failed", {"reason": "BackoffLimitExceeded"})]), pods=[]), T0)
    c = cond(out.status, "Failed")
    assert c.reason == "BackoffLimitExceeded" and c.message.endswith(
        "To continue from its newest checkpoint (step 600) once the cause is fixed, set spec.checkpoints.resumeFrom: "
        "s3://ckpt/runs/ml/demo/run-1/checkpoints/checkpoint-00000600 and change spec.runPolicy.rerun.")
    # a checkpoint cannot help a run whose spec or model is wrong
    term = {"reason": "BadConfig", "message": "spec.training.optimizer: adamw_8bit needs a CUDA GPU"}
    out = reconcile(observe(status=st, job=job([("Failed", {"reason": "PodFailurePolicy"})]),
                            pods=[pod("Failed", {"exitCode": 2, "message": json.dumps(term)})]), T0)
    assert "resumeFrom" not in cond(out.status, "Failed").message


def test_a_run_requests_the_local_disk_its_download_and_checkpoints_need():
    out, st = started()
    job = next(o for o in out.create if o["kind"] == "Job")
    req = job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    # Qwen2.5-0.5B from the Hub: 1 GB of bf16 weights, small LoRA checkpoints, 2 GiB of headroom
    assert st.placement.ephemeral_storage == req["ephemeral-storage"] == "4Gi", (st.placement, req)


def test_what_the_estimator_refuses_is_an_invalid_spec_not_a_crash():
    # a typo in a LoRA target (the estimator names the model's linear modules; a NUL byte is refused
    # earlier, by the spec's own pattern)
    for target in ("v_projj", "v_proj.x"):
        spec = copy.deepcopy(SPEC)
        spec["method"]["lora"] = {"targetModules": ["q_proj", target]}
        out = reconcile(observe(spec), T0)
        v = cond(out.status, "Validated")
        assert out.status.phase == "Failed" and not out.create
        assert v.status == "False" and v.reason == "InvalidSpec"
        assert f"LoRA target {target!r} is not a linear module of qwen2" in v.message and "o_proj" in v.message
        assert ("Warning", "InvalidSpec", v.message) in out.events


def test_a_pending_job_says_why_the_job_controller_makes_no_pod():
    _, st = started()
    obs = observe(status=st, job=job(), pods=[],
                  pod_create_error='pods "demo-r1-x" is forbidden: no PriorityClass with name training-high was found')
    running = cond(reconcile(obs, T0).status, "Running")
    assert running.reason == "PodPending"
    assert running.message.startswith("the Job controller cannot create the trainer pod: pods \"demo-r1-x\" is "
                                      "forbidden: no PriorityClass with name training-high was found")


def test_the_job_carries_the_placement_that_status_shows():
    from kubetune.controller.reconcile import placement_of

    out, st = started()
    job_obj = next(o for o in out.create if o["kind"] == "Job")
    assert placement_of(job_obj) == st.placement and st.placement.node
    assert placement_of({"metadata": {"annotations": {"kubetune.io/placement": "{not json"}}}) is None
    # the Job gone, and the fleet changed meanwhile: the recreated Job and status agree again
    small = [n for n in ready_nodes() if "a100" not in n["metadata"]["name"]]
    obs = observe(status=st, job=None)
    obs.fleet = read_fleet(small, [])
    again = reconcile(obs, T0)
    new_job = next(o for o in again.create if o["kind"] == "Job")
    assert placement_of(new_job) == again.status.placement


def test_an_inline_architecture_no_estimate_can_use_fails_as_invalid():
    spec = copy.deepcopy(SPEC)
    spec["model"] = {"uri": "s3://models/x/", "architecture": {
        "modelType": "llama", "hiddenSize": 65536, "numHiddenLayers": 1024, "numAttentionHeads": 1024,
        "intermediateSize": 262144, "vocabSize": 4194304}}
    s = parse_spec(spec)
    o = Observed(name="demo", namespace="ml", uid="u1", generation=1, spec=s, fleet=FLEET, arch=None,
                 arch_error="spec.model.architecture: the architecture has 3.9e+15 parameters, more than 1e+15")
    out = reconcile(o, T0)
    v = cond(out.status, "Validated")
    assert out.status.phase == "Failed" and v.reason == "InvalidSpec" and not out.create
    assert v.message.startswith("spec.model.architecture: the architecture has") and "Fix the spec" in v.message


def test_the_pure_core_loads_no_client_library():
    """reconcile (and the estimator it calls) stays pure: importing it loads no kubernetes, kopf or boto3."""
    import subprocess
    import sys

    code = ("import sys\nimport kubetune.controller.reconcile\n"
            "print([m for m in ('kubernetes', 'kopf', 'boto3', 'botocore') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_bf16_job_pinned_to_a_gpu_older_than_ampere_waits_with_the_way_out():
    spec = copy.deepcopy(SPEC)
    spec["resources"] = {"gpusPerNode": 1, "gpuProduct": "Tesla-T4"}
    out = reconcile(observe(spec), T0)
    c = cond(out.status, "Scheduled")
    assert out.status.phase == "Unschedulable" and c.reason == "NoMatchingNodes", c
    assert c.message.startswith("training.precision bf16 needs a GPU of compute capability 8.0 or newer"), c.message
    assert c.message.endswith("Options that fit: as written it fits Tesla-T4 GPUs (15.0 GiB), where "
                              "training.precision bf16 cannot run (it needs compute capability 8.0+): set "
                              "training.precision to fp16."), c.message
    spec["training"] = {**spec["training"], "precision": "fp16"}
    placed = reconcile(observe(spec), T0).status
    assert cond(placed, "Scheduled").reason == "Placed" and placed.placement.gpu_product == "Tesla-T4"
