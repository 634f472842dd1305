"""The operator's identity: kopf's own requests go out as the operator's client does."""
from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from kubetune.controller import handlers
from kubetune.controller.kube import Kube


def _kubeconfig(path: Path, server: str, token: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": server,
                                               "certificate-authority-data": base64.b64encode(b"ca").decode()}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))
    return path


@pytest.fixture
def no_client(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod: kubeconfig


def test_kopf_logs_in_with_the_kubeconfig_flag_not_kubeconfig_env(no_client, tmp_path, monkeypatch):
    # kopf's default login reads $KUBECONFIG (as seen at import) and would run its watches,
    # finalizer patches and peering as that identity while our own calls use --kubeconfig
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "admin", "https://admin.example:6443", "admin-t")))
    kube = Kube.connect(str(_kubeconfig(tmp_path / "sa", "https://sa.example:6443", "sa-token")))
    info = handlers._login(memo=handlers.new_state(kube))
    assert (info.server, info.scheme, info.token) == ("https://sa.example:6443", "Bearer", "sa-token")
    assert info.ca_path and Path(info.ca_path).read_bytes() == b"ca" and not info.insecure

