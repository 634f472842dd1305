"""kopf handlers: thin. Each one observes, calls the pure ``reconcile``, and writes the outcome.

Everything funnels into ``drive(namespace, name)``: FineTuneJob events, Job events of its
children, node changes (for jobs waiting for a GPU that fits) and a timer that mirrors the
trainer's progress while a run is active. ``drive`` re-reads the object, so a stale event body
can never roll the status back, and holds a per-job lock so two triggers never interleave.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone

import kopf

from kubetune.api.base import format_errors
from kubetune.api.constants import FAILED, PENDING, RUNNING, STARTING, TERMINAL_PHASES, UNSCHEDULABLE, VALIDATED
from kubetune.api.v1alpha1 import GROUP, PLURAL, VERSION, FineTuneJobSpec, FineTuneJobStatus, check_object
from kubetune.controller import guard, kube, manifests, metrics, sources
from kubetune.controller.egress import EgressPolicy, EndpointRefused
from kubetune.controller.fleet import expected_pods, read_fleet
from kubetune.controller.reconcile import Observed, placement_of, reconcile, status_patch
from kubetune.controller.redact import Redactor, redact, secret_values
from kubetune.errors import UsageError

log = logging.getLogger("kubetune.operator")

# Progress lands in S3, which sends no events: poll it while a trainer runs. Everything else that
# changes a job (its Job, its pods via the Job's counters, nodes) arrives as a watch event.
PROGRESS_INTERVAL = float(os.environ.get("KUBETUNE_PROGRESS_INTERVAL", "10"))
RETRY_INTERVAL = 30.0  # Pending (a Secret, a model config) and Unschedulable (resync) jobs


@dataclass
class Config:
    pod: manifests.PodDefaults = manifests.PodDefaults()
    namespaces: list[str] = field(default_factory=list)
    # which endpoints a spec may make the operator call (--allow-endpoint)
    egress: EgressPolicy = field(default_factory=EgressPolicy)


CONFIG = Config()
_locks: dict[tuple[str, str], threading.Lock] = {}
# What each job looked like after this operator last reconciled it: (generation, status). A watch
# event with the same generation and status (the echo of our own status write, or kopf's finalizer
# and annotation bookkeeping) cannot change the outcome, so it is not reconciled again.
_last_seen: dict[tuple[str, str], tuple[int, dict]] = {}
class _Newest:
    """The newest version (by resourceVersion) of each object of one kind, from watch events and
    our own writes, trimmed to what is read here. A miss falls back to a GET. With a thousand jobs,
    every GET a reconcile does not make matters to the apiserver."""

    def __init__(self, trim, get) -> None:
        self._trim, self._get = trim, get
        self._objs: dict[tuple[str, str], dict] = {}
        self._lock = threading.Lock()

    def put(self, obj: dict) -> None:
        obj = self._trim(obj)
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        rv = int(obj["metadata"].get("resourceVersion") or 0)
        with self._lock:
            old = self._objs.get(key)
            if old is None or int(old["metadata"].get("resourceVersion") or 0) <= rv:
                self._objs[key] = obj

    def get(self, ns: str, name: str) -> dict | None:
        with self._lock:
            hit = self._objs.get((ns, name))
        if hit is not None:
            return hit
        obj = self._get(ns, name)
        if obj is not None:
            self.put(obj)
        return obj

    def pop(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._objs.pop(key, None)


def _slim(body: dict) -> dict:
    """managedFields and kubectl's last-applied copy are most of an object and never read here."""
    meta = dict(body.get("metadata") or {})
    meta.pop("managedFields", None)
    ann = meta.get("annotations")
    if ann and "kubectl.kubernetes.io/last-applied-configuration" in ann:
        meta["annotations"] = {k: v for k, v in ann.items() if k != "kubectl.kubernetes.io/last-applied-configuration"}
    return {**body, "metadata": meta}


def _trim_job(job: dict) -> dict:
    m = job.get("metadata") or {}
    return {"metadata": {k: m[k] for k in ("name", "namespace", "uid", "resourceVersion", "labels") if k in m},
            "spec": {"suspend": (job.get("spec") or {}).get("suspend")}, "status": job.get("status") or {}}


