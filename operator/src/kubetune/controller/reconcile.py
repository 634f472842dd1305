"""Decide what a FineTuneJob needs next, from what was observed. Pure: no API calls, no clock.

The kopf layer observes (the object, its current Job and pods, the fleet, the Secret, the model
architecture, the trainer's progress object), calls ``reconcile`` and writes the Outcome: children
to create, a Job patch, the status, and Events. Running it twice on the same observation gives
the same Outcome, so every handler can re-run safely.

Runs: run 1 starts when a job is created. A spec change (new metadata.generation) to a finished
job starts run n+1 and keeps the history (GitOps retraining). A spec change while a run is active
does not disturb it: the run keeps the spec it started with (its ConfigMap is immutable) and the
new generation starts as the next run when it ends. ``runPolicy.suspend`` is the exception and
applies at once: pods go, checkpoints stay, and unsuspending resumes from the newest checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from kubetune.api.constants import (
    CHECKPOINT_SYNCED,
    FAILED,
    PENDING,
    RUNNING,
    SCHEDULED,
    STARTING,
    SUCCEEDED,
    SUSPENDED,
    TERMINAL_PHASES,
    UNSCHEDULABLE,
    VALIDATED,
    bf16_refused,
)
from kubetune.api.storage import written_by_another
from kubetune.api.v1alpha1 import (
    FineTuneJobSpec,
    FineTuneJobStatus,
    Phase,
    PlacementStatus,
    Progress,
    Resolved,
    ResultStatus,
    RunOverrides,
    RunRecord,
    TrainerProgress,
    TrainerTermination,
)
from kubetune.controller import manifests
from kubetune.controller.conditions import ConditionStatus, clip, find, is_true, set_condition
from kubetune.controller.fleet import FleetNode, whole_gpus
from kubetune.controller.placement import GiB, Placement, place
from kubetune.errors import UsageError
from kubetune.estimator import Architecture, Estimate, estimate, fit_advice, max_micro_batch
from kubetune.estimator.advice import Advice
from kubetune.estimator.disk import work_dir_bytes
from kubetune.estimator.host import advice_memory_floor_gib, memory_floor_gib, whole_model_in_host
from kubetune.plan import TrainingPlan, accumulation_steps, plan_from_spec, resolve_sharding

TERMINAL = TERMINAL_PHASES


@dataclass
class Observed:
    """Everything reconcile may look at, gathered by the kube layer."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: FineTuneJobSpec | None  # None when the spec did not parse
    spec_error: str | None = None
    status: FineTuneJobStatus = field(default_factory=FineTuneJobStatus)
    fleet: list[FleetNode] = field(default_factory=list)
    # What the spec names that does not exist, reason -> message, in the order to report them:
    # SecretNotFound (or a key), ConfigMapNotFound (caBundle), VolumeClaimNotFound (pvc:// URIs),
    # ServiceAccountNotFound.
    absent: dict[str, str] = field(default_factory=dict)
    arch: Architecture | None = None
    arch_error: str | None = None
    job: dict | None = None  # the current run's batch/v1 Job
    pods: list[dict] = field(default_factory=list)
    progress: TrainerProgress | None = None
    progress_error: str | None = None  # S3 did not answer (or refused) the progress read
    # the Job controller's newest FailedCreate Event while the run has no pod (a missing PriorityClass)
    pod_create_error: str | None = None


@dataclass
class Outcome:
    status: FineTuneJobStatus
    create: list[dict] = field(default_factory=list)
    job_patch: dict | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (Normal|Warning, reason, message)
    # No requeue: what a job waits for comes as a watch event (its Job, nodes) or on the handlers'
    # timers (Pending, Unschedulable and Starting jobs every 30 s; running ones every progress interval).


# ---------------------------------------------------------------------------------------------
# estimate + place


@dataclass(frozen=True)
class Decision:
    placement: Placement
    estimate: Estimate  # at the chosen micro batch
    resolved: Resolved | None
    advice: list[str]
    host_model_bytes: int = 0  # the whole model in host memory at once (estimator.host), and why
    host_why: str = ""


