"""kopf handlers: thin. Each one observes, calls the pure ``reconcile``, and writes the outcome.

Everything funnels into ``drive(state, namespace, name)``: FineTuneJob events, Job events of its
children, node changes (for jobs waiting for a GPU that fits) and a timer that mirrors the
trainer's progress while a run is active. ``drive`` re-reads the object, so a stale event body
can never roll the status back, and holds a per-job lock so two triggers never interleave.

No module state: what the handlers share is the ``OperatorState`` kopf hands each one as ``memo``,
and ``registry(config)`` registers them (a timer's interval is a flag, so nothing is decided at
import time).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import kopf
from pydantic import ValidationError

from kubetune.api.base import format_errors
from kubetune.api.constants import FAILED, PENDING, RUNNING, STARTING, TERMINAL_PHASES, UNSCHEDULABLE, VALIDATED
from kubetune.api.v1alpha1 import GROUP, PLURAL, VERSION, FineTuneJobSpec, FineTuneJobStatus, check_object
from kubetune.controller import guard, manifests, sources
from kubetune.controller.egress import EndpointRefused
from kubetune.controller.fleet import expected_pods, read_fleet
from kubetune.controller.kube import NOT_TEXT, ApiException, Kube
from kubetune.controller.reconcile import Observed, Outcome, placement_of, reconcile, status_patch
from kubetune.controller.redact import Redactor, redact, secret_values
from kubetune.controller.state import Config, JobKey, KubeClient, OperatorState
from kubetune.errors import UsageError
from kubetune.estimator import Architecture, resolve_architecture

log = logging.getLogger("kubetune.operator")

Logger = logging.Logger | logging.LoggerAdapter


def new_state(kube: KubeClient, config: Config | None = None) -> OperatorState:
    """The state one operator runs with; its retrier re-drives through ``drive``."""
    return OperatorState(kube, config, drive=drive)


# --- observe -------------------------------------------------------------------------------------


def _architecture(
    state: OperatorState,
    spec: FineTuneJobSpec,
    creds: dict | None,
    key: JobKey,
    hf_token: str | None = None,
    ca_pem: str | None = None,
) -> tuple[Architecture | None, str | None, str | None]:
    """(architecture, error, reason) of the model: inline, catalog, or its config.json (cached for a
    minute, so a burst of jobs on one private model reads it once). Any failure, whatever a hostile
    config.json holds, is a message naming what to fix."""
    cache_key = (key[0], spec.model.model_dump_json())
    hit, value = state.architectures.get(cache_key, key)
    if hit and value is not None:
        return value
    refused: list[Exception] = []
    config = state.config

    def read(_uri: str) -> str:
        try:
            return sources.read_config_json(
                spec, creds, hf_token, config.pod.hf_endpoint, ca_pem, config.egress, state.s3_clients
            )
        except (sources.CredentialsRefused, EndpointRefused) as e:
            refused.append(e)
            raise

    arch: Architecture | None
    try:
        arch, err = resolve_architecture(spec.model, read_config=read), None
    except Exception as e:  # noqa: BLE001 - ArchitectureNotFound, or a config.json no model has
        arch, err = (
            None,
            str(e)
            if isinstance(e, (ValueError, UsageError))
            else (f"spec.model: its config.json cannot be read as a model architecture ({type(e).__name__}: {e})"),
        )
    reason = None
    if refused:  # the credentials or the endpoint are the cause, not a missing architecture
        arch, err = None, str(refused[0])
        reason = "EndpointNotAllowed" if isinstance(refused[0], EndpointRefused) else "StorageCredentialsRefused"
    state.architectures.put(cache_key, (arch, err, reason), key)
    return arch, err, reason


def _data(state: OperatorState, kind: str, ns: str, name: str, job: JobKey) -> dict | None:
    """A Secret's or ConfigMap's data. They change rarely and every reconcile needs one: cached for
    a few seconds."""
    hit, data = state.objects.get((kind, ns, name), job)
    if hit:
        return data
    read = state.kube.read_secret if kind == "Secret" else state.kube.read_config_map
    data = read(ns, name)
    state.objects.put((kind, ns, name), data, job)
    return data


def _ca_bundle(state: OperatorState, spec: FineTuneJobSpec, job: JobKey) -> tuple[str | None, str]:
    """(PEM, "") from spec.storage.caBundle, or (None, what is missing)."""
    ref, ns = spec.storage.ca_bundle, job[0]
    if ref is None:
        return None, ""
    data = _data(state, "ConfigMap", ns, ref.name, job)
    if data is None:
        return None, (
            f"ConfigMap {ref.name!r} (spec.storage.caBundle) does not exist in namespace {ns}: create it "
            f"(kubectl create configmap {ref.name} -n {ns} --from-file={ref.key}=ca.pem)"
        )
    if not data.get(ref.key):
        return None, f"ConfigMap {ref.name!r} (spec.storage.caBundle) has no key {ref.key}: add the PEM bundle under it"
    return data[ref.key], ""


def _exists(state: OperatorState, kind: str, name: str, job: JobKey) -> bool:
    """A claim or ServiceAccount that exists is trusted for a minute (a running job's progress polls
    would otherwise GET it every few seconds, and a pod's claim cannot go away: PVC protection holds
    it); a missing one is looked up again each time, so a job waiting for it starts once it exists."""
    key = (kind, job[0], name)
    if state.present.get(key, job)[0]:
        return True
    if state.kube.exists(kind, job[0], name):
        state.present.put(key, True, job)
        return True
    state.present.discard(key)
    return False


def _secret_problem(ref_name: str, field_name: str, key: str, value: str, token: bool = False) -> str | None:
    """What is wrong with one key of a Secret the spec names, never quoting the value."""
    where = f"Secret {ref_name!r} ({field_name}) key {key}"
    if value == NOT_TEXT:
        return f"{where} is not UTF-8 text: store the value itself (kubectl create secret generic ... --from-literal)"
    if not token and value != value.strip():
        return (
            f"{where} starts or ends with whitespace (a newline from --from-file?): store the value alone "
            f"(kubectl create secret generic {ref_name} --from-literal={key}=...)"
        )
    if not value.strip().isprintable():
        return f"{where} holds control characters: store the value alone, on one line"
    return None


def _parse(body: dict) -> Observed:
    """The object as reconcile reads it: its spec (None, with the error, when it does not parse)."""
    meta = body["metadata"]
    try:
        status = FineTuneJobStatus.model_validate(body.get("status") or {})
    except ValueError:
        status = FineTuneJobStatus()  # not written by this operator: start over rather than crash
    spec: FineTuneJobSpec | None
    try:
        spec, spec_error = FineTuneJobSpec.model_validate(body.get("spec") or {}), None
    except ValueError as e:
        spec, spec_error = None, "; ".join(format_errors(e, root="spec")) if isinstance(e, ValidationError) else str(e)
    if spec is not None and (problems := check_object(meta["name"], spec)):
        # the rules on the whole object (a dotted name on a multi-node job): admission checks them too
        spec, spec_error = None, "; ".join(problems)
    return Observed(
        name=meta["name"],
        namespace=meta["namespace"],
        uid=meta.get("uid", ""),
        generation=meta.get("generation", 1),
        spec=spec,
        spec_error=spec_error,
        status=status,
    )


@dataclass
class _Secrets:
    """What the Secrets a spec names hold, and what is wrong with them."""

    creds: dict | None = None
    token_data: dict | None = None
    hf_token: str | None = None
    missing: list[str] = field(default_factory=list)


def _read_credentials(state: OperatorState, spec: FineTuneJobSpec, job: JobKey, out: _Secrets) -> None:
    ref, ns = spec.storage.credentials_secret, job[0]
    if ref is None:
        return
    out.creds = _data(state, "Secret", ns, ref.name, job)
    keys = (ref.access_key_id_key, ref.secret_access_key_key)
    if out.creds is None:
        out.missing.append(
            f"Secret {ref.name!r} (spec.storage.credentialsSecret) does not exist in namespace {ns}: "
            f"create it with keys {ref.access_key_id_key} and {ref.secret_access_key_key}"
        )
    elif absent := [k for k in keys if k not in out.creds]:
        out.missing.append(f"Secret {ref.name!r} has no key(s) {', '.join(absent)}: add them")
    else:
        out.missing += [
            p for k in keys if (p := _secret_problem(ref.name, "spec.storage.credentialsSecret", k, out.creds[k]))
        ]


def _read_token(state: OperatorState, spec: FineTuneJobSpec, job: JobKey, out: _Secrets) -> None:
    tref, ns = spec.model.token_secret, job[0]
    if tref is None:
        return
    out.token_data = data = _data(state, "Secret", ns, tref.name, job)
    if data is None:
        out.missing.append(
            f"Secret {tref.name!r} (spec.model.tokenSecret) does not exist in namespace {ns}: create "
            f"it with key {tref.key} (kubectl create secret generic {tref.name} -n {ns} "
            f"--from-literal={tref.key}=hf_...)"
        )
    elif not (data.get(tref.key) or "").strip():
        out.missing.append(
            f"Secret {tref.name!r} (spec.model.tokenSecret) has no key {tref.key}: add the token under it"
        )
    elif p := _secret_problem(tref.name, "spec.model.tokenSecret", tref.key, data[tref.key], token=True):
        out.missing.append(p)
    else:
        out.hf_token = data[tref.key].strip()  # huggingface_hub strips it in the trainer too


def _absent(
    state: OperatorState, spec: FineTuneJobSpec, job: JobKey, secrets: _Secrets, ca_missing: str
) -> dict[str, str]:
    """What the spec names that does not exist or may not be used, reason -> message, in the order
    to report them."""
    ns = job[0]
    refused = ""
    if spec.storage.endpoint:
        try:
            state.config.egress.check(spec.storage.endpoint, "spec.storage.endpoint")
        except EndpointRefused as e:
            refused = str(e)
    claims = [
        f"PersistentVolumeClaim {claim!r} ({where}) does not exist in namespace {ns}: create it, or fix the URI"
        for claim, where in manifests.volume_claims(spec).items()
        if not _exists(state, "PersistentVolumeClaim", claim, job)
    ]
    absent = {
        "EndpointNotAllowed": refused,
        "SecretNotFound": "; ".join(secrets.missing),
        "ConfigMapNotFound": ca_missing,
        "VolumeClaimNotFound": "; ".join(claims),
    }
    sa = spec.storage.service_account_name
    if sa and not _exists(state, "ServiceAccount", sa, job):
        absent["ServiceAccountNotFound"] = (
            f"ServiceAccount {sa!r} (spec.storage.serviceAccountName) does not exist in namespace {ns}: create it "
            f"(kubectl create serviceaccount {sa} -n {ns}) with the annotation your cloud's workload identity needs"
        )
    return {reason: message for reason, message in absent.items() if message}


def _observe_run(
    state: OperatorState, obs: Observed, spec: FineTuneJobSpec, creds: dict | None, ca_pem: str | None
) -> None:
    """The active run's Job, its pods, why the Job controller cannot make one, and the trainer's progress."""
    status, ns, name = obs.status, obs.namespace, obs.name
    run = status.history[-1] if status.history else None
    if run is None or run.phase in TERMINAL_PHASES:
        return
    rid = manifests.RunIdentity(ns, name, obs.uid, run.run)
    obs.job = job = state.children.get(ns, rid.job_name)
    if job is None:
        return
    jstat = job.get("status") or {}
    # Pods matter once one exists (counted by the Job) or the Job ended (termination messages);
    # a suspended Job (its only condition Suspended) has none.
    if any(jstat.get(k) for k in ("active", "ready", "failed", "succeeded")) or any(
        c.get("type") != "Suspended" for c in jstat.get("conditions") or []
    ):
        obs.pods = state.kube.list_pods(ns, name, run.run)
    if not obs.pods and not jstat.get("active") and not (job.get("spec") or {}).get("suspend"):
        # no pod yet: the Job controller may be failing to create it, and says so only in an Event
        obs.pod_create_error = state.kube.job_failed_create(ns, rid.job_name)
    # Once the trainer has reported, keep reading: a preempted pod may be gone (and the Job show
    # no pod at all) before we see it, and its progress object says what happened.
    if status.progress is not None or any(
        (p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed") for p in obs.pods
    ):
        obs.progress, obs.progress_error = sources.read_progress(
            spec, creds, manifests.run_paths(spec, rid).progress_uri, ca_pem, state.config.egress, state.s3_clients
        )


def observe(state: OperatorState, body: dict) -> tuple[Observed, dict | None, Redactor]:
    """What reconcile needs, and a Redactor that knows every Secret value read on the way."""
    obs = _parse(body)
    spec, job = obs.spec, (obs.namespace, obs.name)
    if spec is None:
        return obs, None, redact
    secrets = _Secrets()
    _read_credentials(state, spec, job, secrets)
    _read_token(state, spec, job, secrets)
    redactor = Redactor(secret_values(secrets.creds, secrets.token_data))
    ca_pem, ca_missing = _ca_bundle(state, spec, job)
    obs.absent = _absent(state, spec, job, secrets, ca_missing)
    if obs.absent:
        # nothing further is read with a refused endpoint or broken credentials
        return obs, None, redactor
    obs.arch, obs.arch_error, why = _architecture(state, spec, secrets.creds, job, secrets.hf_token, ca_pem)
    if why is not None:
        obs.absent[why] = obs.arch_error or why
    obs.fleet = read_fleet(*state.kube.fleet_objects())
    _observe_run(state, obs, spec, secrets.creds, ca_pem)
    return obs, obs.job, redactor


# --- drive: observe -> reconcile -> write ------------------------------------------------------


def drive(state: OperatorState, ns: str, name: str, logger: Logger = log) -> None:
    """Reconcile one job. Total: whatever goes wrong ends in a status, an Event and a log line naming
    the job, never in an exception for kopf to log and drop; transient failures are retried."""
    key = (ns, name)
    with state.lock_for(key), state.table.counters.reconcile.time():
        body = state.bodies.get(ns, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        # until observe has read this job's Secrets: from the raw spec, so that a failure on the way
        # (before observe can hand over its own) still masks their values
        redactor = _secrets_redactor(state, body)
        try:
            with state.watchdog.watch(key):
                obs, job, redactor = observe(state, body)
                out = reconcile(obs, datetime.now(timezone.utc), state.config.pod)
                _write(state, body, obs, out, job, redactor, logger)
            state.retrier.succeeded(key)
        except guard.ReconcileTimeout:
            state.table.counters.errors.inc()
            _fail(
                state,
                body,
                FAILED,
                "ReconcileTimeout",
                f"reconciling this job took more than {state.watchdog.budget:.0f} s and was stopped, so the "
                "operator stays responsive for other jobs. This is a kubetune bug or a pathological spec: check "
                "spec.model.architecture and the model's config.json, and report it",
                redactor,
                logger,
                phase=FAILED,
            )
        except Exception as e:  # noqa: BLE001 - the point: no exception leaves a job without status
            state.table.counters.errors.inc()
            _failed_reconcile(state, body, e, redactor, logger)


def _failed_reconcile(state: OperatorState, body: dict, e: Exception, redactor: Redactor, logger: Logger) -> None:
    """Retry a transient failure; say what any other one was, in status."""
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    if isinstance(e, ApiException):
        if guard.is_transient(e):
            _retry(state, key, f"the apiserver answered HTTP {e.status} ({e.reason})", logger)
        elif getattr(e, "child", None) is not None and e.status in (400, 422):
            _fail(
                state,
                body,
                VALIDATED,
                "InvalidSpec",
                guard.child_rejection(e.child, e.status, e.body),  # type: ignore[attr-defined]
                redactor,
                logger,
                phase=FAILED,
            )
        else:
            _fail(
                state,
                body,
                FAILED,
                "InternalError",
                f"the apiserver refused a request for this job (HTTP {e.status} {e.reason}): "
                f"{_api_message(e)}. If it says forbidden, the operator's RBAC is missing a rule",
                redactor,
                logger,
                exc=e,
            )
    elif guard.is_transient(e):
        _retry(state, key, f"{type(e).__name__}: {e}", logger, redactor)
    else:
        _fail(
            state,
            body,
            FAILED,
            "InternalError",
            f"the operator failed on this job ({type(e).__name__}: {e}). This is a kubetune bug: report "
            "it with the operator's log; a spec change retries",
            redactor,
            logger,
            exc=e,
        )


def _secrets_redactor(state: OperatorState, body: dict) -> Redactor:
    """A Redactor for the Secrets the raw spec names (no parsing: the spec may not parse)."""
    spec, meta = body.get("spec") or {}, body["metadata"]
    ns = meta["namespace"]
    values: list[str] = []
    try:
        for ref in ((spec.get("storage") or {}).get("credentialsSecret"), (spec.get("model") or {}).get("tokenSecret")):
            if isinstance(ref, dict) and isinstance(ref.get("name"), str):
                values += secret_values(_data(state, "Secret", ns, ref["name"], (ns, meta.get("name", ""))))
    except Exception:  # noqa: BLE001 - the apiserver unreachable: the shapes still apply
        pass
    return Redactor(values)


def _create_children(state: OperatorState, out: Outcome) -> None:
    if out.create:
        # The apiserver checks the Job before anything of the run exists: a refusal (a bad
        # toleration, a missing label rule) leaves no half-made run behind.
        state.kube.create(out.create[-1], dry_run=True)
    for obj in out.create:
        created = state.kube.create(obj)
        if not created or created.get("kind") != "Job":
            continue
        if (existing := placement_of(created)) is not None and existing != out.status.placement:
            # made by an earlier reconcile whose status write was lost: status tells what runs
            out.status.placement = existing
            out.events.append(
                (
                    "Normal",
                    "JobExists",
                    f"Job {created['metadata']['name']} already existed; "
                    f"status shows its placement: {existing.message or existing.node}",
                )
            )
        # its ADDED event will show nothing new
        owner = (
            created["metadata"]["namespace"],
            (created["metadata"].get("labels") or {}).get(manifests.LABEL_JOB, ""),
        )
        state.child_changed(created["metadata"]["uid"], owner, _job_signature({"type": "ADDED"}, created))
        state.children.put(created)
        if out.status.placement is not None:
            state.kube.add_expected_pods(expected_pods(created, out.status.placement.nodes))


def _write(
    state: OperatorState, body: dict, obs: Observed, out: Outcome, job: dict | None, redactor: Redactor, logger: Logger
) -> None:
    ns, name = obs.namespace, obs.name
    _create_children(state, out)
    if out.job_patch and out.status.history:
        patched = state.kube.patch_job(
            ns, manifests.RunIdentity(ns, name, obs.uid, out.status.history[-1].run).job_name, out.job_patch
        )
        if patched is not None:
            state.children.put(patched)
    new = redactor.deep(status_patch(out.status))
    written = {k: v for k, v in new.items() if v is not None}
    if written != (body.get("status") or {}):
        updated = state.kube.patch_status(ns, name, new)
        if updated is not None:
            state.bodies.put(updated)
    state.reconciled((ns, name), body["metadata"].get("generation"), written)
    state.table.update(ns, name, obs.status, out.status, job)
    for type_, reason, message in out.events:
        message = redactor(message)
        state.kube.post_event(body, type_, reason, message)
        logger.info(f"{ns}/{name}: {reason}: {message}")


def _api_message(e: ApiException) -> str:
    try:
        return str(json.loads(e.body or "{}").get("message") or "")[:600]
    except ValueError:
        return ""


def _retry(state: OperatorState, key: JobKey, why: str, logger: Logger, redactor: Redactor = redact) -> None:
    delay = state.retrier.schedule(key)
    logger.warning(f"{key[0]}/{key[1]}: {redactor(why)}; retrying in {delay:.0f} s")


def _fail(
    state: OperatorState,
    body: dict,
    type_: str,
    reason: str,
    message: str,
    redactor: Redactor,
    logger: Logger,
    phase: str | None = None,
    exc: BaseException | None = None,
) -> None:
    """Say what went wrong in status (condition ``type_``), an Event and the log, all redacted. An
    internal error keeps the phase of a job whose run is under way, and is retried with backoff."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    message = redactor(message)
    if exc is not None:
        logger.error(
            f"{ns}/{name}: {reason}: {message}\n"
            + redactor("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        )
    else:
        logger.error(f"{ns}/{name}: {reason}: {message}")
    current = (body.get("status") or {}).get("phase")
    if phase is None and current in (None, PENDING, UNSCHEDULABLE):
        phase = FAILED  # never run, and nothing else will say why
    if reason == "InternalError":
        state.retrier.schedule((ns, name))
    st = guard.failure_status(
        body.get("status"),
        meta.get("generation"),
        datetime.now(timezone.utc),
        type_,
        guard.safe_reason(reason),
        message,
        phase,
    )
    try:
        updated = state.kube.patch_status(ns, name, redactor.deep(st))
        if updated is not None:
            state.bodies.put(updated)
            state.reconciled((ns, name), meta.get("generation"), {k: v for k, v in st.items() if v is not None})
        state.kube.post_event(body, "Warning", guard.safe_reason(reason), message)
    except Exception as e:  # noqa: BLE001 - the apiserver is gone too: the retry will say it
        logger.error(f"{ns}/{name}: could not write the failure to status ({type(e).__name__}); retrying")
        state.retrier.schedule((ns, name))


# --- kopf handlers: each gets the OperatorState as memo ------------------------------------------


class _NoDiffBase(kopf.DiffBaseStorage):
    """kopf keeps a copy of the last handled spec to tell creations from updates, for on.create and
    on.update handlers. There are none here (every change goes through ``drive``), and storing it
    costs a PATCH per job and doubles the size of every FineTuneJob on the wire."""

    def fetch(self, *, body: kopf.Body) -> None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: object) -> None:
        return None


def _startup(settings: kopf.OperatorSettings, memo: OperatorState, **_: Any) -> None:
    settings.persistence.finalizer = "kubetune.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
    settings.persistence.diffbase_storage = _NoDiffBase()
    settings.execution.max_workers = 16
    # kopf starts one worker per object, unbounded, and its HTTP connector has no connection limit:
    # a burst of 1000 new jobs opened ~1000 TLS connections for the finalizer patches at once
    # (+250 MB of OpenSSL buffers). A worker holds its slot until it has idled for idle_timeout,
    # so the limit only keeps throughput with a short idle time.
    settings.queueing.worker_limit = 64
    settings.queueing.idle_timeout = 0.5
    settings.posting.level = logging.WARNING  # our own Events carry the transitions
    settings.watching.server_timeout = 300
    settings.peering.lifetime = memo.config.peering_lifetime
    memo.watchdog.start()


def _probe_workers(memo: OperatorState, **_: Any) -> dict:
    """/healthz fails while a reconcile is stuck past its budget and could not be interrupted: the
    kubelet then restarts the operator, which is all that frees such a thread."""
    stuck = memo.watchdog.stuck()
    if stuck:
        raise kopf.PermanentError(
            f"{len(stuck)} reconcile(s) stuck: " + ", ".join(f"{ns}/{name}" for ns, name in stuck[:5])
        )
    return {"retrying": memo.retrier.pending()}


def _exit_on_time(memo: OperatorState, **_: Any) -> None:
    """kopf stops on SIGTERM, then Python waits for its worker threads at exit: a thread stuck in a
    reconcile would keep the process alive past the pod's grace period. Exit once the grace is
    nearly spent, whatever is still running (kopf's own cleanup is done by then)."""
    grace = memo.config.exit_grace_seconds

    def hard_exit() -> None:
        time.sleep(grace)
        log.warning("exiting with reconciles still running")
        os._exit(0)

    threading.Thread(target=hard_exit, name="exit-on-time", daemon=True).start()


def _login(memo: OperatorState, **_: Any) -> kopf.ConnectionInfo:
    """kopf logs in as the operator's own client does (in-cluster, or --kubeconfig). Its default
    login reads the kubeconfig that $KUBECONFIG named when the kubernetes package was imported, so
    with --kubeconfig its watches, finalizers and peering ran as another identity."""
    return kopf.ConnectionInfo(**memo.kube.connection_info())


def on_finetunejob(event: kopf.RawEvent, body: kopf.Body, logger: Logger, memo: OperatorState, **_: Any) -> None:
    key = (body.metadata["namespace"], body.metadata["name"])
    if event.get("type") == "DELETED":
        memo.forget(key)
        return
    # Remembered even when being deleted: a reconcile that a child's event triggers reads this
    # body, and must see the deletion instead of recreating the Job that on_delete just removed.
    memo.bodies.put(dict(event["object"]))
    if body.metadata.get("deletionTimestamp"):
        return
    if memo.unchanged(key, body.metadata.get("generation"), dict(body.get("status") or {})):
        return
    drive(memo, *key, logger)


def mirror_progress(body: kopf.Body, logger: Logger, memo: OperatorState, **_: Any) -> None:
    """Copy the trainer's progress object from S3 into status while it trains."""
    drive(memo, body.metadata["namespace"], body.metadata["name"], logger)


def retry_pending(body: kopf.Body, logger: Logger, memo: OperatorState, **_: Any) -> None:
    """Jobs waiting for their Secret or a readable model config try again. Unschedulable ones are
    re-placed on node events; this is the resync that covers a missed or failed one. Starting ones
    look again for why their pod does not come (the Job controller's FailedCreate Events send no
    watch event to the Job)."""
    drive(memo, body.metadata["namespace"], body.metadata["name"], logger)


def _job_signature(event: Mapping[str, Any], body: Mapping[str, Any]) -> tuple:
    st = body.get("status") or {}
    conds = tuple(sorted((c.get("type"), c.get("status")) for c in st.get("conditions") or []))
    return (
        event.get("type") == "DELETED",
        bool((body.get("spec") or {}).get("suspend")),
        st.get("active"),
        st.get("ready"),
        st.get("failed"),
        st.get("succeeded"),
        conds,
    )


def on_child_job(event: kopf.RawEvent, body: kopf.Body, logger: Logger, memo: OperatorState, **_: Any) -> None:
    """The Job's counters and conditions move with its pods (started, ready, failed, done); other
    updates (the controller's bookkeeping) change nothing for the FineTuneJob. DELETED counts: a
    Job deleted while its run is active is recreated."""
    ns = body.metadata["namespace"]
    owner = body.metadata.get("labels", {}).get(manifests.LABEL_JOB)
    deleted = event.get("type") == "DELETED"
    if deleted:
        memo.children.pop((ns, body.metadata["name"]))
    elif owner:
        memo.children.put(dict(body))
    if owner and memo.child_changed(body.metadata.get("uid", ""), (ns, owner), _job_signature(event, body), deleted):
        drive(memo, ns, owner, logger)


def _node_signature(event: Mapping[str, Any], body: kopf.Body) -> tuple:
    labels = body.metadata.get("labels") or {}
    status = body.get("status") or {}
    return (
        event.get("type") == "DELETED",
        tuple(sorted((k, v) for k, v in labels.items() if k.startswith("nvidia.com/"))),
        tuple(sorted(status.get("allocatable", {}).items())),
        bool((body.get("spec") or {}).get("unschedulable")),
        any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []),
    )


