from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "gitops"))  # gitops_health: the Argo CD / Flux health-check harness


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@dataclass
class HubMirror:
    """A Hugging Face Hub mirror (what --hf-endpoint names) serving config.json as the Hub does: 200;
    401 without a token for a gated repository; 403 for a token without access; 404 for anything
    else. ``repos[(repo, revision)] = (config, token or None)``; ``seen`` logs (path, Authorization)."""
    url: str
    repos: dict[tuple[str, str], tuple[dict, str | None]] = field(default_factory=dict)
    seen: list[tuple[str, str | None]] = field(default_factory=list)


@pytest.fixture
def hub_mirror():
    mirror = HubMirror("")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            auth = self.headers.get("Authorization")
            mirror.seen.append((self.path, auth))
            org, repo, verb, rev, fname = (self.path.strip("/").split("/") + [""] * 5)[:5]
            hit = mirror.repos.get((f"{org}/{repo}", rev)) if (verb, fname) == ("resolve", "config.json") else None
            if hit is None:
                return self._send(404, b"Entry not found")
            config, token = hit
            if token and auth is None:
                return self._send(401, b"Access to this model is restricted.")
            if token and auth != f"Bearer {token}":
                return self._send(403, b"You are not in the authorized list.")
            self._send(200, json.dumps(config).encode())

        def _send(self, code: int, body: bytes):
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    mirror.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield mirror
    srv.shutdown()
    srv.server_close()


class TlsProxy:
    """TLS in front of a plain TCP port (an S3 server), with a certificate for 127.0.0.1 signed by a
    throwaway private CA: an https endpoint that only verifies against ``ca_pem``."""

    def __init__(self, work: Path, target: int):
        import socket
        import ssl
        import subprocess

        work.mkdir(parents=True, exist_ok=True)
        run = lambda *a: subprocess.run(["openssl", *a], cwd=work, check=True, capture_output=True)  # noqa: E731
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=kubetune test CA")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1")
        (work / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
        run("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "srv.pem",
            "-days", "1", "-extfile", "ext.cnf")
        self.ca_pem = (work / "ca.pem").read_text()
        self.ca_file = work / "ca.pem"
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(work / "srv.pem"), str(work / "srv.key"))
        self.target = target
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"https://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        import socket

        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
            up = socket.create_connection(("127.0.0.1", self.target))
        except OSError:  # a client that refuses our certificate ends here
            conn.close()
            return
        for a, b in ((tls, up), (up, tls)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self):
        self.sock.close()


@pytest.fixture
def tls_proxy(tmp_path):
    """tls_proxy(port) -> a TlsProxy in front of that port (closed at teardown)."""
    made = []

    def make(target: int) -> TlsProxy:
        made.append(TlsProxy(tmp_path / f"tls-{len(made)}", target))
        return made[-1]

    yield make
    for p in made:
        p.close()
