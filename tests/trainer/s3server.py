"""An S3 server process for the trainer's tests, that can be stopped and started again.

Preferred: s3s-fs, the test ground's S3 server (`kubetune dev up` builds it into the build cache); its
objects live in a directory, so they survive a restart: a real outage. Fallback when it is not built:
moto's standalone server behind a TCP proxy that is closed for the outage (moto itself keeps running,
since its storage is in memory).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from netkit import pipe  # noqa: E402 - tests/ is on sys.path (tests/conftest.py)

ACCESS, SECRET, REGION = "kubetune-test", "kubetune-test-secret-key", "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30, up: bool = True) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} not {'up' if up else 'down'} after {timeout}s")


def s3s_fs_binary() -> Path | None:
    try:
        from kubetune.devenv import paths
    except ImportError:
        return None
    p = paths.bin_cache("s3s-fs", paths.S3S_FS_VERSION) / "s3s-fs"
    return p if p.is_file() and os.access(p, os.X_OK) else None


def moto_command(port: int) -> list[str] | None:
    try:
        import moto.server  # noqa: F401

        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    except ImportError:
        pass
    exe = shutil.which("moto_server")
    return [exe, "-H", "127.0.0.1", "-p", str(port)] if exe else None


class _Proxy:
    """A TCP forwarder on `port` to `target`; close() drops the listener and every connection."""

    def __init__(self, port: int, target: int):
        self.port, self.target = port, target
        self.sock: socket.socket | None = None
        self.conns: list[socket.socket] = []

    def open(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(64)
        threading.Thread(target=self._accept, args=(self.sock,), daemon=True).start()

    def _accept(self, lsock):
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    def close(self):
        if self.sock:
            self.sock.close()
            self.sock = None
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
        self.conns = []


class S3Server:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.binary = s3s_fs_binary()
        self.kind = "s3s-fs" if self.binary else "moto+proxy"
        self.proc: subprocess.Popen | None = None
        self.proxy: _Proxy | None = None
        self.log = open(root / "s3-server.log", "ab")
        if self.binary is None:
            self._moto_port = free_port()
            cmd = moto_command(self._moto_port)
            if cmd is None:
                raise RuntimeError("no S3 server: build s3s-fs (kubetune dev up) or install moto[server]")
            self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
            wait_port(self._moto_port)
            self.proxy = _Proxy(self.port, self._moto_port)

    def start(self) -> None:
        if self.binary is not None:
            data = self.root / "data"
            data.mkdir(exist_ok=True)
            self.proc = subprocess.Popen([str(self.binary), "--host", "127.0.0.1", "--port", str(self.port),
                                          "--access-key", ACCESS, "--secret-key", SECRET, str(data)],
                                         stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        else:
            self.proxy.open()
        wait_port(self.port)

    def stop(self) -> None:
        """An outage: the endpoint refuses connections until start()."""
        if self.binary is not None:
            self.proc.terminate()
            self.proc.wait(10)
        else:
            self.proxy.close()
        wait_port(self.port, up=False)

    def close(self) -> None:
        if self.proxy:
            self.proxy.close()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": REGION}

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS, aws_secret_access_key=SECRET,
                            region_name=REGION, config=Config(s3={"addressing_style": "path"}))
