from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "gitops"))  # gitops_health: the Argo CD / Flux health-check harness
sys.path.insert(0, str(REPO / "tests"))  # netkit: sockets and TLS for the S3 servers of several suites

from netkit import HttpStandIn, TlsProxy  # noqa: E402

INTEGRATION = REPO / "tests" / "integration"
# Under pytest-xdist (make test runs `-n N`) a worker that runs CPU-bound tests (training
# on CPU, the unit tests) does so at this niceness, and the integration tests' worker at 0: they mostly wait
# on the test ground, which they start (the apiserver and the host-process operators
# inherit the worker's niceness), and their waits must not starve behind training. Mild on purpose: at 5
# a CPU-bound integration process gets ~3/4 of a contended core, and the niced trainer tests' own waits
# (c10d rendezvous, 300 s process waits) still get theirs.
# KUBETUNE_TEST_BUSY_NICENESS=0 turns it off (to time the tiers against other load on the machine).
BUSY_NICENESS = int(os.environ.get("KUBETUNE_TEST_BUSY_NICENESS", "5"))


def _xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config):
    if _xdist_worker(config):
        # N workers on few cores: one thread per process (torch defaults to one per core, and idle
        # OpenMP threads spin). Set before anything imports torch; subprocesses inherit it.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")


# Tests that must not run beside each other, each prefix one xdist unit (run in turn by one worker):
# the integration tests (see pytest_xdist_make_scheduler). The trainer's single-node multi-process runs
# may: each one's rendezvous store listens on its own KUBETUNE_MASTER_PORT (static rendezvous, see
# kubetune_trainer.cli.launch_command), no longer all on torchrun's c10d default 29400.
ONE_WORKER = ("tests/integration/",)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: unknown without it
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist the integration tests go to one worker, in one unit: they share one session's
    test ground (the first one's `ground` fixture starts it, the session's end stops it) and module-scoped
    operators. Each prefix of ONE_WORKER is likewise one unit; every other test is a unit of its own,
    spread over the workers as they free up; the biggest units are handed out first. (xdist's own
    --dist loadgroup marks cannot do this under pytest 9: it renames items through an attribute pytest
    no longer reads.)"""
    if config.getoption("dist") == "each":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroundScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            for unit in ONE_WORKER:
                if nodeid.startswith(unit):
                    return unit
            return nodeid

    return GroundScheduling(config, log)


def _set_niceness(n: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, 0, n)
    except OSError:  # lowering it again needs root (CAP_SYS_NICE): then it stays where it is
        pass


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _xdist_worker(item.config):
        _set_niceness(0 if INTEGRATION in item.path.parents else BUSY_NICENESS)


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

    def respond(path: str, headers) -> tuple[int, bytes]:
        auth = headers.get("Authorization")
        mirror.seen.append((path, auth))
        org, repo, verb, rev, fname = (path.strip("/").split("/") + [""] * 5)[:5]
        hit = mirror.repos.get((f"{org}/{repo}", rev)) if (verb, fname) == ("resolve", "config.json") else None
        if hit is None:
            return 404, b"Entry not found"
        config, token = hit
        if token and auth is None:
            return 401, b"Access to this model is restricted."
        if token and auth != f"Bearer {token}":
            return 403, b"You are not in the authorized list."
        return 200, json.dumps(config).encode()

    srv = HttpStandIn(respond)
    mirror.url = srv.url
    yield mirror
    srv.close()


@pytest.fixture
def tls_proxy(tmp_path):
    """tls_proxy(port, host="127.0.0.1") -> a TlsProxy on host in front of that port (closed at teardown)."""
    made = []

    def make(target: int, host: str = "127.0.0.1") -> TlsProxy:
        made.append(TlsProxy(tmp_path / f"tls-{len(made)}", target, host))
        return made[-1]

    yield make
    for p in made:
        p.close()
