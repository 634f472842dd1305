"""Operator throughput on the local test ground (kubetune dev up must be running).

  python benchmarks/operator_bench.py [--jobs 1000] [--rate 10] [--rate-jobs 200]

1. Burst: create N FineTuneJobs as fast as the apiserver takes them; report the time until every
   one has its batch/v1 Job and a status with an estimate.
2. Paced: create jobs at R per second; report create->Job latency p50/p99 (Job creationTimestamp
   minus FineTuneJob creationTimestamp, both set by the apiserver, so the client is not measured).
3. The operator's peak RSS over both (psutil, sampled every 0.2 s, children included).
4. CPU seconds spent during the burst by the operator and by each ground process: on a small machine
   they share the cores, so this says which one the burst waits for.

The operator runs as its own process with the ground's kubeconfig, exactly as `kubetune operator`.
Jobs use a catalog model on one GPU, suspended (runPolicy.suspend) so that 1000 pods do not flood
KWOK: the operator still estimates, places and creates every child.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
from kubernetes import client, config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator" / "src"))

from kubetune.devenv import ground as g  # noqa: E402


def job_body(name: str) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "model": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
            "dataset": {"uri": "s3://kubetune-data/x.jsonl", "maxSeqLength": 1024},
            "method": {"type": "lora"},
            "training": {"maxSteps": 100, "microBatchSize": "auto", "effectiveBatchSize": 16},
            "resources": {"gpusPerNode": 1, "cpu": "1", "memory": "1Gi"},
            "checkpoints": {"uri": "s3://kubetune/bench/"},
            "runPolicy": {"suspend": True},
        },
    }


class RSS(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.2)


def apiserver_requests(state: dict, lay) -> dict[str, float]:
    """kube-apiserver's apiserver_request_total summed by verb and resource[/subresource]."""
    import re

    out: dict[str, float] = {}
    for line in g.kubectl(state, lay, "get", "--raw", "/metrics").stdout.splitlines():
        if line.startswith("apiserver_request_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line[line.index("{"):line.rindex("}")]))
            key = f"{labels.get('verb')} {labels.get('resource')}" + (
                f"/{labels['subresource']}" if labels.get("subresource") else "")
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--rate-jobs", type=int, default=200)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    lay = g.layout()
    if not g.is_up(lay):
        print("the test ground is not up: run `kubetune dev up` first", file=sys.stderr)
        return 2
    env = {**os.environ, **g.env_values(lay)}
    os.environ.update(g.env_values(lay))
    config.load_kube_config(config_file=env["KUBECONFIG"])
    api = client.ApiClient()
    api.configuration.connection_pool_maxsize = 16
    co, core, batch = client.CustomObjectsApi(api), client.CoreV1Api(api), client.BatchV1Api(api)
    state = g.load_state(lay)
    g.kubectl(state, lay, "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})

    log = open(lay.root / "operator-bench.log", "w")
    op = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "operator", "--standalone", "--namespace", ns,
                           "--metrics-port", "0", "--liveness", ""], env=env, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
    rss = RSS(op.pid)
    rss.start()
    time.sleep(3)
    figures: dict = {}
    try:
        # 1. burst. Watches (not list polling, which would load the apiserver more than the operator does)
        # note when each job's batch/v1 Job appears and when its status first carries an estimate.
        from kubernetes import watch

        job_seen: set[str] = set()
        status_seen: set[str] = set()
        done = threading.Event()

        def watch_until(lister, seen: set, pick) -> None:
            w = watch.Watch()
            for ev in w.stream(lister, timeout_seconds=600):
                name = pick(ev["object"])
                if name and name.startswith("burst-"):
                    seen.add(name)
                if len(job_seen) >= args.jobs and len(status_seen) >= args.jobs:
                    done.set()
                if done.is_set():
                    w.stop()

        threads = [
            threading.Thread(target=watch_until, daemon=True, args=(
                lambda **kw: batch.list_namespaced_job(ns, label_selector="kubetune.io/job", **kw), job_seen,
                lambda j: j["metadata"]["labels"].get("kubetune.io/job"))),
            threading.Thread(target=watch_until, daemon=True, args=(
                lambda **kw: co.list_namespaced_custom_object("kubetune.io", "v1alpha1", ns, "finetunejobs", **kw),
                status_seen, lambda o: o["metadata"]["name"] if (o.get("status") or {}).get("estimate") else None)),
        ]
        for t in threads:
            t.start()
        time.sleep(1)
        procs = {"operator": psutil.Process(op.pid),
                 **{n: psutil.Process(p["pid"]) for n, p in state["procs"].items() if n != "s3"}}
        cpu0 = {n: sum(p.cpu_times()[:2]) for n, p in procs.items()}
        req0 = apiserver_requests(state, lay)
        t0 = time.time()
        with cf.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: co.create_namespaced_custom_object(
                "kubetune.io", "v1alpha1", ns, "finetunejobs", job_body(f"burst-{i:04d}")), range(args.jobs)))
        created = time.time() - t0
        if not done.wait(600):
            raise SystemExit(f"burst: only {len(job_seen)} Jobs / {len(status_seen)} statuses after 600 s")
        figures["burst_jobs"] = args.jobs
        figures["burst_create_s"] = round(created, 1)
        figures["burst_all_jobs_and_status_s"] = round(time.time() - t0, 1)
        figures["burst_cpu_s"] = {n: round(sum(p.cpu_times()[:2]) - cpu0[n], 1) for n, p in procs.items()}
        print(f"burst: {args.jobs} FineTuneJobs created in {created:.1f} s; all have Jobs and status after "
              f"{figures['burst_all_jobs_and_status_s']} s", flush=True)
        print("burst CPU seconds: " + ", ".join(f"{n} {v}" for n, v in figures["burst_cpu_s"].items()), flush=True)
        # Everyone's requests (the operator's, the Job controller's, this script's creates), per job.
        req1 = apiserver_requests(state, lay)
        per_job = {k: round((v - req0.get(k, 0.0)) / args.jobs, 2) for k, v in req1.items()}
        figures["burst_requests_per_job"] = {k: v for k, v in sorted(per_job.items(), key=lambda kv: -kv[1])
                                             if v >= 0.05}
        print("burst apiserver requests per job: " + ", ".join(
            f"{k} {v}" for k, v in figures["burst_requests_per_job"].items()), flush=True)
        time.sleep(5)  # let the burst's tail settle before the paced run

        # 2. paced: a watch sees each Job arrive; latency = Job seen - create call returned (one clock)
        names = [f"paced-{i:04d}" for i in range(args.rate_jobs)]
        created_at: dict[str, float] = {}
        seen_at: dict[str, float] = {}
        w = watch.Watch()

        def watch_jobs() -> None:
            for ev in w.stream(batch.list_namespaced_job, ns, label_selector="kubetune.io/job", timeout_seconds=300):
                owner = ev["object"].metadata.labels["kubetune.io/job"]
                if owner.startswith("paced-") and owner not in seen_at:
                    seen_at[owner] = time.time()
                    if len(seen_at) == len(names):
                        w.stop()

        watcher = threading.Thread(target=watch_jobs, daemon=True)
        watcher.start()
        time.sleep(1)
        t0 = time.time()
        for i, n in enumerate(names):
            delay = t0 + i / args.rate - time.time()
            if delay > 0:
                time.sleep(delay)
            co.create_namespaced_custom_object("kubetune.io", "v1alpha1", ns, "finetunejobs", job_body(n))
            created_at[n] = time.time()
        watcher.join(120)
        missing = [n for n in names if n not in seen_at]
        if missing:
            raise SystemExit(f"paced: {len(missing)} jobs got no Job within 120 s")
        lat = [seen_at[n] - created_at[n] for n in names]
        q = statistics.quantiles(lat, n=100)
        figures.update(paced_rate_per_s=args.rate, paced_jobs=args.rate_jobs,
                       latency_p50_s=round(statistics.median(lat), 3), latency_p99_s=round(q[98], 3),
                       latency_max_s=round(max(lat), 3))
        print(f"paced: {args.rate_jobs} jobs at {args.rate}/s: create->Job p50 {figures['latency_p50_s']} s, "
              f"p99 {figures['latency_p99_s']} s, max {figures['latency_max_s']} s", flush=True)
    finally:
        rss.stop.set()
        figures["operator_peak_rss_mb"] = round(rss.peak / 2**20, 1)
        print(f"operator peak RSS: {figures['operator_peak_rss_mb']} MB", flush=True)
        os.killpg(op.pid, signal.SIGTERM)
        try:
            op.wait(15)
        except subprocess.TimeoutExpired:  # kopf waits for in-flight handlers; not what is measured here
            os.killpg(op.pid, signal.SIGKILL)
            op.wait(5)
        # Without the operator nothing removes the FineTuneJobs' finalizers: drop them, then wait for
        # the namespace to go, so the next user of the ground starts clean.
        items = co.list_namespaced_custom_object("kubetune.io", "v1alpha1", ns, "finetunejobs")["items"]
        with cf.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda o: co.patch_namespaced_custom_object(
                "kubetune.io", "v1alpha1", ns, "finetunejobs", o["metadata"]["name"],
                {"metadata": {"finalizers": None}}), items))
        core.delete_namespace(ns)
        g.wait_until(f"namespace {ns} deleted", lambda: ns not in {
            n.metadata.name for n in core.list_namespace().items}, 300)
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
