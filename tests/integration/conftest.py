"""Session fixtures for the integration tests: the real test ground (kubetune dev up).

A ground that is already up in $KUBETUNE_DEV_DIR (or ~/.cache/kubetune/dev) is reused and left running;
otherwise one is started (building the binaries first if they are missing: no skipping) and stopped at the
end of the session. `pytest -m "not integration"` never requests these fixtures, so it never starts anything.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubetune.devenv import ground as g
from kubetune.devenv import render

sys.path.insert(0, str(Path(__file__).parent))  # opkit: helpers shared by the operator test modules
REPO = Path(__file__).resolve().parents[2]
INTEGRATION = Path(__file__).resolve().parent


@dataclass
class Ground:
    lay: g.Layout
    started_here: bool

    @property
    def state(self) -> dict:
        return g.load_state(self.lay)

    def kubectl(self, *args: str, user: bool = False, stdin: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
        """kubectl as the admin, or as the non-admin user with user=True."""
        ctx = ["--context", render.DEV_CONTEXT] if user else []
        return g.kubectl(self.state, self.lay, *ctx, *args, stdin=stdin, check=check, timeout=timeout)

    def kubectl_json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def apply(self, obj: dict, namespace: str | None = None) -> None:
        ns = ["-n", namespace] if namespace else []
        self.kubectl("apply", *ns, "-f", "-", stdin=json.dumps(obj))

    def s3(self):
        return g.s3_client(self.state)

    def bin(self, component: str, name: str) -> str:
        return str(Path(self.state["bin"][component]) / name)


wait_for = g.wait_until


# Modules whose fixtures need the images inside the real nodes' containerd: they run last, so the
# ground fixture's background export and import (opkit.start_image_prep) overlaps the other modules.
REAL_NODE_MODULES = ("test_chart_operator.py", "test_real_node.py", "test_real_resilience.py",
                     "test_real_trainer.py", "test_trainer_pods.py")


def _needs_real_node_images(item) -> bool:
    return item.path.parent == INTEGRATION and item.path.name in REAL_NODE_MODULES


def pytest_collection_modifyitems(items):
    items.sort(key=_needs_real_node_images)


@pytest.fixture(scope="session")
def ground(request) -> Iterator[Ground]:
    lay = g.layout()
    started = False
    if not g.is_up(lay):
        g.down(lay)   # stop any survivors of a half-dead earlier ground, by their recorded pids
        # Two real kubelet nodes beside the KWOK fleet, so CI covers real pods (test_real_node.py) and a
        # run across nodes (test_real_resilience.py).
        g.up(lay, real_nodes=2)
        started = True
    saved = dict(os.environ)
    # Code under test (boto3, the kubernetes client, kubectl/helm subprocesses) finds the ground like a
    # user who ran `eval "$(kubetune dev env)"`.
    os.environ.update(g.env_values(lay))
    os.environ["PATH"] = os.pathsep.join([*g.path_dirs(lay), os.environ.get("PATH", "")])
    gr = Ground(lay, started)
    from opkit import start_image_prep, wait_image_prep

    if any(_needs_real_node_images(it) for it in request.session.items):  # not for, say, test_s3.py alone
        start_image_prep(gr)
    try:
        yield gr
    finally:
        wait_image_prep()  # no import may still run into a node that down stops
        os.environ.clear()
        os.environ.update(saved)
        if started:
            stuck = g.down(lay)
            assert not stuck, f"processes still running after down: {stuck}"


@pytest.fixture
def namespace(ground: Ground) -> Iterator[str]:
    """A fresh namespace whose default service account exists (pods are refused until it does)."""
    name = f"it-{uuid.uuid4().hex[:8]}"
    ground.kubectl("create", "namespace", name)
    wait_for(f"serviceaccount {name}/default",
             lambda: ground.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0, 30)
    yield name
    ground.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def crds(ground):
    ground.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    ground.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s")
    wait_for("finetunejobs served", lambda: ground.kubectl("get", "ftj", "-A", check=False).returncode == 0, 30)


@pytest.fixture(scope="module")
def operator(ground, crds, tmp_path_factory):
    """The operator as its own process, for one test module."""
    from opkit import Operator

    op = Operator(tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    # The tests' namespaces are deleted without waiting: let the operator finalize their
    # FineTuneJobs first, or they stay Terminating on a ground that is reused.
    wait_for("deleted FineTuneJobs finalized", lambda: not any(
        o["metadata"].get("deletionTimestamp") for o in ground.kubectl_json("get", "ftj", "-A")["items"]), 60)
    op.stop()
    print(op.log.read_text()[-5000:])


@pytest.fixture
def ns(ground, namespace):
    """A namespace with the Secrets the examples reference: S3 credentials and a Hub token (the
    meta-llama models are gated; these are catalog models, so nothing reads the Hub here)."""
    st = ground.state["s3"]
    ground.kubectl("create", "secret", "generic", "kubetune-s3", "-n", namespace,
                   f"--from-literal=AWS_ACCESS_KEY_ID={st['access_key']}",
                   f"--from-literal=AWS_SECRET_ACCESS_KEY={st['secret_key']}")
    ground.kubectl("create", "secret", "generic", "hf-token", "-n", namespace, "--from-literal=HF_TOKEN=hf_test")
    return namespace




@pytest.fixture(scope="module")
def real_node(ground) -> dict:
    """The ground's first real node, with the trainer image (opkit.prepare_real_nodes)."""
    from opkit import prepare_real_nodes

    return prepare_real_nodes(ground)[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed operator test shows the operator's log: the process outlives the test, so its
    output is otherwise lost (the module fixture prints it only at teardown)."""
    outcome = yield
    rep = outcome.get_result()
    op = item.funcargs.get("operator") if rep.failed and rep.when == "call" else None
    log = getattr(op, "log", None)
    if log is not None and log.exists():
        rep.sections.append(("operator log (last 12 kB)", log.read_text(errors="replace")[-12000:]))
