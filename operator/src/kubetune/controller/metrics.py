"""Prometheus metrics of the operator, served on /metrics.

Per-job gauges come from a table the handlers update after each reconcile and are rendered at
scrape time by a collector, so a deleted job's series disappear and "seconds since the last
checkpoint" is computed when Prometheus asks, not when the operator last looked.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from kubetune.api import constants
from kubetune.api.v1alpha1 import FineTuneJobStatus
from kubetune.controller.conditions import find

PHASES = constants.PHASES


class Counters:
    """The operator's counters and reconcile-time histogram, in a registry of their own: one per
    OperatorState (its JobTable), so two operators in one process (tests) count apart."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.created = Counter("kubetune_runs_created_total", "Trainer Jobs created (one per run).", registry=r)
        self.succeeded = Counter("kubetune_runs_succeeded_total", "Runs that succeeded.", registry=r)
        self.failed = Counter("kubetune_runs_failed_total", "Runs that failed.", ["reason"], registry=r)
        self.restarted = Counter(
            "kubetune_runs_restarted_total",
            "Trainer pods that failed and were retried within a run (counted against backoffLimit).",
            registry=r,
        )
        # Disruptions the Job ignores (podFailurePolicy) never reach status.failed: counted from the condition.
        self.preempted = Counter(
            "kubetune_runs_preempted_total",
            "Trainer pods stopped by preemption, eviction or drain; each saved its step and was replaced.",
            registry=r,
        )
        self.oom = Counter("kubetune_runs_oom_total", "Runs that ran out of memory.", registry=r)
        self.placement_failures = Counter(
            "kubetune_placement_failures_total", "Placements that found no GPU that fits.", ["reason"], registry=r
        )
        self.reconcile = Histogram(
            "kubetune_reconcile_duration_seconds",
            "Time to reconcile one FineTuneJob.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.errors = Counter(
            "kubetune_reconcile_errors_total", "Reconciles that raised (and will be retried).", registry=r
        )


@dataclass
class JobRow:
    phase: str | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    checkpoint_time: datetime | None = None
    estimate_bytes: int | None = None
    peak_bytes: int | None = None
    pod_failures: int = 0
    # an objective's newest per-step metrics (status.progress.metrics: rewardAccuracy, rewardMargin, ...)
    objective_metrics: dict[str, float] = field(default_factory=dict)
    # the end-of-run evaluation's test metrics: (base|tuned, metric) -> value
    evaluation: dict[tuple[str, str], float] = field(default_factory=dict)


# The per-job gauge families (key, name, help, labels after namespace and name), in /metrics' order.
JOB_GAUGES = (
    # Which phase each job is in: alerts such as "stalled while Running" need it, since the per-job
    # gauges below keep their last values after a job ends or is suspended.
    ("phase", "kubetune_finetunejob_phase", "1 for the phase each FineTuneJob is in.", ("phase",)),
    ("step", "kubetune_training_step", "Optimizer steps done.", ()),
    ("total", "kubetune_training_total_steps", "Optimizer steps planned.", ()),
    ("loss", "kubetune_training_loss", "Recent training loss.", ()),
    ("eval", "kubetune_training_eval_loss", "Latest validation loss.", ()),
    ("tps", "kubetune_training_tokens_per_second", "Training throughput.", ()),
    ("ckpt", "kubetune_training_seconds_since_checkpoint", "Seconds since the newest committed checkpoint.", ()),
    ("est", "kubetune_gpu_memory_estimate_bytes", "Per-GPU memory estimate.", ()),
    ("peak", "kubetune_gpu_memory_peak_bytes", "Peak per-GPU device memory the trainer reported.", ()),
    ("objective", "kubetune_training_objective_metric",
     "The training objective's newest per-step metrics (DPO's rewardAccuracy, rewardMargin, ...).", ("metric",)),
    ("evaluation", "kubetune_evaluation_metric",
     "The end-of-run evaluation on the test set, per model (base, tuned) and metric (loss, exactMatch, ...).",
     ("model", "metric")),
)  # fmt: skip
_CHECKPOINTING_PHASES = (constants.RUNNING, constants.STARTING, constants.SUSPENDED)


def _add_row(g: dict[str, GaugeMetricFamily], lab: list[str], r: JobRow, now: datetime) -> None:
    """One job's samples."""
    values = (("step", r.step), ("total", r.total_steps), ("loss", r.loss), ("eval", r.eval_loss),
              ("tps", r.tokens_per_second), ("est", r.estimate_bytes), ("peak", r.peak_bytes))  # fmt: skip
    for key, value in values:
        if value is not None:
            g[key].add_metric(lab, float(value))
    for metric, value in sorted(r.objective_metrics.items()):
        g["objective"].add_metric([*lab, metric], float(value))
    for (model, metric), value in sorted(r.evaluation.items()):
        g["evaluation"].add_metric([*lab, model, metric], float(value))
    if r.checkpoint_time is not None and r.phase in _CHECKPOINTING_PHASES:
        g["ckpt"].add_metric(lab, max(0.0, (now - r.checkpoint_time).total_seconds()))


