"""Resilience of trainer pods in the trainer image on real kubelet nodes: S3 stopped for a minute
mid-run (the uploads wait it out, nothing is lost), and a 2-node FineTuneJob over gloo across two real
nodes (rendezvous through the headless Service name, resolved by the ground's CoreDNS)."""
from __future__ import annotations

import json
import re
import threading
import time

import pytest

from kubetune.devenv import ground as g
from kubetune.devenv import node as rn
from kubetune.devenv.ground import wait_until as wait_for

from opkit import apply, ftj, job_on_node, prepare_real_nodes, trainer_events, trainer_pods, wait_phase

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def real_nodes(ground) -> list[dict]:
    """Both real nodes of the session ground, with the trainer image."""
    return prepare_real_nodes(ground, count=2)


def _job(name: str, ground, nodes: list[dict], steps: int, save: int, batch: int) -> dict:
    """The quickstart on one named real node, or on any real node (never KWOK's) when it spans several."""
    obj = job_on_node(ground, nodes[0], name, steps, save, batch)
    if len(nodes) > 1:
        obj["spec"]["resources"]["nodeSelector"] = {rn.TAINT_KEY: "true"}
    return obj


def _log(ground, ns: str, pod: str) -> str:
    return ground.kubectl("logs", pod, "-n", ns, "-c", "trainer").stdout


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


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
                                 if c.get("status") == "True" or c.get("reason") == "StorageUnreachable")}


STEPS, SAVE, BATCH, OUTAGE = 160, 20, 16, 60


def test_s3_stopped_for_a_minute_mid_run_loses_no_checkpoint(ground, operator, real_nodes, ns):
    """The ground's S3 process is stopped for 60 s while the trainer trains and saves, then started
    on the same port and data. The uploader retries with backoff (training never waits for it) and
    keeps every checkpoint it holds (keep is larger than the run's count, so nothing is superseded);
    after the outage they all commit in order and the run finishes."""
    name = "real-s3-outage"
    obj = _job(name, ground, real_nodes[:1], STEPS, SAVE, BATCH)
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

    pods = trainer_pods(ground, ns, name)
    ends = {p["metadata"]["name"]: ((p["status"].get("containerStatuses") or [{}])[0].get("state") or {})
            .get("terminated") for p in pods}
    assert len(pods) == 1, ends  # one pod: the outage cost no retry of the pod
    (pod,) = pods
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
    # at least a save interval: a checkpoint was made, and its upload retried, inside the outage (a CI run
    # on a busy machine trained 41 steps in it)
    assert len(trained) >= SAVE, trained
    during = watch.between(stopped_at, started_at)
    assert during and all(s.get("phase") == "Running" for s in during), [_brief(s) for s in during]
    # ... and said that S3 was not answering, then that it was again
    synced = [next((c for c in s.get("conditions") or [] if c["type"] == "CheckpointSynced"), {}) for s in during]
    assert any(c.get("reason") == "StorageUnreachable" and c.get("status") == "False" for c in synced), synced
    end = next(c for c in done["status"]["conditions"] if c["type"] == "CheckpointSynced")
    assert end["status"] == "True", end
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


def test_a_two_node_finetunejob_trains_over_gloo_on_two_real_nodes(ground, operator, real_nodes, ns):
    """`resources.nodes: 2` on the two real nodes (each advertises one fake GPU; the trainer, finding no
    CUDA, runs on CPU): the operator places it on both, and renders an Indexed Job of two ranks (one per
    node: required anti-affinity) and a headless Service. Rank 1 reaches rank 0 at
    <job>-0.<svc>.<ns>.svc through the ground's CoreDNS, and accelerate runs gloo across the bridge."""
    assert len(real_nodes) >= 2, ("this needs 2 real nodes: the session ground starts 2 (conftest); a ground "
                                  "reused with fewer must be downed and upped")
    name, steps = "real-two-nodes", 30
    obj = _job(name, ground, real_nodes, steps, steps, 4)
    obj["spec"]["resources"] |= {"nodes": 2, "gpusPerNode": 1}
    t0 = time.monotonic()
    apply(ground, ns, obj)
    done = wait_phase(ground, ns, name, "Succeeded", 600)
    took = time.monotonic() - t0

    st = done["status"]
    assert sorted(st["placement"]["nodes"]) == sorted(n["name"] for n in real_nodes), st["placement"]
    pods = sorted(trainer_pods(ground, ns, name),
                  key=lambda p: int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]))
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]  # no retry: both ranks ran once
    nodes = [p["spec"]["nodeName"] for p in pods]
    assert len(set(nodes)) == 2 and set(nodes) <= {n["name"] for n in real_nodes}, nodes
    job = pods[0]["metadata"]["labels"]["job-name"]
    svc = pods[0]["spec"]["subdomain"]
    for rank, p in enumerate(pods):
        (cs,) = p["status"]["containerStatuses"]
        assert cs["containerID"].startswith("containerd://") and cs["state"]["terminated"]["exitCode"] == 0, cs
        (launch,) = [e for e in trainer_events(ground, ns, p["metadata"]["name"]) if e["event"] == "launch"]
        argv = launch["command"].split()
        flags = {a[2:]: b for a, b in zip(argv, argv[1:], strict=False) if a.startswith("--")}
        assert (flags["num_machines"], flags["machine_rank"], flags["num_processes"]) == ("2", str(rank), "2")
        assert flags["main_process_ip"] == f"{job}-0.{svc}.{ns}.svc", launch
    # rank 0 trained the whole run (its steps are the run's), and its model learned
    events = trainer_events(ground, ns, pods[0]["metadata"]["name"])
    assert sorted(e["step"] for e in events if e["event"] == "step") == list(range(1, steps + 1))
    m = st["result"]["metrics"]
    assert m["steps"] == steps and m["evalLoss"] < m["baseEvalLoss"], m
    bucket, _, key = st["result"]["adapterUri"][len("s3://"):].partition("/")
    got = {o["Key"] for o in ground.s3().list_objects_v2(Bucket=bucket, Prefix=key)["Contents"]}
    assert f"{key.rstrip('/')}/adapter_model.safetensors" in got, got
    print(f"\n2-node FineTuneJob on {nodes} ({[p['status']['podIP'] for p in pods]}), rendezvous at "
          f"{job}-0.{svc}.{ns}.svc: Succeeded in {took:.0f}s; eval loss {m['baseEvalLoss']:.3f} -> "
          f"{m['evalLoss']:.3f} in {m['steps']} steps")
