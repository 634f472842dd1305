"""Preemption end to end, with the real trainer: the operator places a FineTuneJob on the local agent's
node (a kubelet that runs pods as processes), the trainer trains a tiny Llama from the ground's S3,
and the pod is evicted through the Eviction API midway. The trainer's SIGTERM handler saves and
uploads a checkpoint of the step it is on; the Job's podFailurePolicy ignores the disruption; the
replacement pod resumes from that checkpoint; the FineTuneJob finishes as one run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.demo import quickstart_for_local, upload_tiny_model_and_data
from kubetune.devenv.ground import wait_until as wait_for

from opkit import Recorder, apply, cond, ftj, local_agent, wait_phase

pytestmark = pytest.mark.integration

NODE = "local-preempt"
STEPS = 40


@pytest.fixture(scope="module")
def agent(ground, tmp_path_factory):
    # A slower trainer (0.4 s a step) so the eviction lands mid-run on any machine; a 3 s "image pull"
    # so the replacement pod's wait is long enough for the operator to report it.
    with local_agent(ground, tmp_path_factory.mktemp("agent"), NODE, {"KUBETUNE_DEBUG_STEP_SLEEP": "0.4"}, 3) as root:
        yield root


def test_an_evicted_trainer_saves_its_step_and_the_replacement_resumes_it(ground, operator, agent, ns):
    state = ground.state
    upload_tiny_model_and_data(ground.s3())
    obj = quickstart_for_local(state["s3"]["endpoint"])
    obj["metadata"]["name"] = "preempt"
    spec = obj["spec"]
    spec["resources"]["nodeSelector"]["kubernetes.io/hostname"] = NODE
    spec["training"] |= {"maxSteps": STEPS, "loggingSteps": 1, "evalSteps": 20}
    spec["checkpoints"] |= {"saveSteps": 10, "keep": 2}
    pods, jobs = Recorder(ns), Recorder(ns, "finetunejobs")
    # the operator process is shared with other tests' jobs, whose namespaces are being deleted (their
    # pods failing), so only this counter is this test's alone; the Job itself shows no failure below
    before = operator.metric("kubetune_runs_preempted_total") or 0.0
    try:
        apply(ground, ns, obj)
        wait_phase(ground, ns, "preempt", "Running", 120)
        # Evict once the step-10 checkpoint is committed: the SIGTERM then lands between checkpoints.
        wait_for("checkpoint 10 in status", lambda: ((ftj(ground, ns, "preempt").get("status") or {})
                                                     .get("checkpoints") or {}).get("latestStep") == 10, 120)
        first = next(p["metadata"]["name"] for p in ground.kubectl_json("get", "pods", "-n", ns)["items"]
                     if p["status"].get("phase") == "Running")
        from kubernetes import client

        pods.core.create_namespaced_pod_eviction(first, ns, client.V1Eviction(
            metadata=client.V1ObjectMeta(name=first, namespace=ns)))

        done = wait_phase(ground, ns, "preempt", "Succeeded", 300)
    finally:
        pods.stop()
        jobs.stop()

    # The evicted pod: DisruptionTarget, exit 143, and the trainer's own account of what it saved.
    gone = pods.terminated(first)
    assert gone is not None, f"no terminal status recorded for {first}"
    assert any(c["type"] == "DisruptionTarget" and c["status"] == "True" for c in gone["status"]["conditions"])
    t = gone["status"]["containerStatuses"][0]["state"]["terminated"]
    term = json.loads(t["message"])
    assert t["exitCode"] == 143 and term["reason"] == "Preempted", t
    stopped = term["step"]
    assert 10 < stopped < STEPS
    assert f"checkpoint checkpoint-{stopped:08d} committed; the next pod resumes from it" in term["message"]

    # The replacement resumed from exactly that step and finished the run.
    others = [n for n in pods.seen if n != first]
    assert len(others) == 1, pods.seen.keys()
    log = (Path(agent) / f"{ns}_{others[0]}" / "container.log").read_text()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed and resumed[0]["step"] == stopped, log[-3000:]
    steps = sorted(e["step"] for e in events if e["event"] == "step")
    assert steps == list(range(stopped + 1, STEPS + 1))
    print(f"\nevicted after checkpoint 10; the trainer saved step {stopped} on SIGTERM; {others[0]} resumed from it")

    # While the replacement waited for its image, the FineTuneJob said why it was not running.
    def conditions(o: dict) -> list[dict]:
        return (o.get("status") or {}).get("conditions", [])

    preempted = [(o["status"]["phase"], c) for o in jobs.seen["preempt"] for c in conditions(o)
                 if c["type"] == "Running" and c["reason"] == "Preempted"]
    assert preempted, [[(c["type"], c["reason"]) for c in conditions(o)] for o in jobs.seen["preempt"]]
    phase, c = preempted[0]
    assert phase == "Starting" and c["status"] == "False" and c["observedGeneration"] == 1
    assert c["message"].startswith(f"run 1: stopped by SIGTERM at step {stopped}/{STEPS}"), c["message"]
    assert f"checkpoint checkpoint-{stopped:08d} committed; the next pod resumes from it" in c["message"]
    assert "waiting for the replacement pod (" in c["message"], c["message"]
    # counted as a preemption, not as a pod failure retried against backoffLimit
    assert (operator.metric("kubetune_runs_preempted_total") or 0.0) - before == 1.0

    # One run, not counted against backoffLimit, and the result of the whole training.
    st = done["status"]
    assert st["run"] == 1 and [h["run"] for h in st["history"]] == [1]
    assert cond(done, "Succeeded")["status"] == "True"
    job = ground.kubectl_json("get", "job", "-n", ns, "-l", "kubetune.io/job=preempt")["items"][0]
    assert not job["status"].get("failed"), job["status"]
    m = st["result"]["metrics"]
    assert m["steps"] == STEPS and m["evalLoss"] < m["baseEvalLoss"] - 1.0, m
