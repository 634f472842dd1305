"""High availability: replicas of the operator share a kopf peering object and only the one with the
highest priority acts. Its own module, so no other operator (the standalone one of test_operator.py)
is running meanwhile."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kubetune.devenv.ground import wait_until as wait_for

from opkit import Operator, apply, small_gpu_job, wait_phase

pytestmark = pytest.mark.integration


def test_two_replicas_never_both_act(ground, crds, ns, tmp_path):
    """kopf peering: of two operators sharing the peering object, only the higher priority acts."""
    # a namespaced operator (--namespace) peers through a KopfPeering in that namespace
    ground.kubectl("apply", "-f", "-", stdin=json.dumps(
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "kubetune", "namespace": ns}}))
    low, high = Operator(tmp_path / "low.log"), Operator(tmp_path / "high.log")

    def start(op: Operator, priority: int) -> None:
        op.proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune.cli", "operator", "--peering", "kubetune", "--priority", str(priority),
             "--namespace", ns, "--metrics-port", str(op.port), "--metrics-address", "127.0.0.1", "--liveness", "",
             "--allow-endpoint", "127.0.0.1"],
            stdout=op.log.open("a"), stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True)

    start(high, 200)
    wait_for("high priority operator up", lambda: high.metrics() is not None, 30)
    start(low, 100)
    try:
        wait_for("low priority operator up", lambda: low.metrics() is not None, 30)
        apply(ground, ns, small_gpu_job("peered", delay="60s"))
        wait_phase(ground, ns, "peered", "Running", 60)
        assert "peered: Placed" in high.log.read_text()
        assert "peered" not in low.log.read_text(), "the paused replica acted"
        # the leader leaves (a clean exit withdraws its peering record): the other takes over
        high.stop()
        wait_for("low priority operator resumes", lambda: "Resuming operations" in low.log.read_text(), 60)
        apply(ground, ns, small_gpu_job("after-failover"))
        wait_phase(ground, ns, "after-failover", "Succeeded", 60)
        assert "after-failover: Placed" in low.log.read_text()
    finally:
        for op in (low, high):
            op.stop()