def decide(
    spec: FineTuneJobSpec, arch: Architecture, fleet: list[FleetNode], run_overrides: dict | None = None
) -> Decision:
    """Estimate, place, resolve auto batch and accumulation; fit advice when nothing fits."""
    if run_overrides:
        spec = apply_overrides(spec, run_overrides)
    nproc = max(1, spec.resources.total_gpus)

    def ga_for(mbs: int) -> int:
        if run_overrides and "gradientAccumulationSteps" in run_overrides:
            return run_overrides["gradientAccumulationSteps"]
        return accumulation_steps(spec, mbs, nproc)

    # priced with the accumulation it will run with: accumulated gradients live through the forward
    def plan_for(mbs: int) -> TrainingPlan:
        return plan_from_spec(spec, micro_batch_size=mbs, gradient_accumulation_steps=ga_for(mbs), num_processes=nproc)

    def price(mbs: int) -> int:
        return estimate(arch, plan_for(mbs)).total_bytes

    def max_batch(capacity: int) -> int:
        return max_micro_batch(arch, plan_for(1), capacity)

    p = place(spec, fleet, price, max_batch)
    mbs = p.micro_batch_size or 1
    plan = plan_for(mbs)
    est = estimate(arch, plan)
    if not p.fits:
        # advice for the GPUs the job's precision may use (bf16: compute capability 8.0+), else for any
        gpus = whole_gpus(fleet)
        runnable = [s for s in gpus if bf16_refused(spec.training.precision, s.compute) is None]
        sizes = sorted({s.memory_mib for s in runnable or gpus}) or [81920]
        advice = [_advice_line(a, spec) for a in fit_advice(arch, plan, [m * 2**20 for m in sizes])][:5]
        return Decision(p, est, None, advice)
    resolved = Resolved(
        micro_batch_size=mbs,
        gradient_accumulation_steps=ga_for(mbs),
        num_processes=nproc,
        sharding=resolve_sharding(spec, nproc),  # as plan_from_spec resolved it: never the estimator-only zero*
        estimate_bytes=est.total_bytes,
        ephemeral_storage_bytes=work_dir_bytes(
            spec, plan, est.total_params, est.trainable_params, arch.disk_weight_bytes
        ),
    )
    return Decision(p, est, resolved, [], *whole_model_in_host(spec, plan, est.total_params))


def _size(fit: tuple) -> tuple[int, str]:
    return fit[0], fit[1]


def _without_advice(est: Estimate, fleet: list[FleetNode], precision: str) -> str:
    """fit_advice offers nothing when the job as written fits some GPU of the cluster (only its own
    constraints rule that GPU out), or when no nearby change fits any."""
    gpus = whole_gpus(fleet)
    # by size and name only: one product may carry GFD's compute labels on one node and not on another
    fits = sorted({(s.memory_mib, s.product, s.compute) for s in gpus if est.fits(s.memory_mib * 2**20)}, key=_size)
    if fits:
        mib, product, compute = fits[0]
        if bf16_refused(precision, compute) is not None:
            return (
                f"as written it fits {product} GPUs ({mib / 1024:.1f} GiB), where training.precision {precision} "
                "cannot run (it needs compute capability 8.0+): set training.precision to fp16"
            )
        return (
            f"as written it fits {product} GPUs ({mib / 1024:.1f} GiB), which its resources rule out "
            f"(gpuProduct, minGpuMemory, nodeSelector, tolerations or gpusPerNode): relax them"
        )
    largest = max((s.memory_mib for s in gpus), default=0)
    return (
        f"none near this configuration fits the cluster's GPUs (the largest has {largest / 1024:.1f} GiB): "
        f"a smaller model, shorter sequences or more GPUs"
    )


def _advice_line(a: Advice, spec: FineTuneJobSpec) -> str:
    line = f"{a.description} ({a.estimate.total_gib:.1f} GiB per GPU, fits {a.gpu_bytes / GiB:.0f} GiB GPUs"
    if need := advice_memory_floor_gib(spec, a):  # FSDP advice: rank 0 then reads the whole model into host memory
        line += f", with spec.resources.memory at least {need}Gi"
    return line + ")"


def apply_overrides(spec: FineTuneJobSpec, overrides: dict) -> FineTuneJobSpec:
    """Settings the operator changed for a run (OOM retry), on top of the user's spec."""
    t = spec.training.model_copy(
        update={
            k: v
            for k, v in {
                "micro_batch_size": overrides.get("microBatchSize"),
                "gradient_accumulation_steps": overrides.get("gradientAccumulationSteps"),
                "gradient_checkpointing": overrides.get("gradientCheckpointing"),
                "fused_cross_entropy": overrides.get("fusedCrossEntropy"),
            }.items()
            if v is not None
        }
    )
    return spec.model_copy(update={"training": t})


# ---------------------------------------------------------------------------------------------
# the state machine


