"""What the operator holds in memory between reconciles: one ``OperatorState``, passed to every
kopf handler as its ``memo`` (kopf's custom memo class, whose ``__copy__`` returns itself, so every
resource shares it) and to everything they call.

It holds the configuration, the Kubernetes client, the per-job locks and caches, the watchdog and
the retrier. Nothing here is read at import time and nothing lives in a module global: a test makes
its own state around a fake ``Kube``. kopf runs sync handlers on up to 16 worker threads, so every
structure that they share takes a lock; every cache is bounded, and a deleted FineTuneJob is
forgotten by all of them (``forget``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from kubetune.controller import guard, manifests
from kubetune.controller.egress import EgressPolicy
from kubetune.controller.metrics import JobTable
from kubetune.controller.sources import S3Clients

JobKey = tuple[str, str]  # (namespace, name) of a FineTuneJob
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class KubeClient(Protocol):
    """What the handlers call on the Kubernetes API (``kube.Kube``; tests pass a fake)."""

    def connection_info(self) -> dict[str, Any]: ...
    def get_finetunejob(self, namespace: str, name: str) -> dict | None: ...
    def list_finetunejobs(self, namespaces: list[str] | tuple[str, ...] | None = None) -> list[dict]: ...
    def patch_status(self, namespace: str, name: str, status: dict) -> dict | None: ...
    def create(self, obj: dict, dry_run: bool = False) -> dict | None: ...
    def get_job(self, namespace: str, name: str) -> dict | None: ...
    def patch_job(self, namespace: str, name: str, body: dict) -> dict | None: ...
    def list_pods(self, namespace: str, job: str, run: int) -> list[dict]: ...
    def delete_children(self, namespace: str, job: str) -> int: ...
    def exists(self, kind: str, namespace: str, name: str) -> bool: ...
    def read_config_map(self, namespace: str, name: str) -> dict[str, str] | None: ...
    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None: ...
    def job_failed_create(self, namespace: str, job: str) -> str | None: ...
    def fleet_objects(self, max_age: float = 5.0) -> tuple[list[dict], list[dict]]: ...
    def invalidate_fleet(self) -> None: ...
    def add_expected_pods(self, pods: list[dict]) -> None: ...
    def post_event(self, obj: dict, type_: str, reason: str, message: str) -> None: ...


@dataclass(frozen=True)
class Config:
    """`kubetune operator`'s flags, as the handlers read them."""

    pod: manifests.PodDefaults = manifests.PodDefaults()
    namespaces: tuple[str, ...] = ()
    # which endpoints a spec may make the operator call (--allow-endpoint)
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    # Progress lands in S3, which sends no events: it is polled this often while a trainer runs.
    progress_interval: float = 10.0
    # A waiting job (Pending, Unschedulable, Starting) is re-checked this often: what it waits for (a
    # Secret, a claim, the Hub) sends no event on the FineTuneJob.
    retry_interval: float = 30.0
    # A peering record older than this is a dead replica's: the standby's takeover delay (--peering-lifetime).
    peering_lifetime: int = 60
    # after SIGTERM; the chart's terminationGracePeriodSeconds is 30: leave kopf time to release its peering
    exit_grace_seconds: float = 10.0


class Newest:
    """The newest version (by resourceVersion) of each object of one kind, from watch events and
    our own writes, trimmed to what is read here. A miss falls back to a GET. With a thousand jobs,
    every GET a reconcile does not make matters to the apiserver."""

    def __init__(self, trim: Callable[[dict], dict], get: Callable[[str, str], dict | None]) -> None:
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

    def pop_labelled(self, ns: str, label: str, value: str) -> None:
        """Drop the objects of namespace ``ns`` whose label ``label`` is ``value`` (a job's children)."""
        with self._lock:
            for key in [
                k
                for k, o in self._objs.items()
                if k[0] == ns and ((o["metadata"].get("labels") or {}).get(label) == value)
            ]:
                del self._objs[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._objs)


