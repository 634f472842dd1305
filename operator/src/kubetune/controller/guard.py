"""What keeps one FineTuneJob from hurting the operator or the others: every reconcile ends in a
status, a transient failure is retried with backoff, a stuck reconcile is stopped, and a worker that
cannot be stopped fails the liveness probe so the kubelet restarts the pod.

``failure_status`` and ``child_rejection`` are pure; ``Watchdog`` and ``Retrier`` are the two small
pieces of machinery, each with its own lock.
"""

from __future__ import annotations

import ctypes
import heapq
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobStatus
from kubetune.controller.conditions import set_condition

log = logging.getLogger("kubetune.operator")

# A reconcile reads a few objects and does arithmetic: a second is slow. The budget is far above
# that and below kopf's own timeouts, so a job that takes it is broken, not busy.
RECONCILE_BUDGET_SECONDS = 30.0
# After the budget the thread is interrupted; one that does not return within this is stuck (in C
# code that cannot be interrupted) and the liveness probe fails.
STUCK_AFTER_SECONDS = 30.0


class ReconcileTimeout(BaseException):
    """Raised inside a reconcile that ran past its budget. A BaseException, so the ``except
    Exception`` of a library it is in cannot swallow it."""


# --- classifying what went wrong -----------------------------------------------------------------

TRANSIENT_HTTP = (408, 425, 429, 500, 502, 503, 504)


def is_transient(e: BaseException) -> bool:
    """A failure that the same reconcile may not meet again: the apiserver overloaded or
    restarting, a connection reset, a timeout."""
    status = getattr(e, "status", None)
    if isinstance(status, int) and status > 0:
        return status in TRANSIENT_HTTP
    try:
        import urllib3.exceptions

        if isinstance(e, urllib3.exceptions.HTTPError):
            return True
    except ImportError:  # pragma: no cover - kubernetes depends on urllib3
        pass
    return isinstance(e, (ConnectionError, TimeoutError))


# Where each field of a child object that the apiserver can refuse comes from in the spec.
_CHILD_FIELDS: tuple[tuple[str, str], ...] = (
    ("spec.template.spec.tolerations", "spec.resources.tolerations"),
    ("spec.template.spec.priorityClassName", "spec.resources.priorityClassName"),
    ("spec.template.spec.nodeSelector", "spec.resources.nodeSelector"),
    ("spec.template.spec.affinity", "spec.resources.gpuProduct"),
    ("spec.template.metadata.annotations", "spec.resources.podAnnotations"),
    ("spec.template.metadata.labels", "spec.runPolicy.queueName"),
    ("metadata.labels", "spec.runPolicy.queueName"),
    ("spec.template.spec.containers[0].resources", "spec.resources (cpu, memory, ephemeralStorage)"),
    ("spec.template.spec.containers[0].image", "spec.runPolicy.image"),
    ("spec.template.spec.containers[0].env", "spec.resources.env"),
    ("spec.template.spec.imagePullSecrets", "spec.runPolicy.imagePullSecrets"),
    ("spec.template.spec.serviceAccountName", "spec.storage.serviceAccountName"),
    ("spec.template.spec.subdomain", "metadata.name"),
    ("spec.template.spec.volumes", "spec.model.uri, spec.dataset.uri or spec.storage.caBundle"),
    ("spec.activeDeadlineSeconds", "spec.runPolicy.activeDeadlineSeconds"),
    ("spec.ttlSecondsAfterFinished", "spec.runPolicy.ttlSecondsAfterFinished"),
    ("spec.backoffLimit", "spec.runPolicy.backoffLimit"),
    ("metadata.name", "metadata.name"),
    ("data", "spec (the rendered trainer config)"),
)


def _spec_field(kind: str, field: str) -> str:
    if kind == "Service" and field.startswith("metadata.name"):
        return "metadata.name (a multi-node job's Service name is a DNS label: no dots)"
    for prefix, spec_field in _CHILD_FIELDS:
        if field == prefix or field.startswith((prefix + ".", prefix + "[")):
            return spec_field
    return "the spec"


def child_rejection(obj: dict, status: int, body: str | None) -> str:
    """The message for a child the apiserver refused (422, 400): which field, why, and the spec
    field it came from. ``body`` is the apiserver's Status JSON."""
    kind, name = obj.get("kind", "object"), (obj.get("metadata") or {}).get("name", "")
    try:
        st = json.loads(body or "{}")
    except ValueError:
        st = {}
    causes = [c for c in ((st.get("details") or {}).get("causes") or []) if isinstance(c, dict)]
    parts = []
    for c in causes[:5]:
        field = str(c.get("field") or "")
        parts.append(
            f"{field or kind}: {str(c.get('message') or c.get('reason') or '')[:300]} (from {_spec_field(kind, field)})"
        )
    if not parts:
        parts.append(f"{str(st.get('message') or f'HTTP {status}')[:600]}")
    return (
        f"the apiserver refused the {kind} {name} this job needs: "
        + "; ".join(parts)
        + ". Fix the spec field named and apply it again"
    )


