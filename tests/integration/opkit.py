"""Helpers for the operator's integration tests: the operator as a process, examples, waits."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import yaml

from kubetune.devenv.ground import wait_until as wait_for

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Operator:
    def __init__(self, log: Path):
        self.log = log
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune.cli", "operator", "--standalone", "--metrics-port", str(self.port),
             "--metrics-address", "127.0.0.1", "--liveness", "", "--progress-interval", "2",
             "--retry-interval", "5",
             "--allow-endpoint", "127.0.0.1", *extra],
            stdout=self.log.open("a"), stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True)
        wait_for("operator /metrics", lambda: self.metrics() is not None, 30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def metrics(self) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                return r.read().decode()
        except OSError:
            return None

    def metric(self, metric: str, /, **labels: str) -> float | None:
        """The value of one sample, matched by name and (a subset of) its labels."""
        from prometheus_client.parser import text_string_to_metric_families

        for fam in text_string_to_metric_families(self.metrics() or ""):
            for sample in fam.samples:
                if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return None


def example(name: str, **changes) -> dict:
    obj = yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text())
    for dotted, value in changes.items():
        node = obj
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return obj


def ftj(ground, ns, name) -> dict:
    return ground.kubectl_json("get", "ftj", name, "-n", ns)


def phase(ground, ns, name) -> str | None:
    return (ftj(ground, ns, name).get("status") or {}).get("phase")


def cond(obj: dict, type_: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


def wait_ftj(ground, ns, name, want: str | Callable[[dict], object], timeout: float = 60, what: str = "") -> dict:
    """Wait until the FineTuneJob is in phase ``want`` (a str) or ``want(obj)`` is true; returns the object.
    On timeout the error says where the job got to instead: its phase and conditions.

        wait_ftj(ground, ns, "retrain", lambda o: status(o).get("run") == 2, what="run 2")
    """
    deadline = time.monotonic() + timeout
    is_it = (lambda o: status(o).get("phase") == want) if isinstance(want, str) else want
    while True:
        obj = ftj(ground, ns, name)
        if is_it(obj):
            return obj
        if time.monotonic() > deadline:
            st = status(obj)
            conds = "; ".join(f"{c['type']}={c['status']} {c.get('reason')}: {c.get('message')}"
                              for c in st.get("conditions") or [])
            wanted = f"phase {want}" if isinstance(want, str) else (what or "the condition waited for")
            raise AssertionError(f"{ns}/{name}: no {wanted} after {timeout:.0f}s; it is {st.get('phase')} ({conds})")
        time.sleep(0.5)


def wait_phase(ground, ns, name, want: str, timeout: float = 60) -> dict:
    """Wait for a phase (wait_ftj with a phase)."""
    return wait_ftj(ground, ns, name, want, timeout)


def status(obj: dict) -> dict:
    return obj.get("status") or {}


# KWOK completes a pod this long after it starts. A test that waits for phase Running needs the window:
# with 1 s the job went Running -> Succeeded between two polls on a busy machine (CI, pvc-data).
SEEN_RUNNING = "30s"


def small_gpu_job(name: str, delay: str = "1s") -> dict:
    """A real small model (Qwen2.5-0.5B from the catalog) with LoRA on one GPU."""
    return example("lora-8b", **{
        "metadata.name": name,
        "spec.model.uri": "hf://Qwen/Qwen2.5-0.5B", "spec.model.tokenSecret": None,  # not gated
        "spec.training.epochs": None, "spec.training.maxSteps": 100,
        "spec.training.microBatchSize": 2, "spec.training.earlyStopping": None, "spec.training.evalSteps": None,
        "spec.dataset.maxSeqLength": 1024,
        "spec.resources.memory": "8Gi", "spec.resources.cpu": "2",
        "spec.resources.podAnnotations": {"pod-complete.stage.kwok.x-k8s.io/delay": delay},
        "spec.output": {},
    })


def _clean(obj: dict) -> dict:
    """Drop keys set to None (a way to delete example fields above)."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if v is not None}
    return obj


def apply(ground, ns, obj) -> None:
    ground.kubectl("apply", "-n", ns, "-f", "-", stdin=json.dumps(_clean(obj)))


def put_progress(ground, ns, name, run, step, total, loss, ckpt_step=None) -> None:
    """Write the trainer's progress object where the operator told the trainer to (its ConfigMap)."""
    cm = ground.kubectl_json("get", "configmap", f"{name}-r{run}-config", "-n", ns)
    cfg = yaml.safe_load(cm["data"]["trainer.yaml"])
    bucket, _, key = cfg["paths"]["progressUri"][len("s3://"):].partition("/")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    body = {"state": "training", "progress": {"step": step, "totalSteps": total, "loss": loss, "epoch": 0.5,
                                              "tokensPerSecond": 1234.5, "etaSeconds": 60, "updatedAt": now}}
    if ckpt_step:
        body["checkpoints"] = {"latestUri": f"{cfg['paths']['checkpointsUri']}step-{ckpt_step}/",
                               "latestStep": ckpt_step, "latestTime": now, "count": 1}
    ground.s3().put_object(Bucket=bucket, Key=key, Body=json.dumps(body).encode())


