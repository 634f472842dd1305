"""A minimal kubelet for the local test ground: it runs the trainer pods bound to its node as real
processes on this machine, so `make demo` trains a model for real through the whole stack.

It registers a Node (without KWOK's annotation, so KWOK leaves it alone) tainted
``kubetune.io/local-agent=true:NoSchedule``: only pods that tolerate it land here. For each pod it
- materializes configMap volumes and emptyDirs into a per-pod directory and rewrites mount paths;
- resolves env (values, secretKeyRef, configMapKeyRef, fieldRef);
- runs the container command, mapping `kubetune ...` onto this Python's `-m kubetune.cli`;
- reports Running, then Succeeded/Failed with the exit code and the termination message, the way
  a kubelet does;
- on pod deletion (suspend, delete, eviction) sends SIGTERM, SIGKILL after the grace period, reports
  the exit (code, termination message) as a kubelet does, then removes the pod;
- passes its own KUBETUNE_DEBUG_* variables to the pods (test knobs, e.g. a slower trainer);
- with --pull-seconds, holds each pod in ContainerCreating that long first, as an image pull would.

It is a test tool, not a container runtime: images are ignored and nothing is isolated.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

log = logging.getLogger("kubetune.agent")
TAINT_KEY = "kubetune.io/local-agent"
LABEL = "kubetune.io/local-agent"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_manifest(name: str, cpu: str, memory: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                LABEL: "true",
            },
        },
        "spec": {"taints": [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}]},
    }


def node_status(cpu: str, memory: str) -> dict:
    res = {"cpu": cpu, "memory": memory, "pods": "8", "ephemeral-storage": "50Gi"}
    return {
        "status": {
            "capacity": res,
            "allocatable": res,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubetuneAgentReady",
                    "message": "local agent is running",
                    "lastHeartbeatTime": now(),
                    "lastTransitionTime": now(),
                }
            ],
            "nodeInfo": {
                "kubeletVersion": "kubetune-agent",
                "containerRuntimeVersion": "local-process",
                "architecture": "amd64",
                "operatingSystem": "linux",
                "osImage": "",
                "kernelVersion": "",
                "bootID": "",
                "machineID": "",
                "systemUUID": "",
                "kubeProxyVersion": "",
            },
        }
    }


@dataclass
class Running:
    proc: subprocess.Popen
    workdir: Path
    term_log: Path
    started: str
    stopping: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    exit: tuple[int, str, str] | None = None  # code, reason, termination message


class Agent:
    def __init__(self, node: str, root: Path, cpu: str = "2", memory: str = "8Gi", pull_seconds: float = 0.0):
        self.node, self.root, self.cpu, self.memory = node, root, cpu, memory
        self.pull_seconds = pull_seconds
        self.core = client.CoreV1Api()
        self.pods: dict[str, Running] = {}  # uid -> process
        self.pulling: set[str] = set()  # uids waiting out --pull-seconds
        self.lock = threading.Lock()
        self.stop = threading.Event()

    # --- node ----------------------------------------------------------------------------------

    def register(self) -> None:
        try:
            # the client sends a plain dict body as it is; the annotation names only its model class
            self.core.create_node(node_manifest(self.node, self.cpu, self.memory))  # type: ignore[arg-type]
        except ApiException as e:
            if e.status != 409:
                raise
        self.heartbeat()

    def heartbeat(self) -> None:
        # Both signals the node-lifecycle controller reads: the Ready condition and the node Lease.
        self.core.patch_node_status(self.node, node_status(self.cpu, self.memory))
        coord = client.CoordinationV1Api()
        renew = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease = {
            "metadata": {"name": self.node, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.node, "leaseDurationSeconds": 40, "renewTime": renew},
        }
        try:
            coord.patch_namespaced_lease(self.node, "kube-node-lease", {"spec": lease["spec"]})
        except ApiException as e:
            if e.status != 404:
                raise
            coord.create_namespaced_lease("kube-node-lease", lease)  # type: ignore[arg-type]  # a dict, as above

    def heartbeats(self) -> None:
        while not self.stop.wait(10):
            try:
                self.heartbeat()
            except Exception as e:  # noqa: BLE001 - a missed heartbeat is retried
                log.warning("heartbeat failed: %s", e)

    # --- pods ----------------------------------------------------------------------------------

    def run(self) -> None:
        self.register()
        threading.Thread(target=self.heartbeats, daemon=True).start()
        while not self.stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=f"spec.nodeName={self.node}",
                    timeout_seconds=60,
                ):
                    self.handle(ev["type"], ev["object"])
                    if self.stop.is_set():
                        break
            except ApiException as e:
                log.warning("watch failed: %s; retrying", e)
                time.sleep(1)

    def handle(self, kind: str, pod) -> None:
        uid = pod.metadata.uid
        with self.lock:
            running = self.pods.get(uid)
        if kind == "DELETED" or pod.metadata.deletion_timestamp:
            if running and not running.stopping:
                running.stopping = True
                threading.Thread(target=self.terminate, args=(pod, running), daemon=True).start()
            elif not running and kind != "DELETED":
                self.remove(pod)
            return
        if running or pod.status.phase in ("Succeeded", "Failed"):
            return
        if self.pull_seconds > 0:
            with self.lock:
                if uid in self.pulling:
                    return
                self.pulling.add(uid)
            threading.Thread(target=self.pull_then_launch, args=(pod,), daemon=True).start()
            return
        self.launch(pod)

    def pull_then_launch(self, pod) -> None:
        uid, c = pod.metadata.uid, pod.spec.containers[0]
        self.patch_status(
            pod,
            {
                "containerStatuses": [
                    {
                        "name": c.name,
                        "image": c.image,
                        "imageID": "",
                        "ready": False,
                        "started": False,
                        "restartCount": 0,
                        "state": {"waiting": {"reason": "ContainerCreating"}},
                    }
                ]
            },
        )
        time.sleep(self.pull_seconds)
        try:
            pod = self.core.read_namespaced_pod(pod.metadata.name, pod.metadata.namespace)
        except ApiException as e:
            if e.status != 404:
                log.warning("cannot read %s/%s: %s", pod.metadata.namespace, pod.metadata.name, e)
            pod = None
        try:
            if pod is not None and pod.metadata.uid == uid and not pod.metadata.deletion_timestamp:
                self.launch(pod)
            elif pod is not None and pod.metadata.uid == uid:
                self.remove(pod)
        finally:  # after launch registers the process: no event in between may start it twice
            with self.lock:
                self.pulling.discard(uid)

    def launch(self, pod) -> None:
        uid = pod.metadata.uid
        try:
            started = self.start(pod)
        except Exception as e:  # noqa: BLE001 - report a pod that cannot start, as a kubelet would
            log.exception("cannot start %s/%s", pod.metadata.namespace, pod.metadata.name)
            self.report_exit(pod, 128, "ContainerCannotRun", str(e), now())
            return
        with self.lock:
            self.pods[uid] = started
        threading.Thread(target=self.supervise, args=(pod, started), daemon=True).start()

    def start(self, pod) -> Running:
        c = pod.spec.containers[0]
        workdir = self.root / f"{pod.metadata.namespace}_{pod.metadata.name}"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        mounts = self.volumes(pod, workdir)
        env = {
            k: v
            for k, v in os.environ.items()
            if k in ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV") or k.startswith("KUBETUNE_DEBUG_")
        }
        # A value naming a path in a mount (HOME, HF_HOME, AWS_CA_BUNDLE, ...) points at the local
        # directory that backs it, as the path would resolve inside a container.
        env.update({k: remap(v, mounts) for k, v in self.env(pod, c).items()})
        env.setdefault("HOME", str(workdir / "home"))
        term_log = workdir / "termination-log"
        env["KUBETUNE_TERMINATION_LOG"] = str(term_log)
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", self.cpu)
        cmd = [remap(a, mounts) for a in (c.command or []) + (c.args or [])]
        if cmd and cmd[0] == "kubetune":
            cmd = [sys.executable, "-m", "kubetune.cli", *cmd[1:]]
        log.info("starting %s/%s: %s", pod.metadata.namespace, pod.metadata.name, " ".join(cmd))
        out = (workdir / "container.log").open("w")
        proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started = now()
        self.patch_status(
            pod,
            {
                "phase": "Running",
                "startTime": started,
                "hostIP": "127.0.0.1",
                "podIP": "127.0.0.1",
                "conditions": [
                    {"type": t, "status": "True", "lastTransitionTime": started}
                    for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
                ],
                "containerStatuses": [
                    {
                        "name": c.name,
                        "image": c.image,
                        "imageID": "",
                        "ready": True,
                        "started": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": started}},
                    }
                ],
            },
        )
        return Running(proc, workdir, term_log, started)

    def supervise(self, pod, r: Running) -> None:
        code = r.proc.wait()
        message = r.term_log.read_text()[-4096:] if r.term_log.exists() else ""
        if not message:  # terminationMessagePolicy FallbackToLogsOnError
            log_file = r.workdir / "container.log"
            message = log_file.read_text()[-2048:] if code and log_file.exists() else ""
        code = 128 - code if code < 0 else code  # killed by a signal: the shell's 128+N, as a runtime reports
        reason = "Completed" if code == 0 else ("OOMKilled" if code == 137 and not r.stopping else "Error")
        log.info("%s/%s exited %s", pod.metadata.namespace, pod.metadata.name, code)
        if r.stopping:  # terminate() reports it, once the pod's deletion is under way
            r.exit = (code, reason, message)
        else:
            self.report_exit(pod, code, reason, message, r.started)
        r.done.set()

    def report_exit(self, pod, code: int, reason: str, message: str, started: str) -> None:
        c = pod.spec.containers[0]
        self.patch_status(
            pod,
            {
                "phase": "Succeeded" if code == 0 else "Failed",
                "conditions": [
                    {"type": "Ready", "status": "False", "lastTransitionTime": now()},
                    {"type": "ContainersReady", "status": "False", "lastTransitionTime": now()},
                ],
                "containerStatuses": [
                    {
                        "name": c.name,
                        "image": c.image,
                        "imageID": "",
                        "ready": False,
                        "started": False,
                        "restartCount": 0,
                        "state": {
                            "terminated": {
                                "exitCode": code,
                                "reason": reason,
                                "message": message,
                                "startedAt": started,
                                "finishedAt": now(),
                            }
                        },
                    }
                ],
            },
        )

    def terminate(self, pod, r: Running) -> None:
        grace = pod.spec.termination_grace_period_seconds or 30
        try:
            os.killpg(r.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not r.done.wait(grace):
            try:
                os.killpg(r.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            r.done.wait(10)
        # A kubelet records the terminal status before the final delete: the Job controller reads the
        # exit code against its podFailurePolicy, the operator reads the termination message.
        if r.exit is not None:
            self.report_exit(pod, *r.exit, r.started)
        self.remove(pod)
        with self.lock:
            self.pods.pop(pod.metadata.uid, None)

    def remove(self, pod) -> None:
        try:
            self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
        except ApiException as e:
            if e.status != 404:
                log.warning("cannot remove pod %s: %s", pod.metadata.name, e)

    def patch_status(self, pod, status: dict) -> None:
        try:
            self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": status})
        except ApiException as e:
            if e.status != 404:
                log.warning("status update of %s failed: %s", pod.metadata.name, e)

    # --- what a container sees ------------------------------------------------------------------

    def volumes(self, pod, workdir: Path) -> dict[str, str]:
        """Materialize volumes; return mountPath -> local directory."""
        local: dict[str, Path] = {}
        for v in pod.spec.volumes or []:
            d = workdir / "volumes" / v.name
            d.mkdir(parents=True, exist_ok=True)
            if v.config_map:
                cm = self.core.read_namespaced_config_map(v.config_map.name, pod.metadata.namespace)
                # items pick keys and name their files (spec.storage.caBundle's key -> ca.crt), as the kubelet does
                paths = {i.key: i.path for i in v.config_map.items} if v.config_map.items else None
                for k, text in (cm.data or {}).items():
                    if paths is None or k in paths:
                        (d / (paths[k] if paths else k)).write_text(text)
            elif v.secret:
                s = self.core.read_namespaced_secret(v.secret.secret_name, pod.metadata.namespace)
                for k, b in (s.data or {}).items():
                    (d / k).write_bytes(base64.b64decode(b))
            local[v.name] = d
        mounts = {}
        for m in pod.spec.containers[0].volume_mounts or []:
            if m.name in local:
                mounts[m.mount_path] = str(local[m.name])
        return mounts

    def env(self, pod, c) -> dict[str, str]:
        out: dict[str, str] = {}
        ns = pod.metadata.namespace
        for e in c.env or []:
            if e.value is not None:
                out[e.name] = e.value
            elif e.value_from and e.value_from.secret_key_ref:
                ref = e.value_from.secret_key_ref
                data = self.core.read_namespaced_secret(ref.name, ns).data or {}
                out[e.name] = base64.b64decode(data[ref.key]).decode()
            elif e.value_from and e.value_from.config_map_key_ref:
                ref = e.value_from.config_map_key_ref
                out[e.name] = (self.core.read_namespaced_config_map(ref.name, ns).data or {})[ref.key]
            elif e.value_from and e.value_from.field_ref:
                path = e.value_from.field_ref.field_path
                if path == "metadata.name":
                    out[e.name] = pod.metadata.name
                elif path == "metadata.namespace":
                    out[e.name] = ns
                elif path.startswith("metadata.annotations["):
                    key = path[len("metadata.annotations['") : -2]
                    out[e.name] = (pod.metadata.annotations or {}).get(key, "")
        return out


def remap(value: str, mounts: dict[str, str]) -> str:
    """Rewrite a container path onto the local directory that backs its mount (longest mount first)."""
    for mount in sorted(mounts, key=len, reverse=True):
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return mounts[mount] + value[len(mount.rstrip("/")) :]
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kubetune-agent", description=__doc__.splitlines()[0])
    p.add_argument("--node", default="local-0")
    p.add_argument("--root", default=None, help="per-pod working directories (default: <ground>/agent)")
    p.add_argument("--cpu", default=str(os.cpu_count() or 2))
    p.add_argument("--memory", default="8Gi")
    p.add_argument("--kubeconfig", default=None)
    p.add_argument(
        "--pull-seconds",
        type=float,
        default=0.0,
        help="hold each pod in ContainerCreating this long before starting it, as an image pull would",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s agent: %(message)s")
    config.load_kube_config(config_file=args.kubeconfig)
    root = Path(args.root or Path(os.environ.get("KUBETUNE_DEV_DIR", Path.home() / ".cache/kubetune/dev")) / "agent")
    agent = Agent(args.node, root, args.cpu, args.memory, args.pull_seconds)

    def _stop(*_):
        agent.stop.set()
        with agent.lock:
            for r in agent.pods.values():
                try:
                    os.killpg(r.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        sys.exit(0)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
