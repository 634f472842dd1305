"""Network helpers for tests: a byte pipe between two sockets, and TLS in front of a plain port."""
from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from pathlib import Path


def pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy a to b until a closes, then shut both down (the other direction's pipe then ends too)."""
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class TlsProxy:
    """TLS in front of a plain TCP port (an S3 server), with a certificate for ``host`` (where it listens:
    127.0.0.1, or a real node's bridge gateway so pods reach it too) signed by a throwaway private CA: an
    https endpoint that only verifies against ``ca_pem``."""

    def __init__(self, work: Path, target: int, host: str = "127.0.0.1"):
        work.mkdir(parents=True, exist_ok=True)
        run = lambda *a: subprocess.run(["openssl", *a], cwd=work, check=True, capture_output=True)  # noqa: E731
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=kubetune test CA")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr", "-subj", f"/CN={host}")
        (work / "ext.cnf").write_text(f"subjectAltName=IP:{host}\n")
        run("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "srv.pem",
            "-days", "1", "-extfile", "ext.cnf")
        self.ca_pem = (work / "ca.pem").read_text()
        self.ca_file = work / "ca.pem"
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(work / "srv.pem"), str(work / "srv.key"))
        self.target = target
        self.handshakes = self.refused = 0  # TLS sessions set up; clients that gave up on the handshake
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.url = f"https://{host}:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except OSError:  # a client that refuses our certificate ends here
            self.refused += 1
            conn.close()
            return
        self.handshakes += 1
        try:
            up = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            tls.close()
            return
        for a, b in ((tls, up), (up, tls)):
            threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    def close(self):
        self.sock.close()


class HttpStandIn:
    """A local HTTP listener on ``host`` (a loopback address) answering every request, whatever its
    verb, with ``respond(path, headers) -> (status, body)``: the stand-in for a remote service (the Hub,
    S3, a hostile endpoint) in tests that must not leave the machine."""

    def __init__(self, respond, host: str = "127.0.0.1"):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                code, body = respond(self.path, self.headers)
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET  # noqa: N815

            def log_message(self, *_):
                pass

        self._srv = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self._srv.server_address[1]}"
        threading.Thread(target=self._srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()