# FineTuneJobs (status writes return the object too) and their child Jobs (reconcile reads only
# their counters, conditions and suspend).
_bodies = _Newest(_slim, lambda ns, name: kube.get_finetunejob(ns, name))
_jobs = _Newest(_trim_job, lambda ns, name: kube.get_job(ns, name))
_remember, _body = _bodies.put, _bodies.get
_remember_job, _job = _jobs.put, _jobs.get
_locks_guard = threading.Lock()


def _lock_for(ns: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((ns, name), threading.Lock())


# --- observe -------------------------------------------------------------------------------------


_arch_cache: dict[tuple[str, str], tuple[float, object, str | None, str | None]] = {}


def _architecture(spec: FineTuneJobSpec, creds: dict | None, ns: str, hf_token: str | None = None,
                  ca_pem: str | None = None) -> tuple[object, str | None, str | None]:
    """(architecture, error, reason) of the model: inline, catalog, or its config.json (cached for a minute, so a
    burst of jobs on one private model reads it once). Any failure, whatever a hostile config.json
    holds, is a message naming what to fix."""
    from kubetune.estimator import resolve_architecture

    key = (ns, spec.model.model_dump_json())
    hit = _arch_cache.get(key)
    if hit and time.monotonic() - hit[0] < 60:
        return hit[1], hit[2], hit[3]
    refused: list[Exception] = []

    def read(_uri: str) -> str:
        try:
            return sources.read_config_json(spec, creds, hf_token, CONFIG.pod.hf_endpoint, ca_pem, CONFIG.egress)
        except (sources.CredentialsRefused, EndpointRefused) as e:
            refused.append(e)
            raise

    try:
        arch, err = resolve_architecture(spec.model, read_config=read), None
    except Exception as e:  # noqa: BLE001 - ArchitectureNotFound, or a config.json no model has
        arch, err = None, str(e) if isinstance(e, (ValueError, UsageError)) else (
            f"spec.model: its config.json cannot be read as a model architecture ({type(e).__name__}: {e})")
    reason = None
    if refused:  # the credentials or the endpoint are the cause, not a missing architecture
        arch, err = None, str(refused[0])
        reason = "EndpointNotAllowed" if isinstance(refused[0], EndpointRefused) else "StorageCredentialsRefused"
    if len(_arch_cache) > 4096:
        _arch_cache.clear()  # bounded whatever the number of distinct specs
    _arch_cache[key] = (time.monotonic(), arch, err, reason)
    return arch, err, reason


_data_cache: dict[tuple[str, str, str], tuple[float, dict | None]] = {}


def _data(kind: str, ns: str, name: str) -> dict | None:
    """A Secret's or ConfigMap's data. They change rarely and every reconcile needs one: cache each for
    a few seconds."""
    hit = _data_cache.get((kind, ns, name))
    if hit and time.monotonic() - hit[0] < 5:
        return hit[1]
    data = {"Secret": kube.read_secret, "ConfigMap": kube.read_config_map}[kind](ns, name)
    if len(_data_cache) > 4096:
        _data_cache.clear()
    _data_cache[(kind, ns, name)] = (time.monotonic(), data)
    return data


def _ca_bundle(spec: FineTuneJobSpec, ns: str) -> tuple[str | None, str]:
    """(PEM, "") from spec.storage.caBundle, or (None, what is missing)."""
    ref = spec.storage.ca_bundle
    if ref is None:
        return None, ""
    data = _data("ConfigMap", ns, ref.name)
    if data is None:
        return None, (f"ConfigMap {ref.name!r} (spec.storage.caBundle) does not exist in namespace {ns}: create it "
                      f"(kubectl create configmap {ref.name} -n {ns} --from-file={ref.key}=ca.pem)")
    if not data.get(ref.key):
        return None, f"ConfigMap {ref.name!r} (spec.storage.caBundle) has no key {ref.key}: add the PEM bundle under it"
    return data[ref.key], ""


_seen: dict[tuple[str, str, str], float] = {}


def _exists(kind: str, ns: str, name: str) -> bool:
    """A claim or ServiceAccount that exists is trusted for a minute (a running job's progress polls
    would otherwise GET it every few seconds, and a pod's claim cannot go away: PVC protection holds
    it); a missing one is looked up again each time, so a job waiting for it starts once it exists."""
    key = (kind, ns, name)
    seen = _seen.get(key)
    if seen is not None and time.monotonic() - seen < 60:
        return True
    if kube.exists(kind, ns, name):
        _seen[key] = time.monotonic()
        return True
    _seen.pop(key, None)
    return False


def _secret_problem(ref_name: str, field_name: str, key: str, value: str, token: bool = False) -> str | None:
    """What is wrong with one key of a Secret the spec names, never quoting the value."""
    where = f"Secret {ref_name!r} ({field_name}) key {key}"
    if value == kube.NOT_TEXT:
        return f"{where} is not UTF-8 text: store the value itself (kubectl create secret generic ... --from-literal)"
    if not token and value != value.strip():
        return (f"{where} starts or ends with whitespace (a newline from --from-file?): store the value alone "
                f"(kubectl create secret generic {ref_name} --from-literal={key}=...)")
    if not value.strip().isprintable():
        return f"{where} holds control characters: store the value alone, on one line"
    return None


def observe(body: dict) -> tuple[Observed, dict | None, Redactor]:
    """What reconcile needs, and a Redactor that knows every Secret value read on the way."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    try:
        status = FineTuneJobStatus.model_validate(body.get("status") or {})
    except ValueError:
        status = FineTuneJobStatus()  # not written by this operator: start over rather than crash
    try:
        spec = FineTuneJobSpec.model_validate(body.get("spec") or {})
        spec_error = None
    except ValueError as e:
        spec, spec_error = None, "; ".join(format_errors(e, root="spec")) if hasattr(e, "errors") else str(e)
    if spec is not None and (problems := check_object(name, spec)):
        # the rules on the whole object (a dotted name on a multi-node job): admission checks them too
        spec, spec_error = None, "; ".join(problems)
    obs = Observed(name=name, namespace=ns, uid=meta.get("uid", ""), generation=meta.get("generation", 1),
                   spec=spec, spec_error=spec_error, status=status)
    if spec is None:
        return obs, None, redact

    creds, hf_token, missing, token_data = None, None, [], None
    refused = ""
    if spec.storage.endpoint:
        try:
            CONFIG.egress.check(spec.storage.endpoint, "spec.storage.endpoint")
        except EndpointRefused as e:
            refused = str(e)
    ref = spec.storage.credentials_secret
    if ref is not None:
        creds = _data("Secret", ns, ref.name)
        if creds is None:
            missing.append(f"Secret {ref.name!r} (spec.storage.credentialsSecret) does not exist in namespace {ns}: "
                           f"create it with keys {ref.access_key_id_key} and {ref.secret_access_key_key}")
        elif absent := [k for k in (ref.access_key_id_key, ref.secret_access_key_key) if k not in creds]:
            missing.append(f"Secret {ref.name!r} has no key(s) {', '.join(absent)}: add them")
        else:
            missing += [p for k in (ref.access_key_id_key, ref.secret_access_key_key)
                        if (p := _secret_problem(ref.name, "spec.storage.credentialsSecret", k, creds[k]))]
    tref = spec.model.token_secret
    if tref is not None:
        token_data = _data("Secret", ns, tref.name)
        if token_data is None:
            missing.append(f"Secret {tref.name!r} (spec.model.tokenSecret) does not exist in namespace {ns}: create it "
                           f"with key {tref.key} (kubectl create secret generic {tref.name} -n {ns} "
                           f"--from-literal={tref.key}=hf_...)")
        elif not (token_data.get(tref.key) or "").strip():
            missing.append(f"Secret {tref.name!r} (spec.model.tokenSecret) has no key {tref.key}: add the token under it")
        elif p := _secret_problem(tref.name, "spec.model.tokenSecret", tref.key, token_data[tref.key], token=True):
            missing.append(p)
        else:
            hf_token = token_data[tref.key].strip()  # huggingface_hub strips it in the trainer too
    redactor = Redactor(secret_values(creds, token_data))
    claims = [f"PersistentVolumeClaim {claim!r} ({where}) does not exist in namespace {ns}: create it, or fix the URI"
              for claim, where in manifests.volume_claims(spec).items() if not _exists("PersistentVolumeClaim", ns, claim)]
    ca_pem, ca_missing = _ca_bundle(spec, ns)
    absent = {"EndpointNotAllowed": refused, "SecretNotFound": "; ".join(missing), "ConfigMapNotFound": ca_missing,
              "VolumeClaimNotFound": "; ".join(claims)}
    sa = spec.storage.service_account_name
    if sa and not _exists("ServiceAccount", ns, sa):
        absent["ServiceAccountNotFound"] = (
            f"ServiceAccount {sa!r} (spec.storage.serviceAccountName) does not exist in namespace {ns}: create it "
            f"(kubectl create serviceaccount {sa} -n {ns}) with the annotation your cloud's workload identity needs")
    obs.absent = {reason: message for reason, message in absent.items() if message}
    if obs.absent:
        # nothing further is read with a refused endpoint or broken credentials
        return obs, None, redactor
    obs.arch, obs.arch_error, why = _architecture(spec, creds, ns, hf_token, ca_pem)
    if why is not None:
        obs.absent[why] = obs.arch_error or why
    obs.fleet = read_fleet(*kube.fleet_objects())

    run = status.history[-1] if status.history else None
    if run is not None and run.phase not in TERMINAL_PHASES:
        rid = manifests.RunIdentity(ns, name, obs.uid, run.run)
        obs.job = _job(ns, rid.job_name)
        jstat = (obs.job or {}).get("status") or {}
        # Pods matter once one exists (counted by the Job) or the Job ended (termination messages);
        # a suspended Job (its only condition Suspended) has none.
        if obs.job is not None and (any(jstat.get(k) for k in ("active", "ready", "failed", "succeeded"))
                                    or any(c.get("type") != "Suspended" for c in jstat.get("conditions") or [])):
            obs.pods = kube.list_pods(ns, name, run.run)
        if obs.job is not None and not obs.pods and not jstat.get("active") \
                and not (obs.job.get("spec") or {}).get("suspend"):
            # no pod yet: the Job controller may be failing to create it, and says so only in an Event
            obs.pod_create_error = kube.job_failed_create(ns, rid.job_name)
        # Once the trainer has reported, keep reading: a preempted pod may be gone (and the Job show
        # no pod at all) before we see it, and its progress object says what happened.
        if obs.job is not None and (status.progress is not None or any(
                (p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed") for p in obs.pods)):
            obs.progress = sources.read_progress(spec, creds, manifests.run_paths(spec, rid).progress_uri, ca_pem,
                                                 CONFIG.egress)
    return obs, obs.job, redactor


# --- drive: observe -> reconcile -> write ------------------------------------------------------


def drive(ns: str, name: str, logger: logging.Logger | logging.LoggerAdapter = log) -> None:
    """Reconcile one job. Total: whatever goes wrong ends in a status, an Event and a log line naming
    the job, never in an exception for kopf to log and drop; transient failures are retried."""
    key = (ns, name)
    with _lock_for(ns, name), metrics.RECONCILE.time():
        body = _body(ns, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        # until observe has read this job's Secrets: from the raw spec, so that a failure on the way
        # (before observe can hand over its own) still masks their values
        redactor = _secrets_redactor(body)
        try:
            with WATCHDOG.watch(key):
                obs, job, redactor = observe(body)
                out = reconcile(obs, datetime.now(timezone.utc), CONFIG.pod)
                _write(body, obs, out, job, redactor, logger)
            RETRIER.succeeded(key)
            return None
        except guard.ReconcileTimeout:
            metrics.ERRORS.inc()
            _fail(body, FAILED, "ReconcileTimeout",
                  f"reconciling this job took more than {WATCHDOG.budget:.0f} s and was stopped, so the operator "
                  "stays responsive for other jobs. This is a kubetune bug or a pathological spec: check "
                  "spec.model.architecture and the model's config.json, and report it", redactor, logger, phase=FAILED)
        except kube.ApiException as e:
            metrics.ERRORS.inc()
            if guard.is_transient(e):
                _retry(key, f"the apiserver answered HTTP {e.status} ({e.reason})", logger)
            elif getattr(e, "child", None) is not None and e.status in (400, 422):
                _fail(body, VALIDATED, "InvalidSpec", guard.child_rejection(e.child, e.status, e.body),
                      redactor, logger, phase=FAILED)
            else:
                _fail(body, FAILED, "InternalError",
                      f"the apiserver refused a request for this job (HTTP {e.status} {e.reason}): "
                      f"{_api_message(e)}. If it says forbidden, the operator's RBAC is missing a rule",
                      redactor, logger, exc=e)
        except Exception as e:  # noqa: BLE001 - the point: no exception leaves a job without status
            metrics.ERRORS.inc()
            if guard.is_transient(e):
                _retry(key, f"{type(e).__name__}: {e}", logger, redactor)
            else:
                _fail(body, FAILED, "InternalError",
                      f"the operator failed on this job ({type(e).__name__}: {e}). This is a kubetune bug: report "
                      "it with the operator's log; a spec change retries", redactor, logger, exc=e)
        return None


def _secrets_redactor(body: dict) -> Redactor:
    """A Redactor for the Secrets the raw spec names (no parsing: the spec may not parse)."""
    spec, ns = body.get("spec") or {}, body["metadata"]["namespace"]
    values: list[str] = []
    try:
        for ref in ((spec.get("storage") or {}).get("credentialsSecret"), (spec.get("model") or {}).get("tokenSecret")):
            if isinstance(ref, dict) and isinstance(ref.get("name"), str):
                values += secret_values(_data("Secret", ns, ref["name"]))
    except Exception:  # noqa: BLE001 - the apiserver unreachable: the shapes still apply
        pass
    return Redactor(values)


def _write(body: dict, obs: Observed, out, job: dict | None, redactor: Redactor, logger) -> None:
    ns, name = obs.namespace, obs.name
    if out.create:
        # The apiserver checks the Job before anything of the run exists: a refusal (a bad
        # toleration, a missing label rule) leaves no half-made run behind.
        kube.create(out.create[-1], dry_run=True)
    for obj in out.create:
        created = kube.create(obj)
        if created and created.get("kind") == "Job" and (existing := placement_of(created)) is not None \
                and existing != out.status.placement:
            # made by an earlier reconcile whose status write was lost: status tells what runs
            out.status.placement = existing
            out.events.append(("Normal", "JobExists", f"Job {created['metadata']['name']} already existed; "
                               f"status shows its placement: {existing.message or existing.node}"))
        if created and created.get("kind") == "Job":
            # its ADDED event will show nothing new
            _job_signatures[created["metadata"]["uid"]] = _job_signature({"type": "ADDED"}, created)
            _remember_job(created)
            if out.status.placement is not None:
                kube.add_expected_pods(expected_pods(created, out.status.placement.nodes))
    if out.job_patch and out.status.history:
        patched = kube.patch_job(ns, manifests.RunIdentity(ns, name, obs.uid, out.status.history[-1].run).job_name,
                                 out.job_patch)
        if patched is not None:
            _remember_job(patched)
    new = redactor.deep(status_patch(out.status))
    written = {k: v for k, v in new.items() if v is not None}
    if written != (body.get("status") or {}):
        updated = kube.patch_status(ns, name, new)
        if updated is not None:
            _remember(updated)
    _last_seen[(ns, name)] = (body["metadata"].get("generation"), written)
    metrics.TABLE.update(ns, name, obs.status, out.status, job)
    for type_, reason, message in out.events:
        message = redactor(message)
        kube.post_event(body, type_, reason, message)
        logger.info(f"{ns}/{name}: {reason}: {message}")


def _api_message(e) -> str:
    import json as _json

    try:
        return str(_json.loads(e.body or "{}").get("message") or "")[:600]
    except ValueError:
        return ""


def _retry(key: tuple[str, str], why: str, logger, redactor: Redactor = redact) -> None:
    delay = RETRIER.schedule(key)
    logger.warning(f"{key[0]}/{key[1]}: {redactor(why)}; retrying in {delay:.0f} s")


def _fail(body: dict, type_: str, reason: str, message: str, redactor: Redactor, logger,
          phase: str | None = None, exc: BaseException | None = None) -> None:
    """Say what went wrong in status (condition ``type_``), an Event and the log, all redacted. An
    internal error keeps the phase of a job whose run is under way, and is retried with backoff."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    message = redactor(message)
    if exc is not None:
        logger.error(f"{ns}/{name}: {reason}: {message}\n"
                     + redactor("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))))
    else:
        logger.error(f"{ns}/{name}: {reason}: {message}")
    current = (body.get("status") or {}).get("phase")
    if phase is None and current in (None, PENDING, UNSCHEDULABLE):
        phase = FAILED  # never run, and nothing else will say why
    if reason == "InternalError":
        RETRIER.schedule((ns, name))
    st = guard.failure_status(body.get("status"), meta.get("generation"), datetime.now(timezone.utc), type_,
                              guard.safe_reason(reason), message, phase)
    try:
        updated = kube.patch_status(ns, name, redactor.deep(st))
        if updated is not None:
            _remember(updated)
            _last_seen[(ns, name)] = (meta.get("generation"), {k: v for k, v in st.items() if v is not None})
        kube.post_event(body, "Warning", guard.safe_reason(reason), message)
    except Exception as e:  # noqa: BLE001 - the apiserver is gone too: the retry will say it
        logger.error(f"{ns}/{name}: could not write the failure to status ({type(e).__name__}); retrying")
        RETRIER.schedule((ns, name))


WATCHDOG = guard.Watchdog()
RETRIER = guard.Retrier(lambda ns, name: drive(ns, name))

# --- kopf wiring -------------------------------------------------------------------------------


class _NoDiffBase(kopf.DiffBaseStorage):
    """kopf keeps a copy of the last handled spec to tell creations from updates, for on.create and
    on.update handlers. There are none here (every change goes through ``drive``), and storing it
    costs a PATCH per job and doubles the size of every FineTuneJob on the wire."""

    def fetch(self, *, body: kopf.Body) -> None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: object) -> None:
        return None


@kopf.on.startup()
def _startup(settings: kopf.OperatorSettings, **_) -> None:
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
    WATCHDOG.start()


@kopf.on.probe(id="workers")
def _probe_workers(**_) -> dict:
    """/healthz fails while a reconcile is stuck past its budget and could not be interrupted: the
    kubelet then restarts the operator, which is all that frees such a thread."""
    stuck = WATCHDOG.stuck()
    if stuck:
        raise kopf.PermanentError(f"{len(stuck)} reconcile(s) stuck: "
                                  + ", ".join(f"{ns}/{name}" for ns, name in stuck[:5]))
    return {"retrying": RETRIER.pending()}


@kopf.on.cleanup()
def _exit_on_time(**_) -> None:
    """kopf stops on SIGTERM, then Python waits for its worker threads at exit: a thread stuck in a
    reconcile would keep the process alive past the pod's grace period. Exit once the grace is
    nearly spent, whatever is still running (kopf's own cleanup is done by then)."""
    import os

    def hard_exit() -> None:
        time.sleep(EXIT_GRACE_SECONDS)
        logging.getLogger("kubetune.operator").warning("exiting with reconciles still running")
        os._exit(0)

    threading.Thread(target=hard_exit, name="exit-on-time", daemon=True).start()


# the chart's terminationGracePeriodSeconds is 30: leave kopf time to release its peering first
EXIT_GRACE_SECONDS = 10.0


@kopf.on.login()
def _login(**_) -> kopf.ConnectionInfo:
    """kopf logs in as the operator's own client does (in-cluster, or --kubeconfig). Its default
    login reads the kubeconfig that $KUBECONFIG named when the kubernetes package was imported, so
    with --kubeconfig its watches, finalizers and peering ran as another identity."""
    return kopf.ConnectionInfo(**kube.connection_info())


def _forget(key: tuple[str, str]) -> None:
    """Drop everything held in memory for a FineTuneJob that is gone, so a long-lived operator
    does not grow with every job it has ever seen."""
    _last_seen.pop(key, None)
    _bodies.pop(key)
    RETRIER.forget(key)
    with _locks_guard:
        _locks.pop(key, None)
    metrics.TABLE.forget(*key)


@kopf.on.event(GROUP, VERSION, PLURAL)
def on_finetunejob(event: dict, body: kopf.Body, logger, **_) -> None:
    key = (body.metadata["namespace"], body.metadata["name"])
    if event.get("type") == "DELETED":
        _forget(key)
        return
    # Remembered even when being deleted: a reconcile that a child's event triggers reads this
    # body, and must see the deletion instead of recreating the Job that on_delete just removed.
    _remember(dict(event["object"]))
    if body.metadata.get("deletionTimestamp"):
        return
    if _last_seen.get(key) == (body.metadata.get("generation"), dict(body.get("status") or {})):
        return
    drive(*key, logger)


@kopf.timer(GROUP, VERSION, PLURAL, interval=PROGRESS_INTERVAL, initial_delay=2.0, idle=None,
            when=lambda status, **_: (status or {}).get("phase") == RUNNING)
def mirror_progress(body: kopf.Body, logger, **_) -> None:
    """Copy the trainer's progress object from S3 into status while it trains."""
    drive(body.metadata["namespace"], body.metadata["name"], logger)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RETRY_INTERVAL, initial_delay=RETRY_INTERVAL, idle=None,
            when=lambda status, **_: (status or {}).get("phase") in (PENDING, UNSCHEDULABLE, STARTING))
def retry_pending(body: kopf.Body, logger, **_) -> None:
    """Jobs waiting for their Secret or a readable model config try again. Unschedulable ones are
    re-placed on node events; this is the resync that covers a missed or failed one. Starting ones
    look again for why their pod does not come (the Job controller's FailedCreate Events send no
    watch event to the Job)."""
    drive(body.metadata["namespace"], body.metadata["name"], logger)


_job_signatures: dict[str, tuple] = {}


def _job_signature(event: dict, body) -> tuple:
    st = body.get("status") or {}
    conds = tuple(sorted((c.get("type"), c.get("status")) for c in st.get("conditions") or []))
    return (event.get("type") == "DELETED", bool((body.get("spec") or {}).get("suspend")), st.get("active"),
            st.get("ready"), st.get("failed"), st.get("succeeded"), conds)


@kopf.on.event("batch", "v1", "jobs", labels={manifests.LABEL_JOB: kopf.PRESENT})
def on_child_job(event: dict, body: kopf.Body, logger, **_) -> None:
    """The Job's counters and conditions move with its pods (started, ready, failed, done); other
    updates (the controller's bookkeeping) change nothing for the FineTuneJob. DELETED counts: a
    Job deleted while its run is active is recreated."""
    owner = body.metadata.get("labels", {}).get(manifests.LABEL_JOB)
    uid = body.metadata.get("uid", "")
    sig = _job_signature(event, body)
    key = (body.metadata["namespace"], body.metadata["name"])
    if sig[0]:
        _jobs.pop(key)
    elif owner:
        _remember_job(dict(body))
    if not owner or _job_signatures.get(uid) == sig:
        return
    if sig[0]:
        _job_signatures.pop(uid, None)
    else:
        _job_signatures[uid] = sig
    drive(body.metadata["namespace"], owner, logger)


_node_signatures: dict[str, tuple] = {}


@kopf.on.event("", "v1", "nodes")
def on_node(event: dict, body: kopf.Body, logger, **_) -> None:
    """A GPU node appeared, changed or went away: jobs that found no GPU try again. Heartbeats
    (status-only updates) are ignored."""
    name = body.metadata["name"]
    labels = body.metadata.get("labels") or {}
    sig = (event.get("type") == "DELETED",
           tuple(sorted((k, v) for k, v in labels.items() if k.startswith("nvidia.com/"))),
           tuple(sorted((body.get("status") or {}).get("allocatable", {}).items())),
           bool((body.get("spec") or {}).get("unschedulable")),
           any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (body.get("status") or {}).get("conditions") or []))
    if _node_signatures.get(name) == sig:
        return
    kube.invalidate_fleet()
    for ftj in kube.list_finetunejobs(CONFIG.namespaces or None):
        if (ftj.get("status") or {}).get("phase") == UNSCHEDULABLE:
            drive(ftj["metadata"]["namespace"], ftj["metadata"]["name"], logger)
    # Only now: kopf does not retry event handlers, so after a failure the next event (a heartbeat
    # with the same signature) must not be skipped.
    _node_signatures[name] = sig


