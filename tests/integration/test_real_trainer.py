"""FineTuneJobs whose trainer pods run in the trainer image, under a real kubelet + containerd (real-0):
what KWOK's pretend pods and process-based pods cannot show (ownership, securityContext, mounts,
signals, cgroup limits). The image is the one `make images` builds from trainer-image/Dockerfile."""
from __future__ import annotations

import json

import pytest

from kubetune.devenv.ground import wait_until as wait_for

from opkit import Recorder, apply, cond, ftj, job_on_node, trainer_events, trainer_pods, wait_phase

pytestmark = pytest.mark.integration


def _running_pod(ground, ns: str, name: str) -> str:
    return next(p["metadata"]["name"] for p in trainer_pods(ground, ns, name) if p["status"].get("phase") == "Running")


def _latest_checkpoint(ground, ns: str, name: str) -> int | None:
    return ((ftj(ground, ns, name).get("status") or {}).get("checkpoints") or {}).get("latestStep")


# The quickstart itself runs through the chart's operator pod (test_chart_operator.py): the same trainer
# pod, image and checks.


STEPS, SAVE, BATCH = 150, 20, 8  # the disruption lands at steps 26-63 (seen): 150 leave it mid-run


def test_an_evicted_trainer_saves_its_step_under_runc_and_the_replacement_resumes_it(ground, operator, real_node, ns):
    """The Eviction API: the kubelet stops the container through containerd and runc, whose SIGTERM
    the trainer turns into a committed checkpoint of the step it is on (exit 143, within the grace
    period); the podFailurePolicy ignores the disruption and the replacement resumes that step."""
    pods, jobs = Recorder(ns), Recorder(ns, "finetunejobs")
    # the operator process is shared with other tests' jobs, so only this counter is this test's alone
    before = operator.metric("kubetune_runs_preempted_total") or 0.0
    try:
        apply(ground, ns, job_on_node(ground, real_node, "real-evict", STEPS, SAVE, BATCH))
        wait_for("a checkpoint", lambda: (_latest_checkpoint(ground, ns, "real-evict") or 0) >= SAVE, 300)
        first = _running_pod(ground, ns, "real-evict")
        from kubernetes import client

        pods.core.create_namespaced_pod_eviction(first, ns, client.V1Eviction(
            metadata=client.V1ObjectMeta(name=first, namespace=ns)))
        done = wait_phase(ground, ns, "real-evict", "Succeeded", 600)
    finally:
        pods.stop()
        jobs.stop()

    gone = pods.terminated(first)
    assert gone is not None, f"no terminal status recorded for {first}"
    assert any(c["type"] == "DisruptionTarget" and c["status"] == "True" for c in gone["status"]["conditions"])
    t = gone["status"]["containerStatuses"][0]["state"]["terminated"]
    term = json.loads(t["message"])
    assert t["exitCode"] == 143 and term["reason"] == "Preempted", t
    stopped = term["step"]
    assert SAVE < stopped < STEPS, term
    assert f"checkpoint checkpoint-{stopped:08d} committed; the next pod resumes from it" in term["message"]

    (replacement,) = [p["metadata"]["name"] for p in trainer_pods(ground, ns, "real-evict")
                      if p["metadata"]["name"] != first]
    events = trainer_events(ground, ns, replacement)
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed and resumed[0]["step"] == stopped, events[:5]
    assert sorted(e["step"] for e in events if e["event"] == "step") == list(range(stopped + 1, STEPS + 1))
    # Counted as a preemption, not as a pod failure against backoffLimit: one run, the Job never failed.
    assert (operator.metric("kubetune_runs_preempted_total") or 0.0) - before == 1.0
    st = done["status"]
    assert st["run"] == 1 and [h["run"] for h in st["history"]] == [1]
    job = ground.kubectl_json("get", "job", "-n", ns, "-l", "kubetune.io/job=real-evict")["items"][0]
    assert not job["status"].get("failed"), job["status"]
    assert st["result"]["metrics"]["steps"] == STEPS
    # Between the two pods, the FineTuneJob said why it was not running.
    said = [c for o in jobs.seen["real-evict"] for c in (o.get("status") or {}).get("conditions", [])
            if c["type"] == "Running" and c["reason"] == "Preempted"]
    assert said and said[0]["message"].startswith(f"run 1: stopped by SIGTERM at step {stopped}/{STEPS}"), said
    print(f"\nevicted {first} at step {stopped} (exit 143, checkpoint committed); {replacement} resumed there")


