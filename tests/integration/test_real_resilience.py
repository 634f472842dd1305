"""Resilience of trainer pods in the trainer image on real kubelet nodes: S3 stopped for a minute
mid-run (the uploads wait it out, nothing is lost), and a run across two real nodes over gloo
(rendezvous through the headless Service name, resolved by the ground's CoreDNS)."""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from kubetune.demo import quickstart_for_local, upload_tiny_model_and_data
from kubetune.devenv import ground as g
from kubetune.devenv import images
from kubetune.devenv import node as rn
from kubetune.devenv.ground import wait_until as wait_for

from opkit import apply, ftj, wait_phase

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def real_nodes(ground) -> list[dict]:
    """The ground's real nodes with the trainer image imported into each (layers and archive cached)."""
    nodes = ground.state.get("real_nodes", {}).get("nodes") or []
    assert nodes, "the session ground has no real node"
    images.build(["trainer"], REPO)
    for n in nodes:
        t0 = time.monotonic()
        images.import_into(n, "trainer")
        print(f"\ntrainer image into {n['name']}: {time.monotonic() - t0:.1f}s")
    upload_tiny_model_and_data(ground.s3())
    return nodes


def _job(name: str, ground, nodes: list[str], steps: int, save: int, batch: int) -> dict:
    obj = quickstart_for_local(ground.state["real_nodes"]["pod_endpoints"]["s3"])
    obj["metadata"]["name"] = name
    r = obj["spec"]["resources"]
    # one named real node, or any real node (never KWOK's) when the run spans several
    r["nodeSelector"] = {"kubernetes.io/hostname": nodes[0]} if len(nodes) == 1 else {rn.TAINT_KEY: "true"}
    r["tolerations"] = [{"key": rn.TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]
    obj["spec"]["training"] |= {"maxSteps": steps, "evalSteps": steps // 2, "loggingSteps": 1,
                                "microBatchSize": batch}
    obj["spec"]["checkpoints"] |= {"saveSteps": save}
    return obj


def _log(ground, ns: str, pod: str) -> str:
    return ground.kubectl("logs", pod, "-n", ns, "-c", "trainer").stdout


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _trainer_pods(ground, ns: str, name: str) -> list[dict]:
    return ground.kubectl_json("get", "pods", "-n", ns, "-l", f"kubetune.io/job={name}")["items"]


def _status(ground, ns: str, name: str) -> dict:
    return ftj(ground, ns, name).get("status") or {}


def _committed(ground, uri: str) -> list[int]:
    """Steps of the checkpoints committed (manifest written) under a run's checkpoints prefix."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    keys = []
    for page in ground.s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(int(m.group(1)) for k in keys if (m := re.search(r"checkpoint-(\d+)/manifest\.json$", k)))


class _Watch:
    """Polls the FineTuneJob's status on a thread: what it said when, through an outage."""

    def __init__(self, ground, ns: str, name: str, every: float = 2.0):
        self.seen: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(ground, ns, name, every), daemon=True)
        self._t.start()

    def _run(self, ground, ns, name, every):
        while not self._stop.is_set():
            try:
                self.seen.append((time.time(), _status(ground, ns, name)))
            except Exception:  # noqa: BLE001 - a missed sample is no failure of the run
                pass
            self._stop.wait(every)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(10)

    def between(self, t0: float, t1: float) -> list[dict]:
        return [s for t, s in self.seen if t0 <= t <= t1]


def _brief(s: dict) -> dict:
    """What a user reading the status sees: phase, progress, checkpoints, the conditions that are True."""
    return {"phase": s.get("phase"), "step": (s.get("progress") or {}).get("step"),
            "latestCheckpoint": (s.get("checkpoints") or {}).get("latestStep"),
            "conditions": sorted(f"{c['type']}={c['reason']}" for c in s.get("conditions") or []
                                 if c.get("status") == "True")}


STEPS, SAVE, BATCH, OUTAGE = 240, 20, 16, 60