class Expiring(Generic[K, V]):
    """Values kept ``ttl`` seconds, at most ``maxsize`` of them (the oldest go first), each with the
    jobs that read it: forgetting a job drops what no other job read."""

    def __init__(self, ttl: float, maxsize: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.maxsize, self._clock = ttl, maxsize, clock
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._readers: dict[K, set[JobKey]] = {}
        self._reads: dict[JobKey, set[K]] = {}
        self._lock = threading.Lock()

    def get(self, key: K, job: JobKey) -> tuple[bool, V | None]:
        """(True, value) while ``key`` is fresh, recording ``job`` as one of its readers; else (False, None)."""
        with self._lock:
            hit = self._items.get(key)
            if hit is None or self._clock() - hit[0] >= self.ttl:
                return False, None
            self._read(key, job)
            return True, hit[1]

    def put(self, key: K, value: V, job: JobKey) -> None:
        with self._lock:
            self._items[key] = (self._clock(), value)
            self._items.move_to_end(key)
            self._read(key, job)
            while len(self._items) > self.maxsize:
                self._drop(next(iter(self._items)))

    def discard(self, key: K) -> None:
        with self._lock:
            self._drop(key)

    def forget(self, job: JobKey) -> None:
        with self._lock:
            for key in self._reads.pop(job, set()):
                readers = self._readers.get(key)
                if readers is not None:
                    readers.discard(job)
                    if not readers:
                        self._drop(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _read(self, key: K, job: JobKey) -> None:
        self._readers.setdefault(key, set()).add(job)
        self._reads.setdefault(job, set()).add(key)

    def _drop(self, key: K) -> None:
        self._items.pop(key, None)
        for job in self._readers.pop(key, set()):
            reads = self._reads.get(job)
            if reads is not None:
                reads.discard(key)
                if not reads:
                    del self._reads[job]


def slim(body: dict) -> dict:
    """managedFields and kubectl's last-applied copy are most of an object and never read here."""
    meta = dict(body.get("metadata") or {})
    meta.pop("managedFields", None)
    ann = meta.get("annotations")
    if ann and "kubectl.kubernetes.io/last-applied-configuration" in ann:
        meta["annotations"] = {k: v for k, v in ann.items() if k != "kubectl.kubernetes.io/last-applied-configuration"}
    return {**body, "metadata": meta}


def trim_job(job: dict) -> dict:
    """A child Job as reconcile reads it: its counters, conditions and suspend."""
    m = job.get("metadata") or {}
    return {
        "metadata": {k: m[k] for k in ("name", "namespace", "uid", "resourceVersion", "labels") if k in m},
        "spec": {"suspend": (job.get("spec") or {}).get("suspend")},
        "status": job.get("status") or {},
    }


class OperatorState:
    """Everything the handlers share. ``drive(state, namespace, name)`` is what the retrier calls to
    reconcile a job again after a transient failure."""

    def __init__(
        self,
        kube: KubeClient,
        config: Config | None = None,
        drive: Callable[[OperatorState, str, str], Any] | None = None,
    ) -> None:
        self.kube, self.config = kube, config or Config()
        # FineTuneJobs (status writes return the object too) and their child Jobs
        self.bodies = Newest(slim, lambda ns, name: self.kube.get_finetunejob(ns, name))
        self.children = Newest(trim_job, lambda ns, name: self.kube.get_job(ns, name))
        # a model's architecture by (namespace, spec.model): a burst of jobs on one private model reads
        # its config.json once
        self.architectures: Expiring[tuple[str, str], tuple[Any, str | None, str | None]] = Expiring(ttl=60)
        # Secret and ConfigMap data by (kind, namespace, name): they change rarely and every reconcile reads one
        self.objects: Expiring[tuple[str, str, str], dict | None] = Expiring(ttl=5)
        # claims and ServiceAccounts seen to exist, by (kind, namespace, name)
        self.present: Expiring[tuple[str, str, str], bool] = Expiring(ttl=60)
        self.table = JobTable()  # the per-job gauges /metrics shows
        self.s3_clients = S3Clients()  # the jobs' S3 endpoints' clients, by endpoint and credentials
        self.watchdog = guard.Watchdog()
        self.retrier = guard.Retrier(lambda ns, name: drive(self, ns, name) if drive else None)
        self._lock = threading.Lock()  # guards the four maps below
        self._locks: dict[JobKey, threading.Lock] = {}
        # What each job looked like after this operator last reconciled it: (generation, status)
        self._last_seen: dict[JobKey, tuple[int | None, dict]] = {}
        # a child Job's uid -> (its FineTuneJob, the signature of what reconcile reads of it)
        self._job_signatures: dict[str, tuple[JobKey, tuple]] = {}
        self._node_signatures: dict[str, tuple] = {}

    def __copy__(self) -> OperatorState:
        return self  # kopf copies the operator's memo for each resource: all of them share this one

    def lock_for(self, key: JobKey) -> threading.Lock:
        """The lock that keeps two reconciles of one job from interleaving."""
        with self._lock:
            return self._locks.setdefault(key, threading.Lock())

    # --- what a watch event can skip ---------------------------------------------------------------

    def reconciled(self, key: JobKey, generation: int | None, status: dict) -> None:
        """Remember what ``key`` looked like after this operator reconciled it."""
        with self._lock:
            self._last_seen[key] = (generation, status)

    def unchanged(self, key: JobKey, generation: int | None, status: dict) -> bool:
        """Whether a FineTuneJob event shows what this operator last wrote: the echo of our own status
        write, or kopf's finalizer and annotation bookkeeping, which cannot change the outcome."""
        with self._lock:
            return self._last_seen.get(key) == (generation, status)

    def child_changed(self, uid: str, owner: JobKey, signature: tuple, deleted: bool = False) -> bool:
        """Record a child Job's signature; False when it is the one already seen."""
        with self._lock:
            if deleted:
                self._job_signatures.pop(uid, None)
                return True  # a Job deleted while its run is active is recreated
            if self._job_signatures.get(uid) == (owner, signature):
                return False
            self._job_signatures[uid] = (owner, signature)
            return True

    def node_unchanged(self, name: str, signature: tuple) -> bool:
        with self._lock:
            return self._node_signatures.get(name) == signature

    def node_seen(self, name: str, signature: tuple, deleted: bool = False) -> None:
        with self._lock:
            if deleted:
                self._node_signatures.pop(name, None)
            else:
                self._node_signatures[name] = signature

    # --- forgetting -------------------------------------------------------------------------------

    def forget(self, key: JobKey) -> None:
        """Drop everything held in memory for a FineTuneJob that is gone, so a long-lived operator
        does not grow with every job it has ever seen."""
        ns, name = key
        with self._lock:
            self._last_seen.pop(key, None)
            self._locks.pop(key, None)
            for uid in [u for u, (owner, _) in self._job_signatures.items() if owner == key]:
                del self._job_signatures[uid]
        self.bodies.pop(key)
        self.children.pop_labelled(ns, manifests.LABEL_JOB, name)
        for cache in (self.architectures, self.objects, self.present):
            cache.forget(key)
        self.retrier.forget(key)
        self.table.forget(ns, name)

    def sizes(self) -> dict[str, int]:
        """How many entries each structure holds (tests, and a look at a live operator's memory)."""
        with self._lock:
            own = {
                "locks": len(self._locks),
                "last_seen": len(self._last_seen),
                "job_signatures": len(self._job_signatures),
                "node_signatures": len(self._node_signatures),
            }
        return own | {
            "bodies": len(self.bodies),
            "children": len(self.children),
            "architectures": len(self.architectures),
            "objects": len(self.objects),
            "present": len(self.present),
            "table": len(self.table.rows),
        }