class _Builder:
    """Accumulates status changes and the Events that go with them."""

    def __init__(self, obs: Observed, now: datetime):
        self.obs, self.now = obs, now
        self.status = obs.status.model_copy(deep=True)
        self.events: list[tuple[str, str, str]] = []

    def cond(
        self,
        type_: str,
        status: bool | ConditionStatus,
        reason: str,
        message: str,
        warn: bool = False,
        event: bool = True,
    ) -> None:
        """Set a condition; a change also makes an Event unless another Event of the same
        reconcile already tells the story (event=False)."""
        self.status.conditions, changed = set_condition(
            self.status.conditions, type_, status, reason, message, self.now, self.obs.generation
        )
        if changed and event:
            self.events.append(("Warning" if warn else "Normal", reason, message))

    def phase(self, phase: Phase) -> None:
        if self.status.phase != phase:
            self.status.phase = phase
            if self.status.history:
                self.status.history[-1].phase = phase

    def done(self, **kw) -> Outcome:
        self.status.observed_generation = self.obs.generation
        return Outcome(status=self.status, events=self.events, **kw)


def reconcile(obs: Observed, now: datetime, defaults: manifests.PodDefaults = manifests.PodDefaults()) -> Outcome:
    if obs.progress is not None and written_by_another(obs.progress.job_uid, obs.uid):
        # a deleted FineTuneJob of this name wrote it (deletionPolicy Retain): not this run's, so as if
        # not written yet, until this object's trainer writes its own
        obs = replace(obs, progress=None)
    b = _Builder(obs, now)
    st = b.status
    current = st.history[-1] if st.history else None

    if obs.spec is None:
        b.cond(VALIDATED, False, "InvalidSpec", f"{obs.spec_error}. Fix the spec and apply it again.", warn=True)
        b.phase(FAILED)
        return b.done()

    if current is not None and current.phase not in TERMINAL:  # an active run
        out = _observe_run(b, obs, current, defaults)
        if out.status.phase in TERMINAL and current.generation != obs.generation and not out.create:
            # The run just ended and a newer spec was waiting for it: start that run now.
            return _start_run(b, obs, defaults, overrides=None)
        return out

    # No active run: start one if this generation has not been run yet.
    if current is not None and current.generation == obs.generation:
        return b.done()  # finished, and nothing changed since
    return _start_run(b, obs, defaults, overrides=None)


def _validate(b: _Builder, obs: Observed) -> bool:
    # A missing Secret first: without a token a gated model's config.json cannot be read either.
    for reason, message in obs.absent.items():
        b.cond(VALIDATED, False, reason, message, warn=True)
        return False
    if obs.arch is None:
        b.cond(
            VALIDATED,
            False,
            "ModelConfigUnavailable",
            f"{obs.arch_error or 'cannot read the model architecture'}. Use a model from kubetune's catalog, "
            "make its config.json readable, or set spec.model.architecture.",
            warn=True,
        )
        return False
    return True


def _valid(b: _Builder) -> None:
    # The first time, the Placed (or Unschedulable) Event of this reconcile says it already.
    first = find(b.obs.status.conditions, VALIDATED) is None
    b.cond(
        VALIDATED,
        True,
        "Valid",
        "spec is valid, the model architecture is known, and the Secrets and volume claims it names exist",
        event=not first,
    )


def _start_run(b: _Builder, obs: Observed, defaults: manifests.PodDefaults, overrides: dict | None) -> Outcome:
    spec = obs.spec
    assert spec is not None
    if obs.arch is None and spec.model.architecture is not None and not obs.absent:
        # an inline architecture that no estimate can use is the spec's fault: nothing to wait for
        return _invalid(b, str(obs.arch_error))
    if not _validate(b, obs) or obs.arch is None:
        b.phase(PENDING)
        return b.done()
    try:
        d = decide(spec, obs.arch, obs.fleet, overrides)
    except (UsageError, ValueError) as e:
        # what the estimator refuses (a LoRA target the model does not have, an absurd architecture)
        # is a spec error like any other: say so, and wait for a fix
        return _invalid(b, str(e))
    b.status.estimate = d.estimate.to_status()
    if need := memory_floor_gib(spec, d.host_model_bytes):
        b.cond(
            VALIDATED,
            False,
            "InsufficientHostMemory",
            f"spec.resources.memory {spec.resources.memory} cannot hold the whole model, "
            f"{d.host_model_bytes / 2**30:.1f} GiB, which the trainer reads into host memory ({d.host_why}). "
            f"The pod would be OOM-killed; set spec.resources.memory to at least {need}Gi",
            warn=True,
        )
        b.phase(PENDING)
        return b.done()  # a spec change re-triggers reconcile
    _valid(b)
    if not d.placement.fits:
        return _unschedulable(b, d, obs.fleet, spec.training.precision)
    return _new_run(b, obs, spec, d, defaults, overrides)


