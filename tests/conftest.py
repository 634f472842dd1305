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
sys.path.insert(0, str(REPO / "tests"))  # netkit: sockets and TLS for the S3 servers of several suites

from netkit import TlsProxy  # noqa: E402


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
