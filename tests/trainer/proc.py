"""Run `kubetune train` as a real process and read its JSON event lines."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


class TrainerProc:
    def __init__(self, config: dict, path: Path, env: dict | None = None):
        path.write_text(yaml.safe_dump(config))
        self.events: list[dict] = []
        self.stderr = ""
        e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        e.setdefault("KUBETUNE_TERMINATION_LOG", str(path.with_suffix(".termination")))
        self.termination = Path(e["KUBETUNE_TERMINATION_LOG"])
        self.p = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "train", "--config", str(path)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=REPO,
                                  start_new_session=True)  # its own group, like a pod's processes
        self._cv = threading.Condition()
        self._drained = False
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            line = line.strip()
            if line.startswith("{"):
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                with self._cv:
                    self.events.append(ev)
                    self._cv.notify_all()
        with self._cv:
            self._drained = True
            self._cv.notify_all()

    def _read_err(self):
        self.stderr = self.p.stderr.read()

    def wait_for(self, pred, timeout: float) -> dict:
        end = time.time() + timeout
        with self._cv:
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                left = end - time.time()
                if left <= 0 or self.p.poll() is not None and self._drained:
                    raise TimeoutError(f"event not seen; last events: {self.events[-5:]}; stderr: {self.stderr[-2000:]}")
                self._cv.wait(min(left, 0.5))

    def kill9(self) -> None:
        """What a node loss does: every process of the pod dies at once, launcher and workers (torchrun
        starts its workers in their own sessions, so the process tree, not the group)."""
        import psutil

        root = psutil.Process(self.p.pid)
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        self.p.wait()

    def sigterm(self) -> None:
        """What the kubelet does on preemption or eviction: SIGTERM to the container's main process."""
        os.kill(self.p.pid, signal.SIGTERM)

    def events_of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == kind]

    def wait(self, timeout: float) -> int:
        rc = self.p.wait(timeout)
        time.sleep(0.2)  # let the reader threads drain
        return rc

    def losses(self) -> dict[int, float]:
        return {e["step"]: e["loss"] for e in self.events if e.get("event") == "step"}

    def messages(self) -> list[str]:
        return [e.get("message", "") for e in self.events if e.get("event") == "log"]