class Recorder:
    """Every state each object of a namespace went through (a pod is gone once its replacement runs;
    a FineTuneJob's Preempted condition lasts only until the replacement pod runs)."""

    def __init__(self, ns: str, kind: str = "pods"):
        from kubernetes import client, config, watch

        # explicit: the client read $KUBECONFIG when first imported, maybe before the ground set it
        config.load_kube_config(config_file=os.environ["KUBECONFIG"])
        self.core = client.CoreV1Api()
        self.seen: dict[str, list[dict]] = {}
        self._w = watch.Watch()
        if kind == "pods":
            args = (self.core.list_namespaced_pod, ns)
        else:
            args = (client.CustomObjectsApi().list_namespaced_custom_object, "kubetune.io", "v1alpha1", ns, kind)
        threading.Thread(target=self._run, args=args, daemon=True).start()

    def _run(self, *args) -> None:
        ser = self.core.api_client.sanitize_for_serialization
        try:
            for ev in self._w.stream(*args, timeout_seconds=600):
                obj = ser(ev["object"])
                self.seen.setdefault(obj["metadata"]["name"], []).append(obj)
        except Exception:  # the connection closing when the test stops watching
            pass

    def stop(self) -> None:
        self._w.stop()

    def terminated(self, name: str) -> dict | None:
        for obj in reversed(self.seen.get(name, [])):
            for cs in (obj.get("status") or {}).get("containerStatuses") or []:
                if (cs.get("state") or {}).get("terminated"):
                    return obj
        return None


# --- trainer pods on the ground's real kubelet nodes -------------------------------------------------------


def job_on_node(ground, node: dict, name: str, steps: int, save: int | None = None, batch: int | None = None,
                endpoint: str | None = None) -> dict:
    """The quickstart as `name`, pinned to a real node (its selector and its taint's toleration), reading S3
    at the address pods reach (or `endpoint`)."""
    from kubetune.demo import quickstart_for_node

    obj = quickstart_for_node(endpoint or ground.state["real_nodes"]["pod_endpoints"]["s3"], node["name"])
    obj["metadata"]["name"] = name
    obj["spec"]["training"] |= {"maxSteps": steps, "evalSteps": max(1, steps // 2), "loggingSteps": 1}
    obj["spec"]["checkpoints"] |= {"saveSteps": save or max(1, steps // 2)}
    if batch:  # bigger steps, so a disruption lands mid-run (the debug slow-down is not settable by a spec)
        obj["spec"]["training"]["microBatchSize"] = batch
    return obj


def trainer_pods(ground, ns: str, name: str) -> list[dict]:
    return ground.kubectl_json("get", "pods", "-n", ns, "-l", f"kubetune.io/job={name}")["items"]


def trainer_events(ground, ns: str, pod: str) -> list[dict]:
    """The trainer's JSON event lines, from the kubelet (kubectl logs)."""
    out = ground.kubectl("logs", pod, "-n", ns, "-c", "trainer").stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# Every image a real-node test runs: the session's ground fixture starts their export and import in the
# background as soon as the ground is up (start_image_prep), so the first real-node fixture mostly
# finds them in place instead of spending minutes on 3 GiB of archive per node.
REAL_NODE_IMAGES = ("operator", "trainer")
_prep: dict = {}


def _import_everywhere(nodes: list[dict], names: tuple[str, ...]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from kubetune.devenv import images

    images.build(list(names), REPO)
    for name in names:
        images.archive(name)  # once, before the nodes import it
    with ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(lambda n: [images.import_into(n, name) for name in names], nodes))


def start_image_prep(ground) -> None:
    """Export and import REAL_NODE_IMAGES into every real node, in a thread (a no-op without real nodes)."""
    from concurrent.futures import ThreadPoolExecutor

    nodes = ground.state.get("real_nodes", {}).get("nodes") or []
    if nodes and "future" not in _prep:
        pool = ThreadPoolExecutor(1, thread_name_prefix="image-prep")
        _prep["future"] = pool.submit(_import_everywhere, nodes, REAL_NODE_IMAGES)
        pool.shutdown(wait=False)


def wait_image_prep() -> None:
    """Wait for start_image_prep's thread. A failure is not raised here: prepare_real_nodes then does the
    same work in line, and its error names the step that failed."""
    fut = _prep.get("future")
    if fut is not None:
        try:
            fut.result()
        except Exception as e:  # noqa: BLE001
            print(f"background image prep failed, redoing it in line: {e}", file=sys.stderr)


def prepare_real_nodes(ground, count: int = 1, names: tuple[str, ...] = ("trainer",)) -> list[dict]:
    """The ground's first `count` real nodes, with the current build of each image in the containerd of
    every real node (built first if needed: layers and the exported archive are cached; a node that holds
    the digest already is skipped), and the tiny model and data in S3. Every node imports at once, side
    by side (each its own containerd): later fixtures then find the images in place."""
    from kubetune.demo import upload_tiny_model_and_data

    every = ground.state.get("real_nodes", {}).get("nodes") or []
    assert len(every) >= count, f"the session ground has {len(every)} real nodes, this needs {count}"
    wait_image_prep()
    _import_everywhere(every, names)  # seconds when the prep did it: each step checks its cache first
    upload_tiny_model_and_data(ground.s3())
    return every[:count]
