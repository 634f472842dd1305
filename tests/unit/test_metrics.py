"""The operator's per-job metrics: the phase series the chart's alerts join on."""
from __future__ import annotations

from kubetune.controller.metrics import PHASES, JobRow, _Table


def _samples(table: _Table, family: str) -> dict[tuple, float]:
    fam = next(f for f in table.collect() if f.name == family)
    return {tuple(sorted(s.labels.items())): s.value for s in fam.samples}


def test_each_job_has_one_phase_series_and_it_follows_the_phase():
    t = _Table()
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
    t = _Table()
    t.rows[("a", "x")] = JobRow(phase="Unschedulable")
    counts = {dict(k)["phase"]: v for k, v in _samples(t, "kubetune_finetunejobs").items()}
    assert counts == {p: (1.0 if p == "Unschedulable" else 0.0) for p in PHASES}