class JobTable:
    """The per-job gauges, one row per FineTuneJob, rendered when Prometheus scrapes: a deleted job's
    series go with its row. One per operator (its OperatorState), with its Counters."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], JobRow] = {}
        self.lock = threading.Lock()
        self.counters = Counters()

    def collect(self):
        now = datetime.now(timezone.utc)
        by_phase = {p: 0 for p in PHASES}
        g = {
            key: GaugeMetricFamily(name, doc, labels=["namespace", "name", *extra])
            for key, name, doc, extra in JOB_GAUGES
        }
        with self.lock:
            rows = list(self.rows.items())
        for (ns, name), r in rows:
            if r.phase in by_phase:
                by_phase[r.phase] += 1
                g["phase"].add_metric([ns, name, r.phase], 1)
            _add_row(g, [ns, name], r, now)
        phase = GaugeMetricFamily("kubetune_finetunejobs", "FineTuneJobs by phase.", labels=["phase"])
        for p, n in by_phase.items():
            phase.add_metric([p], n)
        yield phase
        yield from g.values()

    def update(
        self, ns: str, name: str, old: FineTuneJobStatus | None, new: FineTuneJobStatus, job: dict | None
    ) -> None:
        key, c = (ns, name), self.counters
        with self.lock:
            first_sight = key not in self.rows
            row = self.rows.setdefault(key, JobRow())
            prev_phase = row.phase if row.phase is not None else (old.phase if old else None)
            row.phase = new.phase
            if new.progress:
                row.step, row.total_steps = new.progress.step, new.progress.total_steps
                row.loss, row.eval_loss = new.progress.loss, new.progress.eval_loss
                row.tokens_per_second = new.progress.tokens_per_second
                row.peak_bytes = new.progress.peak_gpu_memory_bytes
                row.objective_metrics = dict(new.progress.metrics or {})
            ev = new.result.evaluation if new.result else None
            row.evaluation = (
                {(m, k): v for m, d in (("base", ev.base), ("tuned", ev.tuned)) for k, v in d.items()} if ev else {}
            )
            row.checkpoint_time = new.checkpoints.latest_time if new.checkpoints else None
            row.estimate_bytes = new.estimate.per_gpu_bytes if new.estimate else None
            failures = int(((job or {}).get("status") or {}).get("failed") or 0)
            # failures from before this process saw the job (an operator restart, a failover) were
            # counted by whoever saw them: counting them again would show phantom restarts
            new_failures = 0 if first_sight else max(0, failures - row.pod_failures)
            row.pod_failures = failures
        if (old.run if old else None) != new.run and new.run:
            c.created.inc()
        if new.phase != prev_phase:
            if new.phase == constants.SUCCEEDED:
                c.succeeded.inc()
            elif new.phase == constants.FAILED:
                reason = new.history[-1].reason if new.history else "InvalidSpec"
                c.failed.labels(reason or "Unknown").inc()
        ran_oom = [r for r in new.history if r.reason in ("OutOfMemory", "OutOfMemoryRetry")]
        ran_oom_before = [r for r in (old.history if old else []) if r.reason in ("OutOfMemory", "OutOfMemoryRetry")]
        if len(ran_oom) > len(ran_oom_before):
            c.oom.inc(len(ran_oom) - len(ran_oom_before))
        if new.phase == constants.UNSCHEDULABLE and prev_phase != constants.UNSCHEDULABLE:
            sched = find(new.conditions, constants.SCHEDULED)
            c.placement_failures.labels(sched.reason if sched else "Unknown").inc()
        if new_failures and new.phase != constants.FAILED:
            c.restarted.inc(new_failures)
        if _preempted(new) and not (old and _preempted(old)):
            c.preempted.inc()

    def forget(self, ns: str, name: str) -> None:
        with self.lock:
            self.rows.pop((ns, name), None)


def _preempted(st: FineTuneJobStatus) -> bool:
    return any(c.type == constants.RUNNING and c.reason == "Preempted" for c in st.conditions)


_Table = JobTable  # the name the chart's metric-name test reads


def serve(table: JobTable, port: int, addr: str = "0.0.0.0") -> None:
    """/metrics: ``table``'s counters and per-job gauges."""
    exported = CollectorRegistry()
    exported.register(table.counters.registry)
    exported.register(table)
    start_http_server(port, addr=addr, registry=exported)