def failure_status(
    status: dict | None, generation: int | None, now: datetime, type_: str, reason: str, message: str, phase: str | None
) -> dict:
    """A status that says what went wrong, from what the object holds now (a status the operator
    itself cannot parse is replaced). ``phase`` None keeps the current phase."""
    try:
        st = FineTuneJobStatus.model_validate(status or {})
    except ValueError:
        st = FineTuneJobStatus()
    # Validated/Scheduled say what holds (False: it does not); Failed says what happened (True)
    st.conditions, _ = set_condition(
        st.conditions, type_, type_ not in ("Validated", "Scheduled"), reason, message, now, generation
    )
    if phase is not None:
        st.phase = phase  # type: ignore[assignment]
        st.observed_generation = generation
    return st.model_dump(by_alias=True, exclude_none=True, mode="json")


# --- the watchdog ---------------------------------------------------------------------------------


@dataclass
class _Watched:
    key: tuple[str, str]
    started: float
    interrupted: float | None = None


class Watchdog:
    """Times every reconcile. One past ``budget`` seconds gets ReconcileTimeout raised in its thread
    (at its next Python instruction); one still running ``stuck_after`` seconds later is stuck, which
    ``stuck()`` reports for the liveness probe."""

    def __init__(
        self,
        budget: float = RECONCILE_BUDGET_SECONDS,
        stuck_after: float = STUCK_AFTER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget, self.stuck_after, self._clock = budget, stuck_after, clock
        self._running: dict[int, _Watched] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, key: tuple[str, str]) -> Iterator[None]:
        ident = threading.get_ident()
        with self._lock:
            self._running[ident] = _Watched(key, self._clock())
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(ident, None)

    def check(self) -> list[tuple[str, str]]:
        """Interrupt reconciles over budget; return the keys of those just interrupted."""
        now, hit = self._clock(), []
        with self._lock:
            for ident, w in self._running.items():
                if w.interrupted is None and now - w.started > self.budget:
                    w.interrupted = now
                    hit.append((ident, w.key))
        for ident, key in hit:
            log.error(f"{key[0]}/{key[1]}: reconcile ran past its {self.budget:.0f} s budget; interrupting it")
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(ReconcileTimeout))
        return [k for _, k in hit]

    def stuck(self) -> list[tuple[str, str]]:
        now = self._clock()
        with self._lock:
            return [
                w.key
                for w in self._running.values()
                if w.interrupted is not None and now - w.interrupted > self.stuck_after
            ]

    def start(self, every: float = 1.0) -> None:
        if self._thread is not None:
            return

        def loop() -> None:
            while True:
                time.sleep(every)
                self.check()

        self._thread = threading.Thread(target=loop, name="reconcile-watchdog", daemon=True)
        self._thread.start()


# --- retries ---------------------------------------------------------------------------------------


class Retrier:
    """Re-drives a job after a transient failure, with exponential backoff and jitter (1 s, 2 s, ...
    up to ``cap``): kopf does not retry event handlers, and the next event may never come. One
    timer thread; the re-drive itself runs in ``submit`` (a thread pool)."""

    def __init__(
        self, drive: Callable[[str, str], Any], submit: Callable[..., Any] | None = None, cap: float = 300.0
    ) -> None:
        self._drive, self.cap = drive, cap
        self._submit = submit or (lambda fn, *a: threading.Thread(target=fn, args=a, daemon=True).start())
        self._heap: list[tuple[float, tuple[str, str]]] = []
        self._attempts: dict[tuple[str, str], int] = {}
        self._due: dict[tuple[str, str], float] = {}
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def delay(self, key: tuple[str, str]) -> float:
        n = self._attempts.get(key, 0)
        return min(self.cap, 2.0**n) * random.uniform(0.8, 1.2)

    def schedule(self, key: tuple[str, str]) -> float:
        """Retry ``key`` after its next backoff; returns the delay."""
        with self._cv:
            d = self.delay(key)
            self._attempts[key] = self._attempts.get(key, 0) + 1
            due = time.monotonic() + d
            if key not in self._due or due < self._due[key]:
                self._due[key] = due
                heapq.heappush(self._heap, (due, key))
            self._cv.notify()
        self._ensure_thread()
        return d

    def succeeded(self, key: tuple[str, str]) -> None:
        with self._cv:
            self._attempts.pop(key, None)

    def forget(self, key: tuple[str, str]) -> None:
        with self._cv:
            self._attempts.pop(key, None)
            self._due.pop(key, None)

    def pending(self) -> int:
        with self._cv:
            return len(self._due)

    def _ensure_thread(self) -> None:
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="reconcile-retry", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cv.wait(None if not self._heap else max(0.0, self._heap[0][0] - time.monotonic()))
                due, key = heapq.heappop(self._heap)
                if self._due.get(key) != due:
                    continue  # superseded by an earlier retry, or forgotten
                del self._due[key]
            self._submit(self._drive, *key)


_REASON_OK = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")


def safe_reason(reason: str) -> str:
    return reason if _REASON_OK.match(reason or "") else "InternalError"
