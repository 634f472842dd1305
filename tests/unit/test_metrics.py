"""The operator's per-job metrics: the phase series the chart's alerts join on."""
from __future__ import annotations

from kubetune.controller.metrics import PHASES, JobRow, JobTable


def _samples(table: JobTable, family: str) -> dict[tuple, float]:
    fam = next(f for f in table.collect() if f.name == family)
    return {tuple(sorted(s.labels.items())): s.value for s in fam.samples}


def test_each_job_has_one_phase_series_and_it_follows_the_phase():
    t = JobTable()
    t.rows[("team-a", "llama")] = JobRow(phase="Running", step=40, total_steps=100)
    t.rows[("team-b", "done")] = JobRow(phase="Succeeded", step=100, total_steps=100)
    t.rows[("team-b", "new")] = JobRow()  # not reconciled to a phase yet: no series
    key = lambda ns, name, phase: (("name", name), ("namespace", ns), ("phase", phase))  # noqa: E731
    assert _samples(t, "kubetune_finetunejob_phase") == {key("team-a", "llama", "Running"): 1.0,
                                                          key("team-b", "done", "Succeeded"): 1.0}
    # the per-job step of a finished job stays, so only the phase series tells it from a stalled one
    assert _samples(t, "kubetune_training_step")[(("name", "done"), ("namespace", "team-b"))] == 100.0

    t.rows[("team-a", "llama")].phase = "Suspended"
    assert key("team-a", "llama", "Running") not in _samples(t, "kubetune_finetunejob_phase")
    assert _samples(t, "kubetune_finetunejob_phase")[key("team-a", "llama", "Suspended")] == 1.0
    t.forget("team-a", "llama")
    assert [k for k in _samples(t, "kubetune_finetunejob_phase") if ("name", "llama") in k] == []


def test_phase_counts_still_cover_every_phase():
    t = JobTable()
    t.rows[("a", "x")] = JobRow(phase="Unschedulable")
    counts = {dict(k)["phase"]: v for k, v in _samples(t, "kubetune_finetunejobs").items()}
    assert counts == {p: (1.0 if p == "Unschedulable" else 0.0) for p in PHASES}


def test_each_preemption_is_counted_once_and_ignored_disruptions_are_not_retries():
    """The Job ignores disruptions (podFailurePolicy), so status.failed never shows them: the operator
    counts entries into Running=False/Preempted."""
    from kubetune.api.v1alpha1 import FineTuneJobStatus

    def status(reason):
        running = reason == "TrainerRunning"
        return FineTuneJobStatus.model_validate({"phase": "Running" if running else "Starting", "run": 1,
                                                 "conditions": [{"type": "Running", "status": str(running),
                                                                 "reason": reason, "message": "m",
                                                                 "lastTransitionTime": "2026-11-23T12:00:00Z"}]})

    t = JobTable()

    def counts():
        return (t.counters.registry.get_sample_value("kubetune_runs_preempted_total") or 0.0,
                t.counters.registry.get_sample_value("kubetune_runs_restarted_total") or 0.0)

    job = {"status": {"active": 1}}  # no status.failed: the disruption was ignored
    p0, r0 = counts()
    assert (p0, r0) == (0, 0)  # this operator's own counters
    t.update("a", "x", None, status("TrainerRunning"), job)
    t.update("a", "x", status("TrainerRunning"), status("Preempted"), job)
    t.update("a", "x", status("Preempted"), status("Preempted"), job)  # re-reconciled while it waits
    assert counts() == (p0 + 1, r0)
    t.update("a", "x", status("Preempted"), status("TrainerRunning"), job)
    t.update("a", "x", status("TrainerRunning"), status("Preempted"), job)  # preempted again
    assert counts() == (p0 + 2, r0)


def test_a_restarted_operator_does_not_recount_earlier_pod_failures():
    """A fresh operator process (a restart, a failover) first sees jobs whose Jobs already counted
    failures: only failures after that count, or every restart would show phantom retries."""
    from kubetune.api.v1alpha1 import FineTuneJobStatus

    running = FineTuneJobStatus.model_validate({"phase": "Running", "run": 1})
    t = JobTable()

    def restarted():
        return t.counters.registry.get_sample_value("kubetune_runs_restarted_total") or 0.0

    t.update("a", "old", running, running, {"status": {"failed": 2, "active": 1}})
    assert restarted() == 0
    t.update("a", "old", running, running, {"status": {"failed": 3, "active": 1}})
    assert restarted() == 1


def test_an_objectives_step_metrics_are_gauges_labelled_by_metric():
    """status.progress.metrics (a preference objective's rewardAccuracy, ...) become one series per metric;
    a job whose objective reports none (sft) has none, and a deleted job's go with it."""
    from kubetune.api.v1alpha1 import FineTuneJobStatus

    def status(metrics):
        return FineTuneJobStatus.model_validate({"phase": "Running", "run": 1, "progress": {
            "step": 8, "totalSteps": 24, "metrics": metrics}})

    t = JobTable()
    t.update("a", "dpo", None, status({"rewardAccuracy": 0.75, "rewardMargin": 0.5}), None)
    t.update("a", "sft", None, status(None), None)
    key = lambda name, metric: (("metric", metric), ("name", name), ("namespace", "a"))  # noqa: E731
    assert _samples(t, "kubetune_training_objective_metric") == {key("dpo", "rewardAccuracy"): 0.75,
                                                                 key("dpo", "rewardMargin"): 0.5}
    t.update("a", "dpo", None, status({"rewardAccuracy": 1.0}), None)  # the newest step's replace the last
    assert _samples(t, "kubetune_training_objective_metric") == {key("dpo", "rewardAccuracy"): 1.0}
    t.forget("a", "dpo")
    assert _samples(t, "kubetune_training_objective_metric") == {}


def test_the_end_of_run_evaluation_is_a_gauge_per_model_and_metric():
    """status.result.evaluation's base and tuned figures, labelled by model and metric (a dashboard plots
    the pair; the delta is their difference)."""
    from kubetune.api.v1alpha1 import FineTuneJobStatus

    done = FineTuneJobStatus.model_validate({"phase": "Succeeded", "run": 1, "result": {"evaluation": {
        "base": {"exactMatch": 0.0, "loss": 5.9}, "tuned": {"exactMatch": 0.83, "loss": 0.05},
        "delta": {"exactMatch": 0.83, "loss": -5.85}}}})
    t = JobTable()
    t.update("a", "sft", None, done, None)
    got = {(dict(k)["model"], dict(k)["metric"]): v for k, v in _samples(t, "kubetune_evaluation_metric").items()}
    assert got == {("base", "exactMatch"): 0.0, ("base", "loss"): 5.9, ("tuned", "exactMatch"): 0.83,
                   ("tuned", "loss"): 0.05}
