"""`kubetune operator` start-up: what it hands to kopf."""
from __future__ import annotations

import argparse
import os

import pytest

from kubetune.controller import cli


def _args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


@pytest.fixture
def started(monkeypatch):
    """Run `run()` up to kopf.run, recording what kopf would see, without any I/O."""
    import kopf

    from kubetune.controller import kube

    seen: dict = {}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # no re-exec
    monkeypatch.setenv("KUBECONFIG", "/elsewhere/admin.kubeconfig")
    monkeypatch.setattr(kube, "configure", lambda path=None: seen.setdefault("client", path))
    monkeypatch.setattr(cli, "_trim_periodically", lambda: None)
    monkeypatch.setattr(kopf, "configure", lambda **_: None)
    monkeypatch.setattr(kopf, "run", lambda **kw: seen.update(kopf=kw, kopf_kubeconfig=os.environ.get("KUBECONFIG")))
    return seen


def test_kopf_logs_in_with_the_kubeconfig_flag_too(started, tmp_path):
    # kopf reads $KUBECONFIG itself; --kubeconfig must reach it, or kopf's watches, finalizer
    # patches and peering run as another identity than the operator's own API calls.
    path = str(tmp_path / "sa.kubeconfig")
    assert cli.run(_args(kubeconfig=path, metrics_port=0)) == 0
    assert started["client"] == path
    assert started["kopf_kubeconfig"] == path


def test_without_the_flag_both_use_kubeconfig_env(started):
    assert cli.run(_args(metrics_port=0)) == 0
    assert started["client"] is None
    assert started["kopf_kubeconfig"] == "/elsewhere/admin.kubeconfig"
    assert started["kopf"]["peering_name"] == "kubetune" and started["kopf"]["clusterwide"] is True