@kopf.on.delete(GROUP, VERSION, PLURAL)
def on_delete(body: kopf.Body, spec: kopf.Spec, logger, **_) -> None:
    ns, name = body.metadata["namespace"], body.metadata["name"]
    n = kube.delete_children(ns, name)
    logger.info(f"{ns}/{name}: deleted {n} child object(s)")
    try:
        parsed = FineTuneJobSpec.model_validate(dict(spec))
    except ValueError:
        parsed = None
    if parsed is not None and parsed.checkpoints.deletion_policy == "Delete":
        creds = kube.read_secret(ns, parsed.storage.credentials_secret.name) if parsed.storage.credentials_secret else None
        prefix = manifests.job_prefix(parsed, ns, name)
        try:
            removed = sources.delete_prefix(parsed, creds, prefix, _ca_bundle(parsed, ns)[0], CONFIG.egress)
            logger.info(f"{ns}/{name}: checkpoints.deletionPolicy=Delete removed {removed} S3 object(s)")
        except Exception as e:  # noqa: BLE001 - a bad endpoint must not keep the object from being deleted
            message = Redactor(secret_values(creds))(f"{type(e).__name__}: {e}")
            logger.error(f"{ns}/{name}: checkpoints.deletionPolicy=Delete could not remove {prefix}: {message}; "
                         "the checkpoints stay")
    _forget((ns, name))
