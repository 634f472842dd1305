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

from kubetune.demo import quickstart_for_node, upload_tiny_model_and_data
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
    obj = quickstart_for_node(ground.state["real_nodes"]["pod_endpoints"]["s3"], nodes[0])
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

    pods = _trainer_pods(ground, ns, name)
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



# Two ranks, one per real node, meet at the index-0 pod's name through the headless Service and train
# a least-squares model with gloo: each rank the gradient of its half of the batch, all-reduced and
# averaged (DDP's arithmetic). Rank 0 also trains the same model on the whole batch alone: one process
# with the same effective batch. Exact in real arithmetic, so the two losses differ by rounding only.
GLOO = r"""
import json, os, socket, datetime, torch, torch.distributed as dist
rank = int(os.environ["JOB_COMPLETION_INDEX"])
dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:29500", rank=rank,
                        world_size=2, timeout=datetime.timedelta(seconds=120))
torch.manual_seed(0)
X = torch.randn(256, 16, dtype=torch.float64)
y = X @ torch.linspace(-1, 1, 16, dtype=torch.float64) + 0.1 * torch.randn(256, dtype=torch.float64)
def grad(w, xs, ys):
    return 2 * xs.T @ (xs @ w - ys) / len(ys)
w, w1 = torch.zeros(16, dtype=torch.float64), torch.zeros(16, dtype=torch.float64)
for _ in range(100):
    g = grad(w, X[rank::2], y[rank::2])
    dist.all_reduce(g)
    w -= 0.05 * g / dist.get_world_size()
    w1 -= 0.05 * grad(w1, X, y)
loss = lambda v: float(((X @ v - y) ** 2).mean())
print(json.dumps({"rank": dist.get_rank(), "worldSize": dist.get_world_size(), "host": socket.gethostname(),
                  "master": socket.gethostbyname(os.environ["MASTER_ADDR"]), "loss": loss(w),
                  "lossOneProcess": loss(w1), "lossStart": loss(torch.zeros(16, dtype=torch.float64))}))
dist.destroy_process_group()
"""


def test_a_two_node_finetunejob_on_cpu_is_refused_by_the_api(ground, crds, real_nodes, ns):
    """Why the 2-node run below is a plain Indexed Job: the FineTuneJob API refuses nodes > 1 on CPU."""
    two = _job("real-two-nodes", ground, [n["name"] for n in real_nodes], 60, 60, 4)
    two["spec"]["resources"]["nodes"] = 2
    res = ground.kubectl("apply", "-n", ns, "-f", "-", stdin=json.dumps(two), check=False)
    assert res.returncode != 0 and "multi-node CPU training is not supported" in res.stderr, res.stderr


def test_two_real_nodes_rendezvous_by_headless_service_name_and_train_over_gloo(ground, real_nodes, ns):
    """An Indexed Job of 2 pods in the trainer image, one per real node (required anti-affinity), with
    the operator's multi-node wiring (manifests.py): a headless Service publishing not-ready addresses,
    the pods' subdomain, MASTER_ADDR = <job>-0.<svc>.<ns>.svc, resolved by the ground's CoreDNS; gloo
    across the bridge between the nodes."""
    assert len(real_nodes) >= 2, ("this needs 2 real nodes: the session ground starts 2 (conftest); a ground "
                                  "reused with fewer must be downed and upped")
    job, svc = "gloo", "gloo-peers"
    ground.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": svc},
                  "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"job-name": job},
                           "ports": [{"name": "rendezvous", "port": 29500}]}}, ns)
    pod = {"metadata": {"labels": {"job-name": job}},
           "spec": {"restartPolicy": "Never", "subdomain": svc,
                    "nodeSelector": {rn.TAINT_KEY: "true"},
                    "tolerations": [{"key": rn.TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
                    "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                        {"labelSelector": {"matchLabels": {"job-name": job}},
                         "topologyKey": "kubernetes.io/hostname"}]}},
                    "containers": [{"name": "trainer", "image": images.IMAGES["trainer"].ref(),
                                    "imagePullPolicy": "IfNotPresent", "command": ["python", "-c", GLOO],
                                    "env": [{"name": "MASTER_ADDR", "value": f"{job}-0.{svc}.{ns}.svc"}]}]}}
    t0 = time.monotonic()
    ground.apply({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": job},
                  "spec": {"completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0,
                           "template": pod}}, ns)
    ground.kubectl("wait", "--for=condition=Complete", f"job/{job}", "-n", ns, "--timeout=300s", timeout=330)
    took = time.monotonic() - t0

    pods = sorted(ground.kubectl_json("get", "pods", "-n", ns, "-l", f"job-name={job}")["items"],
                  key=lambda p: int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]))
    assert len(pods) == 2
    nodes = [p["spec"]["nodeName"] for p in pods]
    assert len(set(nodes)) == 2 and set(nodes) <= {n["name"] for n in real_nodes}, nodes
    for p in pods:
        (cs,) = p["status"]["containerStatuses"]
        assert cs["containerID"].startswith("containerd://") and cs["state"]["terminated"]["exitCode"] == 0, cs
    out = [json.loads(_log(ground, ns, p["metadata"]["name"]).splitlines()[-1]) for p in pods]
    assert [o["rank"] for o in out] == [0, 1] and all(o["worldSize"] == 2 for o in out), out
    # both resolved the master name to rank 0's pod IP (CoreDNS, the headless Service)
    assert {o["master"] for o in out} == {pods[0]["status"]["podIP"]}, (out, pods[0]["status"]["podIP"])
    assert out[0]["loss"] == out[1]["loss"]  # the same weights on both ranks after every all-reduce
    assert out[0]["loss"] < 0.1 * out[0]["lossStart"]  # it trained
    assert abs(out[0]["loss"] - out[0]["lossOneProcess"]) <= 1e-9 * out[0]["lossOneProcess"], out[0]
    print(f"\ngloo over 2 real nodes {nodes} ({[p['status']['podIP'] for p in pods]}): {took:.0f}s; loss "
          f"{out[0]['lossStart']:.4f} -> {out[0]['loss']:.10f} (2 ranks) vs "
          f"{out[0]['lossOneProcess']:.10f} (1 process)")