def test_a_deleted_trainer_pod_is_replaced_and_resumes_from_the_newest_checkpoint(ground, operator, real_node, ns):
    """`kubectl delete pod` mid-run: no disruption condition, so the Job counts a failure and makes a
    replacement, which resumes from the newest checkpoint in S3. At most one save interval is lost,
    and the loss curve goes on from where it was, not from the start."""
    apply(ground, ns, job_on_node(ground, real_node, "real-delete", STEPS, SAVE, BATCH))
    wait_for("a checkpoint", lambda: (_latest_checkpoint(ground, ns, "real-delete") or 0) >= SAVE, 300)
    first = _running_pod(ground, ns, "real-delete")
    before = {e["step"]: e["loss"] for e in trainer_events(ground, ns, first) if e["event"] == "step"}
    ground.kubectl("delete", "pod", first, "-n", ns, "--wait=true", timeout=120)
    done = wait_phase(ground, ns, "real-delete", "Succeeded", 600)

    (replacement,) = [p["metadata"]["name"] for p in trainer_pods(ground, ns, "real-delete")
                      if p["metadata"]["name"] != first]
    events = trainer_events(ground, ns, replacement)
    (resumed,) = [e for e in events if e["event"] == "resumed"]
    after = {e["step"]: e["loss"] for e in events if e["event"] == "step"}
    last_seen = max(before)
    assert SAVE <= resumed["step"] and last_seen - resumed["step"] <= SAVE, (resumed, last_seen)
    assert min(after) == resumed["step"] + 1 and max(after) == STEPS
    # the curve continues: the replacement's first losses are the trained model's, far below step 1's
    first_after = [after[s] for s in sorted(after)[:5]]
    assert max(first_after) < before[1] * 0.8, (before[1], first_after)
    if resumed["step"] + 1 in before:  # the same step, computed twice from the same state
        assert abs(after[resumed["step"] + 1] - before[resumed["step"] + 1]) < 1e-3
    assert done["status"]["result"]["metrics"]["steps"] == STEPS
    print(f"\ndeleted {first} after step {last_seen}; {replacement} resumed at {resumed['step']}; loss step 1 "
          f"{before[1]:.3f}, before delete {before[last_seen]:.3f}, after resume {first_after[0]:.3f}")


def test_a_trainer_over_its_memory_limit_is_oom_killed_and_the_job_says_raise_memory(ground, operator, real_node, ns):
    """The cgroup memory limit is real here: the kernel OOM-kills the container (OOMKilled, 137), and the
    FineTuneJob fails at once with HostOutOfMemory and the advice, not a retry of the same limit."""
    obj = job_on_node(ground, real_node, "real-oom", 10)
    obj["spec"]["resources"]["memory"] = "300Mi"  # less than torch and the model need
    apply(ground, ns, obj)
    failed = wait_phase(ground, ns, "real-oom", "Failed", 300)
    c = cond(failed, "Failed")
    assert c["reason"] == "HostOutOfMemory", c
    assert "The kernel OOM-killed the trainer" in c["message"] and "(300Mi)" in c["message"], c
    (pod,) = trainer_pods(ground, ns, "real-oom")
    t = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (t["reason"], t["exitCode"]) == ("OOMKilled", 137), t


def test_a_finetunejob_made_again_under_a_deleted_ones_name_does_not_continue_its_run(ground, operator, real_node, ns):
    """Deleted with its checkpoints kept (deletionPolicy Retain) and applied again under the same name, a
    FineTuneJob finds the old object's checkpoints in its run prefix. It fails with BadConfig and the
    ways out instead of resuming another object's run (test_units covers resumeFrom's way out)."""
    first = job_on_node(ground, real_node, "real-again", 12, 6)
    apply(ground, ns, first)
    old = wait_phase(ground, ns, "real-again", "Succeeded", 300)
    ground.kubectl("delete", "ftj", "real-again", "-n", ns, "--timeout=60s")

    apply(ground, ns, job_on_node(ground, real_node, "real-again", 12, 6))
    failed = wait_phase(ground, ns, "real-again", "Failed", 300)
    c = cond(failed, "Failed")
    assert c["reason"] == "BadConfig", c
    said = "holds the checkpoints of an earlier FineTuneJob of this name (uid " + old["metadata"]["uid"]
    assert said in c["message"], c
    assert "checkpoint-00000012" in c["message"] and "set spec.checkpoints.resumeFrom to" in c["message"], c
    # nor does its status show the old object's step 12 and checkpoints (its progress object names its UID)
    st = failed["status"]
    assert (st.get("progress") or {}).get("step", 0) == 0 and not st.get("checkpoints"), st
    print(f"\nmade again under the same name: {c['message'][:240]}...")
