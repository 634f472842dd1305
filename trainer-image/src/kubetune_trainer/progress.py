"""What the trainer tells the operator: live progress in S3, Prometheus metrics, the termination message.

- paths.progressUri: a TrainerProgress JSON object, overwritten every ~10 s (and at each checkpoint
  commit and at the end) by a background thread; a failed write is logged and retried next time.
- /metrics on metricsPort (prometheus_client), scraped by the PodMonitor.
- The termination message: a TrainerTermination JSON written to $KUBETUNE_TERMINATION_LOG, else
  /dev/termination-log (the pod's terminationMessagePath), trimmed to what the kubelet keeps.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Callable

from kubetune.api.v1alpha1 import ResultStatus, TrainerProgress, TrainerTermination
from kubetune_trainer.knobs import termination_log

TERMINATION_LIMIT = 4000  # the kubelet keeps 4096 bytes


_OUT_LOCK = threading.Lock()


_RANK = int(os.environ.get("RANK", "0") or 0)
_RANK_EVENTS = ("log", "failed", "launch", "preempted", "load")  # what a rank other than 0 still prints


def log_event(event: str, **fields) -> None:
    """One JSON line on stdout per event: what `kubectl logs` shows and what tests parse. One write
    under a lock: the uploader and progress threads log too, and lines must not interleave.
    Under several processes rank 0 reports the run (its numbers are already global); the other
    ranks print only their own messages and failures, tagged with their rank."""
    if _RANK:
        if event not in _RANK_EVENTS:
            return
        fields = {"rank": _RANK, **fields}
    rec = {"ts": round(time.time(), 3), "event": event, **fields}
    line = json.dumps(rec, default=str) + "\n"
    with _OUT_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


def logger(event: str = "log") -> Callable[[str], None]:
    return lambda msg: log_event(event, message=msg)


class ProgressReporter:
    def __init__(self, location=None, key: str | None = None, interval: float = 10.0, log: Callable[[str], None] = print,
                 job_uid: str | None = None):
        self.loc = location
        self.key = key
        self.interval = interval
        self.log = log
        self.doc = TrainerProgress(state="starting", job_uid=job_uid)
        self._lock = threading.Lock()
        self._write = threading.Lock()  # one write at a time, so an older snapshot never lands last
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._started = time.time()
        self._thread = None
        if self.loc is not None:
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()

    # --- updates (cheap; called from the training loop) ---
    def update(self, state: str | None = None, message: str | None = None, **progress) -> None:
        with self._lock:
            if state:
                self.doc.state = state
                self.doc.message = message
            p = self.doc.progress
            for k, v in progress.items():
                setattr(p, k, v)
            if p.total_steps:
                p.percent = f"{int(100 * p.step / p.total_steps)}%"
            p.updated_at = datetime.now(timezone.utc)
        self._dirty.set()

    def objective_metrics(self, values: dict[str, float]) -> None:
        """An objective's per-step metrics (rewardAccuracy, ...), where the API's Progress has room for
        them; an older API without the field keeps its document as it was."""
        if not values or "metrics" not in type(self.doc.progress).model_fields:
            return
        with self._lock:
            self.doc.progress.metrics = dict(values)
        self._dirty.set()

    def resumed(self, step: int) -> None:
        with self._lock:
            self.doc.resumed_from_step = step
        self._dirty.set()

    def checkpoint(self, uri: str | None, step: int | None, count: int) -> None:
        with self._lock:
            c = self.doc.checkpoints
            if uri is not None:
                c.latest_uri, c.latest_step, c.latest_time = uri, step, datetime.now(timezone.utc)
            c.count = count
        self.flush()

    def snapshot(self) -> dict:
        with self._lock:
            return self.doc.model_dump(by_alias=True, exclude_none=True, mode="json")

    # --- writing ---
    def flush(self) -> bool:
        if self.loc is None:
            return True
        try:
            with self._write:
                self.loc.put_bytes(self.key, json.dumps(self.snapshot()).encode())
            return True
        except Exception as e:
            from kubetune_trainer.storage import short_error

            self.log(f"progress write to {self.loc.uri}/{self.key} failed ({short_error(e)}); will retry")
            self._dirty.set()
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self._dirty.is_set():
                self._dirty.clear()
                self.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()


class Metrics:
    """Prometheus gauges; no-ops when the port is 0 or prometheus_client is missing."""

    def __init__(self, port: int, labels: dict[str, str] | None = None):
        self.enabled = False
        self.port = port
        self._objective: dict = {}
        if not port:
            return
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
        except ImportError:
            return
        self.registry = reg = CollectorRegistry()
        names = list((labels or {}).keys())
        self._labels = labels or {}

        def g(name, doc):
            m = Gauge(name, doc, names, registry=reg)
            return m.labels(**self._labels) if names else m

        def c(name, doc):
            m = Counter(name, doc, names, registry=reg)
            return m.labels(**self._labels) if names else m

        self.step = g("kubetune_trainer_step", "Optimizer steps done")
        self.total_steps = g("kubetune_trainer_total_steps", "Optimizer steps planned")
        self.epoch = g("kubetune_trainer_epoch", "Epochs done (fractional)")
        self.loss = g("kubetune_trainer_loss", "Training loss of the last step")
        self.eval_loss = g("kubetune_trainer_eval_loss", "Latest validation loss")
        self.tokens_per_second = g("kubetune_trainer_tokens_per_second", "Training throughput over all processes")
        self.learning_rate = g("kubetune_trainer_learning_rate", "Current learning rate")
        self.checkpoint_step = g("kubetune_trainer_checkpoint_committed_step", "Step of the newest committed checkpoint")
        self.upload_failures = c("kubetune_trainer_checkpoint_upload_failures", "Failed checkpoint upload attempts")
        self.checkpoints_superseded = c("kubetune_trainer_checkpoints_superseded",
                                        "Checkpoints dropped uncommitted while S3 failed (retention would delete them)")
        self.gpu_memory_peak = g("kubetune_trainer_gpu_memory_peak_bytes", "Peak GPU memory reserved by this process")
        self.tokens = c("kubetune_trainer_tokens", "Training tokens processed")
        try:
            start_http_server(port, registry=reg)
        except OSError as e:
            print(f"metrics: cannot listen on :{port} ({e}); /metrics disabled", file=sys.stderr)
            return
        self.enabled = True

    def set(self, **values) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            if v is not None:
                getattr(self, k).set(v)

    def objective(self, values: dict[str, float]) -> None:
        """An objective's metrics as kubetune_trainer_<name in snake case> gauges, made on first sight:
        which ones exist depends on the objective (rewardAccuracy -> kubetune_trainer_reward_accuracy)."""
        if not self.enabled:
            return
        from prometheus_client import Gauge

        for k, v in values.items():
            g = self._objective.get(k)
            if g is None:
                snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in k)
                g = Gauge(f"kubetune_trainer_{snake}", f"Objective metric {k} of the last step",
                          list(self._labels), registry=self.registry)
                g = self._objective[k] = g.labels(**self._labels) if self._labels else g
            g.set(v)

    def inc(self, name: str, amount: float = 1) -> None:
        if self.enabled:
            getattr(self, name).inc(amount)


def termination_path() -> str:
    return termination_log()


def written_reason(path: str | None = None) -> str | None:
    """The reason in the termination file now, if any (another rank's, or a launched worker's)."""
    try:
        with open(path or termination_path()) as f:
            return json.loads(f.read() or "{}").get("reason")
    except (OSError, ValueError, AttributeError):
        return None


def write_termination(reason: str, message: str = "", result: ResultStatus | None = None, step: int | None = None) -> dict:
    """Write the TrainerTermination JSON; returns it. Shortens the message until it fits."""
    msg = message
    while True:
        doc = TrainerTermination(reason=reason, message=msg[:3000], result=result, step=step)
        text = json.dumps(doc.model_dump(by_alias=True, exclude_none=True, mode="json"))
        if len(text.encode()) <= TERMINATION_LIMIT:
            break
        if not msg:
            ev = result.evaluation if result is not None else None
            if ev is None or not (ev.base or ev.tuned or ev.delta):
                break
            # the evaluation's figures are in summary.json too (reportUri): the headline and the URIs must fit
            result = result.model_copy(update={"evaluation": ev.model_copy(update={"base": {}, "tuned": {},
                                                                                   "delta": {}})})
            msg = message
            continue
        msg = msg[: max(0, len(msg) - (len(text.encode()) - TERMINATION_LIMIT) - 10)]
    path = termination_path()
    if reason == "Error" and written_reason(path) not in (None, "Error"):
        return json.loads(text)  # another rank's precise reason (OOM, bad data) beats a follow-on error
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError:
        pass  # not in a pod (no /dev/termination-log): stdout has it anyway
    return json.loads(text)
