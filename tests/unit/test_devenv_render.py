"""Files the ground writes for its processes: token file, kubeconfig, configs, shell exports."""
import base64
import json
import shlex
import subprocess

import pytest

from kubetune.devenv import render


def test_tokens_csv_has_admin_and_non_admin_lines():
    text = render.tokens_csv(render.default_tokens("a" * 8, "b" * 8))
    lines = text.splitlines()
    assert lines[0] == f'{"a" * 8},{render.ADMIN_USER},kubetune-admin-uid,"system:masters"'
    assert lines[1] == f'{"b" * 8},{render.DEV_USER},kubetune-dev-uid,"{render.DEV_GROUP}"'


@pytest.mark.parametrize("bad", ["has,comma", 'quo"te', "", "new\nline"])
def test_tokens_csv_rejects_fields_that_would_split(bad):
    with pytest.raises(ValueError):
        render.tokens_csv([render.Token(bad, "u", "uid", ("g",))])


def test_kubeconfig_has_two_contexts_and_admin_is_current():
    cfg = render.kubeconfig("https://127.0.0.1:6443", b"PEM", "admintok", "devtok")
    assert cfg["current-context"] == render.ADMIN_CONTEXT
    assert base64.b64decode(cfg["clusters"][0]["cluster"]["certificate-authority-data"]) == b"PEM"
    users = {u["name"]: u["user"]["token"] for u in cfg["users"]}
    assert users == {render.ADMIN_USER: "admintok", render.DEV_USER: "devtok"}
    ctx = {c["name"]: c["context"]["user"] for c in cfg["contexts"]}
    assert ctx == {render.ADMIN_CONTEXT: render.ADMIN_USER, render.DEV_CONTEXT: render.DEV_USER}


def test_scheduler_config_carries_the_kubeconfig_and_no_leader_election():
    cfg = render.scheduler_config("/x/kubeconfig")
    assert cfg["clientConnection"]["kubeconfig"] == "/x/kubeconfig"
    assert cfg["leaderElection"] == {"leaderElect": False}


def test_prometheus_targets_are_deduplicated():
    assert json.loads(render.prometheus_targets(["b:1", "a:2", "b:1"]))[0]["targets"] == ["a:2", "b:1"]


def test_env_exports_survive_the_shell():
    values = {"A": "plain", "B": "it's $HOME `x`"}
    script = render.env_exports(values) + 'printf "%s\\n" "$A" "$B"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["plain", "it's $HOME `x`"]
    assert shlex.split(render.env_exports({"K": "v"})) == ["export", "K=v"]