def on_node(event: kopf.RawEvent, body: kopf.Body, logger: Logger, memo: OperatorState, **_: Any) -> None:
    """A GPU node appeared, changed or went away: jobs that found no GPU try again. Heartbeats
    (status-only updates) are ignored."""
    name = body.metadata["name"]
    sig = _node_signature(event, body)
    if memo.node_unchanged(name, sig):
        return
    memo.kube.invalidate_fleet()
    for ftj in memo.kube.list_finetunejobs(memo.config.namespaces or None):
        if (ftj.get("status") or {}).get("phase") == UNSCHEDULABLE:
            drive(memo, ftj["metadata"]["namespace"], ftj["metadata"]["name"], logger)
    # Only now: kopf does not retry event handlers, so after a failure the next event (a heartbeat
    # with the same signature) must not be skipped.
    memo.node_seen(name, sig, deleted=sig[0])


def on_delete(body: kopf.Body, spec: kopf.Spec, logger: Logger, memo: OperatorState, **_: Any) -> None:
    ns, name = body.metadata["namespace"], body.metadata["name"]
    n = memo.kube.delete_children(ns, name)
    logger.info(f"{ns}/{name}: deleted {n} child object(s)")
    try:
        parsed = FineTuneJobSpec.model_validate(dict(spec))
    except ValueError:
        parsed = None
    if parsed is not None and parsed.checkpoints.deletion_policy == "Delete":
        _delete_checkpoints(memo, parsed, (ns, name), logger)
    memo.forget((ns, name))