def _invalid(b: _Builder, error: str) -> Outcome:
    b.cond(VALIDATED, False, "InvalidSpec", f"{error}. Fix the spec and apply it again.", warn=True)
    b.phase(FAILED)
    return b.done()


def _unschedulable(b: _Builder, d: Decision, fleet: list[FleetNode], precision: str) -> Outcome:
    advice = "; ".join(d.advice) if d.advice else _without_advice(d.estimate, fleet, precision)
    # the estimator's notes say why the peak is what it is (e.g. a load that more GPUs do not shrink)
    why = "".join(f" {n[0].upper()}{n[1:]}." for n in d.estimate.notes)
    msg = f"{d.placement.message}.{why} Options that fit: {advice}."
    b.cond(SCHEDULED, False, d.placement.reason, msg, warn=True)
    b.status.placement = PlacementStatus(message=clip(d.placement.message))
    b.phase(UNSCHEDULABLE)
    return b.done()  # node changes re-trigger reconcile


def _new_run(
    b: _Builder,
    obs: Observed,
    spec: FineTuneJobSpec,
    d: Decision,
    defaults: manifests.PodDefaults,
    overrides: dict | None,
) -> Outcome:
    """Run n+1: its children, a fresh run record, and conditions that say it started."""
    st = b.status
    assert d.resolved is not None
    run = (st.run or 0) + 1
    rid = manifests.RunIdentity(obs.namespace, obs.name, obs.uid, run)
    run_spec = apply_overrides(spec, overrides) if overrides else spec
    st.placement = _placement_status(d, run_spec)
    create = _with_placement(manifests.children(run_spec, rid, d.resolved, d.placement, defaults), st.placement)
    st.run = run
    st.progress = Progress(step=0, percent="0%")
    st.checkpoints = None
    st.result = None
    st.start_time, st.completion_time = b.now, None
    st.history.append(
        RunRecord(
            run=run,
            generation=obs.generation,
            phase=STARTING,
            start_time=b.now,
            overrides=RunOverrides.model_validate(overrides) if overrides else None,
        )
    )
    where = d.placement.gpu_product or "CPU"
    b.cond(SCHEDULED, True, "Placed", f"run {run}: {d.placement.message}; Job {rid.job_name} created")
    for t in (RUNNING, SUCCEEDED, FAILED, CHECKPOINT_SYNCED):
        if find(st.conditions, t) is not None:
            b.cond(t, False, "NewRun", f"run {run} started on {where}")
    if spec.run_policy.suspend:
        _suspended(b, run)  # the Job is created suspended: say so now, not after the Job controller
    else:
        b.phase(STARTING)
    return b.done(create=create)


def _suspended(b: _Builder, run: int) -> None:
    b.cond(
        SUSPENDED,
        True,
        "Suspended",
        f"run {run} is suspended: pods are stopped, checkpoints stay "
        "in S3. Set spec.runPolicy.suspend=false to resume from the newest checkpoint.",
    )
    b.cond(RUNNING, False, "Suspended", "suspended by spec.runPolicy.suspend", event=False)
    b.phase(SUSPENDED)


def _observe_run(b: _Builder, obs: Observed, run: RunRecord, defaults: manifests.PodDefaults) -> Outcome:
    """The active run as its Job and pods show it: finished, failed, suspended, or on its way."""
    spec = obs.spec
    assert spec is not None
    job = obs.job
    if job is None:
        # Deleted behind our back, or the create did not land before a restart: recreate the run's
        # children from its recorded placement. Creation is idempotent.
        return _recreate(b, obs, run, defaults)

    _mirror_progress(b, obs)
    jstat = job.get("status") or {}
    jconds = {c.get("type"): c for c in jstat.get("conditions") or [] if c.get("status") == "True"}
    term = _termination(obs.pods)
    if "Complete" in jconds:
        return _succeeded(b, run, term)
    if "Failed" in jconds:
        # Not FailureTarget: the Job controller is still terminating pods, whose termination
        # messages (OOM, bad data) decide the reason.
        return _failed(b, obs, run, jconds["Failed"], term, defaults)

    patch, suspended = _suspend_patch(spec, job)
    if suspended:
        _held(b, obs, spec, run)
        return b.done(job_patch=patch)
    if is_true(b.status.conditions, SUSPENDED):
        b.cond(SUSPENDED, False, "Resumed", f"run {run.run} resumed; the trainer continues from the newest checkpoint")
    _pod_progress(b, obs, run, term)
    if obs.generation != run.generation and obs.status.observed_generation != obs.generation:
        b.events.append(
            (
                "Normal",
                "SpecChangeQueued",
                f"generation {obs.generation} will start as run {run.run + 1} when run {run.run} ends",
            )
        )
    return b.done(job_patch=patch)