def test_s3_stopped_for_a_minute_mid_run_loses_no_checkpoint(ground, operator, real_nodes, ns):
    """The ground's S3 process is stopped for 60 s while the trainer trains and saves, then started
    on the same port and data. The uploader retries with backoff (training never waits for it) and
    keeps every checkpoint it holds (keep is larger than the run's count, so nothing is superseded);
    after the outage they all commit in order and the run finishes."""
    name = "real-s3-outage"
    obj = _job(name, ground, [real_nodes[0]["name"]], STEPS, SAVE, BATCH)
    obj["spec"]["checkpoints"]["keep"] = STEPS // SAVE + 1  # retention deletes nothing: all must be there
    apply(ground, ns, obj)
    watch = _Watch(ground, ns, name)
    stopped_at = started_at = None
    try:
        wait_for("two checkpoints", lambda: ((_status(ground, ns, name).get("checkpoints") or {})
                                             .get("latestStep") or 0) >= 2 * SAVE, 420)
        before = _status(ground, ns, name)
        uri = before["checkpoints"]["latestUri"].rstrip("/").rsplit("/", 1)[0]
        reported = sorted({s["checkpoints"]["latestStep"] for s in [*(s for _, s in watch.seen), before]
                           if (s.get("checkpoints") or {}).get("latestStep")})
        in_s3_before = _committed(ground, uri)
        g.stop("s3", ground.lay, log=print)
        stopped_at = time.time()
        time.sleep(OUTAGE)
    finally:
        if stopped_at is not None:
            g.start("s3", ground.lay, log=print)  # whatever happened: the session's S3 comes back
            started_at = time.time()
    try:
        done = wait_phase(ground, ns, name, "Succeeded", 900)
    finally:
        watch.stop()
    finished_at = time.time()

    (pod,) = _trainer_pods(ground, ns, name)  # one pod: the outage cost no retry of the pod
    text = _log(ground, ns, pod["metadata"]["name"])
    events = _events(text)
    steps = sorted(e["step"] for e in events if e["event"] == "step")
    assert steps == list(range(1, STEPS + 1)), steps[:3] + steps[-3:]
    assert done["status"]["result"]["metrics"]["steps"] == STEPS

    after = _committed(ground, uri)
    assert set(reported) <= set(in_s3_before) <= set(after), (reported, in_s3_before, after)
    assert after == list(range(SAVE, STEPS + 1, SAVE)), after  # consecutive: none dropped or superseded

    failed = re.findall(r"checkpoint checkpoint-(\d+) upload failed \(([^)]*)\); retry (\d+) in ([\d.]+)s", text)
    assert failed, text[-3000:]
    retried = sorted({int(s) for s, *_ in failed})
    assert set(retried) <= set(after)  # every checkpoint that failed to upload committed later
    delays = [float(d) for *_, d in failed]
    assert len(failed) >= 3 and delays[-1] > 4 * delays[0], delays  # exponential backoff, not a tight loop
    progress_fails = text.count("progress write to")
    assert stopped_at is not None and started_at is not None
    # training went on while S3 was down (same host clock): the uploads' retries never held it up
    trained = [e["step"] for e in events if e["event"] == "step" and stopped_at <= e["ts"] <= started_at]
    assert len(trained) >= 2 * SAVE, trained
    during = watch.between(stopped_at, started_at)
    assert during and all(s.get("phase") == "Running" for s in during), [_brief(s) for s in during]
    print(f"\nS3 down {started_at - stopped_at:.0f}s; checkpoints reported before {reported}, in S3 before "
          f"{in_s3_before}, after {after}; upload retries {len(failed)} for checkpoints {retried} "
          f"(backoffs {delays}); {len(trained)} steps trained during the outage; progress write failures "
          f"{progress_fails}; "
          f"finished {finished_at - started_at:.0f}s after S3 came back; final eval loss "
          f"{done['status']['result']['metrics']['evalLoss']:.3f}")
    print("status during the outage:")
    for t, s in watch.seen:
        if stopped_at - 6 <= t <= started_at + 20:
            print(f"  {t - stopped_at:+6.1f}s {json.dumps(_brief(s))}")