def _delete_checkpoints(state: OperatorState, spec: FineTuneJobSpec, key: JobKey, logger: Logger) -> None:
    ns, name = key
    ref = spec.storage.credentials_secret
    creds = state.kube.read_secret(ns, ref.name) if ref else None
    prefix = manifests.job_prefix(spec, ns, name)
    try:
        removed = sources.delete_prefix(
            spec, creds, prefix, _ca_bundle(state, spec, key)[0], state.config.egress, state.s3_clients
        )
        logger.info(f"{ns}/{name}: checkpoints.deletionPolicy=Delete removed {removed} S3 object(s)")
    except Exception as e:  # noqa: BLE001 - a bad endpoint must not keep the object from being deleted
        message = Redactor(secret_values(creds))(f"{type(e).__name__}: {e}")
        logger.error(
            f"{ns}/{name}: checkpoints.deletionPolicy=Delete could not remove {prefix}: {message}; the checkpoints stay"
        )


def registry(config: Config) -> kopf.OperatorRegistry:
    """The handlers above, registered for one operator: kopf.run(registry=..., memo=state)."""
    reg = kopf.OperatorRegistry()
    kopf.on.startup(registry=reg)(_startup)
    kopf.on.probe(id="workers", registry=reg)(_probe_workers)
    kopf.on.cleanup(registry=reg)(_exit_on_time)
    kopf.on.login(registry=reg)(_login)
    kopf.on.event(GROUP, VERSION, PLURAL, registry=reg)(on_finetunejob)
    kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        interval=config.progress_interval,
        initial_delay=2.0,
        idle=None,
        when=lambda status, **_: (status or {}).get("phase") == RUNNING,
        registry=reg,
    )(mirror_progress)
    kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        interval=config.retry_interval,
        initial_delay=config.retry_interval,
        idle=None,
        when=lambda status, **_: (status or {}).get("phase") in (PENDING, UNSCHEDULABLE, STARTING),
        registry=reg,
    )(retry_pending)
    kopf.on.event("batch", "v1", "jobs", labels={manifests.LABEL_JOB: kopf.PRESENT}, registry=reg)(on_child_job)
    kopf.on.event("", "v1", "nodes", registry=reg)(on_node)
    kopf.on.delete(GROUP, VERSION, PLURAL, registry=reg)(on_delete)
    return reg


__all__ = ["Config", "Kube", "OperatorState", "drive", "new_state", "observe", "registry"]