def _succeeded(b: _Builder, run: RunRecord, term: TrainerTermination | None) -> Outcome:
    st = b.status
    st.result = term.result if term and term.result else st.result
    if st.progress and st.progress.total_steps:
        st.progress.step, st.progress.percent = st.progress.total_steps, "100%"
    st.completion_time = b.now
    run.completion_time, run.result, run.reason = b.now, st.result, (term.reason if term else "Completed")
    b.cond(RUNNING, False, "Completed", f"run {run.run} finished")
    b.cond(
        SUCCEEDED,
        True,
        term.reason if term else "Completed",
        f"run {run.run} succeeded" + (f": {_metrics_line(st.result)}" if st.result else ""),
    )
    b.phase(SUCCEEDED)
    return b.done()


def _suspend_patch(spec: FineTuneJobSpec, job: dict) -> tuple[dict | None, bool]:
    """(the Job patch that makes it follow spec.runPolicy.suspend, or None; whether it is suspended after)."""
    want = spec.run_policy.suspend
    suspended = bool((job.get("spec") or {}).get("suspend"))
    if want != suspended and not (spec.run_policy.queue_name and suspended and not want and _kueue_holds(job)):
        return {"spec": {"suspend": want}}, want
    return None, suspended


def _held(b: _Builder, obs: Observed, spec: FineTuneJobSpec, run: RunRecord) -> None:
    """A suspended Job: by the spec, or by Kueue until it admits the Job."""
    if spec.run_policy.suspend:
        _suspended(b, run.run)
        return
    rid = manifests.RunIdentity(obs.namespace, obs.name, obs.uid, run.run)
    b.cond(
        SCHEDULED,
        True,
        "Queued",
        f"waiting for Kueue to admit Job {rid.job_name} in queue {spec.run_policy.queue_name}",
    )
    b.phase(PENDING)


def _pod_progress(b: _Builder, obs: Observed, run: RunRecord, term: TrainerTermination | None) -> None:
    """Running, preempted and waiting for its replacement, or waiting for its pod."""
    st = b.status
    running = [p for p in obs.pods if (p.get("status") or {}).get("phase") == "Running"]
    if running:
        node = (running[0].get("spec") or {}).get("nodeName")
        if st.placement is not None and node:
            st.placement.node = node
        step = st.progress.step if st.progress else 0
        doing = _ACTIVITY.get((st.progress.state or "") if st.progress else "", "training")
        b.cond(
            RUNNING,
            True,
            "TrainerRunning",
            f"run {run.run} is {doing} on {node or 'a node'}"
            + (
                f", step {step}" + (f"/{st.progress.total_steps}" if st.progress and st.progress.total_steps else "")
                if step
                else ""
            ),
        )
        b.phase(RUNNING)
    elif (stopped := _preempted_message(term, obs.progress)) is not None:
        # The pod was stopped (preemption, eviction, drain) and saved a checkpoint on the way out; the
        # Job controller starts a replacement that resumes from it.
        live = [p for p in obs.pods if (p.get("status") or {}).get("phase") not in ("Failed", "Succeeded")]
        b.cond(
            RUNNING,
            False,
            "Preempted",
            f"run {run.run}: {stopped}; waiting for the replacement pod ({_pending_reason(live)})",
        )
        b.phase(STARTING)
    else:
        pending = _pending_reason(obs.pods, obs.pod_create_error)
        pulling = any(w["reason"] in IMAGE_PULL_FAILURES for _, _, w in _waiting(obs.pods))
        b.cond(RUNNING, False, "ImagePullFailed" if pulling else "PodPending", pending)
        b.phase(STARTING)


# What the Running condition says the trainer is doing: loading a large model or uploading a merged
# one takes minutes, during which the step does not move.
_ACTIVITY = {"starting": "loading the model and data", "evaluating": "evaluating", "uploading": "uploading its outputs"}


def _preempted_message(term: TrainerTermination | None, progress: TrainerProgress | None) -> str | None:
    if term is not None:
        return term.message if term.reason == "Preempted" else None
    if progress is not None and progress.state == "preempted":
        return progress.message or f"stopped at step {progress.progress.step}"
    return None


def _kueue_holds(job: dict) -> bool:
    # Kueue keeps a Job suspended until admission: do not fight it by unsuspending.
    return manifests.KUEUE_QUEUE_LABEL in ((job.get("metadata") or {}).get("labels") or {})


def _recreate(b: _Builder, obs: Observed, run: RunRecord, defaults: manifests.PodDefaults) -> Outcome:
    spec = obs.spec
    assert spec is not None
    overrides = run.overrides.dump() if run.overrides else None
    try:
        d = decide(spec, obs.arch, obs.fleet, overrides) if obs.arch is not None else None
    except (UsageError, ValueError):
        d = None  # it was placed once; the message below says it cannot be now
    if d is None or not d.placement.fits or d.resolved is None:
        b.cond(
            SCHEDULED,
            False,
            "JobMissing",
            f"the Job of run {run.run} is gone and cannot be re-placed now; waiting for capacity",
            warn=True,
        )
        b.phase(PENDING)
        return b.done()
    rid = manifests.RunIdentity(obs.namespace, obs.name, obs.uid, run.run)
    b.events.append(("Normal", "JobCreated", f"created Job {rid.job_name} for run {run.run}"))
    run_spec = apply_overrides(spec, overrides) if overrides else spec
    # the status describes the Job that will exist, not the one that is gone
    b.status.placement = _placement_status(d, run_spec)
    return b.done(
        create=_with_placement(manifests.children(run_spec, rid, d.resolved, d.placement, defaults), b.status.placement)
    )


def _failed(
    b: _Builder,
    obs: Observed,
    run: RunRecord,
    jcond: dict | None,
    term: TrainerTermination | None,
    defaults: manifests.PodDefaults,
) -> Outcome:
    st, spec = b.status, obs.spec
    assert spec is not None
    kind = _oom_kind(obs.pods, term)
    oom = kind == "gpu"
    reason = ({"gpu": "OutOfMemory", "host": "HostOutOfMemory"}.get(kind) if kind else None) or (
        term.reason
        if term and term.reason not in ("Completed", "Error")
        else (jcond or {}).get("reason") or "TrainerFailed"
    )
    detail = (term.message if term and term.message else (jcond or {}).get("message")) or "the trainer Job failed"
    run.completion_time, run.reason = b.now, reason
    st.completion_time = b.now
    b.cond(RUNNING, False, reason, f"run {run.run} stopped")
    retried = any(r.reason == "OutOfMemoryRetry" for r in st.history if r.generation == run.generation)
    if oom and spec.run_policy.retry_on_oom and not retried:
        overrides = _oom_overrides(spec, st)
        b.phase(FAILED)
        run.reason = "OutOfMemoryRetry"
        b.events.append(
            (
                "Warning",
                "OutOfMemory",
                f"run {run.run} ran out of GPU memory; retrying once with {_describe(overrides)}",
            )
        )
        out = _start_run(b, obs, defaults, overrides)
        return out
    hint = {
        "OutOfMemory": "The run ran out of memory. Lower training.microBatchSize or dataset.maxSeqLength, turn on "
        "training.gradientCheckpointing, or use method qlora.",
        "HostOutOfMemory": f"The kernel OOM-killed the trainer: it needs more host memory than spec.resources.memory "
        f"({spec.resources.memory}), so a smaller batch would not help. Raise spec.resources.memory: "
        "rank 0 reads the whole model into host memory under FSDP, and so does merging the adapter.",
        "BadData": "Fix the dataset lines named above and change spec.runPolicy.rerun to run again (or set "
        "dataset.onBadLine: skip).",
        "BadConfig": "Fix the spec field named above and apply it again.",
        "ModelLoadFailed": "Fix spec.model (the URI, its files, spec.model.tokenSecret) as named above; after a fix "
        "outside the spec (the files, the Secret), change spec.runPolicy.rerun to run again.",
        "DeadlineExceeded": "The run hit runPolicy.activeDeadlineSeconds; raise it to let it finish.",
        "Preempted": "Its pods were stopped more often than runPolicy.backoffLimit allows without a disruption "
        "condition (kubectl delete pod does not set one); raise runPolicy.backoffLimit. This run's "
        "checkpoints stay under spec.checkpoints.uri.",
        "BackoffLimitExceeded": "The trainer failed runPolicy.backoffLimit times; see the pod logs.",
    }.get(
        reason, "See the trainer pod's logs; a spec change (spec.runPolicy.rerun for the same spec) starts a new run."
    )
    if st.checkpoints is not None and st.checkpoints.latest_uri and reason not in ("BadConfig", "ModelLoadFailed"):
        # the work done so far need not be lost: a new run can start where this one stopped
        hint += (
            f" To continue from its newest checkpoint (step {st.checkpoints.latest_step}) once the cause is "
            f"fixed, set spec.checkpoints.resumeFrom: {st.checkpoints.latest_uri} and change "
            "spec.runPolicy.rerun."
        )
    b.cond(FAILED, True, reason, f"run {run.run} failed: {detail}. {hint}", warn=True)
    b.phase(FAILED)
    return b.done()


def _oom_overrides(spec: FineTuneJobSpec, st: FineTuneJobStatus) -> dict:
    """The cheapest change that lowers memory while keeping the effective batch: halve the micro
    batch and double accumulation; at micro batch 1, turn on checkpointing and fused CE."""
    t = spec.training
    mbs = (
        st.placement.micro_batch_size
        if st.placement and st.placement.micro_batch_size
        else (1 if t.micro_batch_size == "auto" else int(t.micro_batch_size))
    )
    ga = (
        st.placement.gradient_accumulation_steps
        if st.placement and st.placement.gradient_accumulation_steps
        else t.gradient_accumulation_steps
    )
    if mbs > 1:
        return {"microBatchSize": mbs // 2, "gradientAccumulationSteps": ga * 2}
    return {"gradientCheckpointing": True, "fusedCrossEntropy": True}


def _describe(overrides: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())


def _oom_kind(pods: list[dict], term: TrainerTermination | None) -> str | None:
    """ "gpu" when the trainer ran out of GPU memory (it reports that itself: exit 6, reason
    OutOfMemory), "host" when the kernel OOM-killed the container (OOMKilled, 137): a cgroup limit
    on host memory, which a smaller micro batch does not fix."""
    if term and term.reason == "OutOfMemory":
        return "gpu"
    host = False
    for p in pods:
        for cs in (p.get("status") or {}).get("containerStatuses") or []:
            t = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
            if "CUDA out of memory" in (t.get("message") or ""):
                return "gpu"
            host = host or t.get("reason") == "OOMKilled" or t.get("exitCode") == 137
    return "host" if host else None


def _termination(pods: list[dict]) -> TrainerTermination | None:
    """The trainer's JSON termination message, from the most recent terminated trainer container. In a
    multi-node run every rank writes one; when rank 0 (completion index 0) says the same as the newest,
    its message is the one: only rank 0 uploads, so only its result names the outputs."""
    seen: list[tuple[str, bool, TrainerTermination]] = []
    for p in pods:
        rank0 = ((p.get("metadata") or {}).get("annotations") or {}).get(manifests.COMPLETION_INDEX, "0") == "0"
        for cs in (p.get("status") or {}).get("containerStatuses") or []:
            t = (cs.get("state") or {}).get("terminated")
            if t and t.get("message"):
                seen.append((t.get("finishedAt") or "", rank0, _parse_termination(t["message"])))
    if not seen:
        return None
    latest = seen[0]
    for entry in seen[1:]:
        if entry[0] >= latest[0]:
            latest = entry
    same = [e for e in seen if e[1] and e[2].reason == latest[2].reason]
    return max(same, key=lambda e: e[0])[2] if same and not latest[1] else latest[2]


def _parse_termination(message: str) -> TrainerTermination:
    try:
        return TrainerTermination.model_validate(json.loads(message))
    except (ValueError, TypeError):
        return TrainerTermination(reason="Error", message=message[-500:])


def _pending_reason(pods: list[dict], create_error: str | None = None) -> str:
    if any((p.get("status") or {}).get("phase") in ("Succeeded", "Failed") for p in pods):
        return "the trainer pod has exited; waiting for the Job controller to record it"
    for p in pods:
        for c in (p.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                return f"pod {p['metadata']['name']} is not scheduled yet: {c.get('message') or c.get('reason')}"
    for p, cs, waiting in _waiting(pods):
        reason = waiting["reason"]
        what = f"pod {p['metadata']['name']} is {reason}" + (
            f": {waiting['message']}" if waiting.get("message") else ""
        )
        if reason in IMAGE_PULL_FAILURES:
            what += (
                f"; check that image {cs.get('image')} exists and that the node can pull it "
                "(spec.runPolicy.image or the chart's trainer image; spec.runPolicy.imagePullSecrets for a "
                "private registry)"
            )
        return what
    if pods:
        return "waiting for the trainer pod to start"
    if create_error:
        return (
            f"the Job controller cannot create the trainer pod: {create_error}. Fix the spec field it names "
            "(spec.resources.priorityClassName, spec.runPolicy.image, ...) or the namespace's quota"
        )
    return "waiting for the Job controller to create the pod"


def _waiting(pods: list[dict]):
    """(pod, container status, its waiting state) for each container the kubelet holds back, with a reason."""
    for p in pods:
        for cs in (p.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason"):
                yield p, cs, waiting


# kubelet waiting reasons that no amount of waiting fixes
IMAGE_PULL_FAILURES = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")


STORAGE_UNREACHABLE = "StorageUnreachable"


def _mirror_progress(b: _Builder, obs: Observed) -> None:
    pr, st = obs.progress, b.status
    if obs.progress_error:
        # What was last read stays; CheckpointSynced says it may be behind, and why.
        latest = f"step {st.checkpoints.latest_step}" if st.checkpoints and st.checkpoints.latest_step else "none yet"
        b.cond(
            CHECKPOINT_SYNCED,
            False,
            STORAGE_UNREACHABLE,
            f"{obs.progress_error}; progress and checkpoints below are as last read (newest checkpoint: {latest}). "
            "The trainer keeps training and retries its uploads until S3 answers.",
            warn=True,
        )
        return
    if pr is None:
        return
    p = pr.progress.model_copy(update={"state": pr.state})
    if p.total_steps:
        p.percent = f"{min(100, int(100 * p.step / p.total_steps))}%"
    st.progress = p
    was = find(st.conditions, CHECKPOINT_SYNCED)
    back = was is not None and was.reason == STORAGE_UNREACHABLE
    if back and not pr.checkpoints.latest_uri:
        b.cond(CHECKPOINT_SYNCED, False, "StorageReachable", "S3 answers again; no checkpoint committed yet")
    if pr.checkpoints.latest_uri:
        new = back or st.checkpoints is None or st.checkpoints.latest_step != pr.checkpoints.latest_step
        st.checkpoints = pr.checkpoints
        if new:
            b.cond(
                CHECKPOINT_SYNCED,
                True,
                "CheckpointCommitted",
                f"checkpoint at step {pr.checkpoints.latest_step} committed to {pr.checkpoints.latest_uri}",
            )


PLACEMENT_ANNOTATION = "kubetune.io/placement"


def _with_placement(children: list[dict], placement: PlacementStatus) -> list[dict]:
    """The run's Job carries the placement it was made for, so a Job that already exists (the
    status write of its run was lost to a restart) can set status from what it really is."""
    for c in children:
        if c["kind"] == "Job":
            c["metadata"].setdefault("annotations", {})[PLACEMENT_ANNOTATION] = json.dumps(
                placement.dump(), sort_keys=True, separators=(",", ":")
            )
    return children


def placement_of(job: dict) -> PlacementStatus | None:
    """The placement a Job was created with (None for a Job from before the annotation)."""
    raw = ((job.get("metadata") or {}).get("annotations") or {}).get(PLACEMENT_ANNOTATION)
    try:
        return PlacementStatus.model_validate(json.loads(raw)) if raw else None
    except ValueError:
        return None


def _placement_status(d: Decision, spec: FineTuneJobSpec) -> PlacementStatus:
    p = d.placement
    return PlacementStatus(
        node=p.preferred_nodes[0] if p.preferred_nodes else None,
        nodes=list(p.preferred_nodes),
        gpu_product=p.gpu_product,
        gpu_memory_mi_b=p.gpu_memory_mib,
        min_gpu_memory_mi_b=p.min_gpu_memory_mib,
        micro_batch_size=d.resolved.micro_batch_size if d.resolved else None,
        gradient_accumulation_steps=d.resolved.gradient_accumulation_steps if d.resolved else None,
        ephemeral_storage=manifests.ephemeral_storage(spec.resources, d.resolved) if d.resolved else None,
        message=clip(p.message) if p.message else p.message,
    )


def _metrics_line(r: ResultStatus) -> str:
    m = r.metrics
    keys = [("evalLoss", "eval loss"), ("perplexity", "perplexity"), ("baseEvalLoss", "base eval loss")]
    return ", ".join(f"{label} {m[k]:.4g}" for k, label in keys if k in m) or "no metrics reported"


def status_patch(status: FineTuneJobStatus) -> dict[str, Any]:
    """A merge patch for the status subresource. Top-level fields that are now empty are sent as
    null so they are removed (a new run clears the previous run's checkpoints and result)."""
    body = status.model_dump(by_alias=True, exclude_none=True, mode="json")
    for name, f in FineTuneJobStatus.model_fields.items():
        key = f.alias or name
        if key not in body:
            body[key] = None
    return body
