"""The kubetune command: subcommands, clear one-line errors, and no torch in the operator's path."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.cli import main


def run(*args: str, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args], capture_output=True, text=True, input=stdin)


def test_validate_examples(repo: Path):
    r = run("validate", str(repo / "examples/lora-8b.yaml"))
    assert r.returncode == 0 and "FineTuneJob/lora-8b is valid" in r.stdout


def test_validate_reports_field_and_file(tmp_path: Path, repo: Path):
    bad = (repo / "examples/lora-8b.yaml").read_text().replace("rank: 16", "rank: -1")
    bad = bad.replace("epochs: 3", "epochs: 3\n    maxSteps: 9")
    f = tmp_path / "bad.yaml"
    f.write_text(bad)
    r = run("validate", str(f))
    assert r.returncode == 1
    assert f"{f}: spec.method.lora.rank: Input should be greater than or equal to 1" in r.stderr
    assert f"{f}: spec.training: set exactly one of training.epochs and training.maxSteps" in r.stderr
    assert "Traceback" not in r.stderr


def test_validate_checks_lora_targets_against_a_known_model(tmp_path: Path, repo: Path):
    # the operator refuses a target the model lacks (InvalidSpec): validate says so before kubectl apply
    bad = (repo / "examples/lora-8b.yaml").read_text().replace("[all-linear]", "[q_proj, v_projj]")
    f = tmp_path / "typo.yaml"
    f.write_text(bad)
    r = run("validate", str(f))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{f}: FineTuneJob/lora-8b: LoRA target 'v_projj' is not a linear module of llama" in r.stderr


def test_validate_bad_yaml_names_line(tmp_path: Path):
    f = tmp_path / "broken.yaml"
    f.write_text("apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nspec: [unclosed\n")
    r = run("validate", str(f))
    assert r.returncode == 1 and f"{f}:" in r.stderr and "not valid YAML" in r.stderr and "Traceback" not in r.stderr


def test_validate_missing_file():
    r = run("validate", "/nonexistent/job.yaml")
    assert r.returncode == 1 and "/nonexistent/job.yaml: cannot read" in r.stderr


def test_validate_wrong_api_version(tmp_path: Path, repo: Path):
    f = tmp_path / "v.yaml"
    f.write_text((repo / "examples/full-1b.yaml").read_text().replace("kubetune.io/v1alpha1", "kubetune.io/v1"))
    r = run("validate", str(f))
    assert "apiVersion: expected 'kubetune.io/v1alpha1', got 'kubetune.io/v1'" in r.stderr


def test_unknown_subcommand_is_a_usage_error():
    r = run("frobnicate")
    assert r.returncode == 2 and "invalid choice: 'frobnicate'" in r.stderr


def test_main_returns_exit_code(capsys):
    assert main(["crd"]) == 0
    assert "kind: CustomResourceDefinition" in capsys.readouterr().out


def test_operator_side_never_imports_torch():
    code = (
        "import sys, kubetune.cli, kubetune.api.crd, kubetune.api.validation, kubetune.plan\n"
        "import importlib.util\n"
        "for m in ('kubetune.estimator', 'kubetune.controller'):\n"
        "    if importlib.util.find_spec(m): __import__(m)\n"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_hub_mirror_that_is_not_a_base_url_stops_the_operator_and_the_estimate_with_one_line():
    import os

    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "HF_ENDPOINT": ""}
    r = subprocess.run([sys.executable, "-m", "kubetune.cli", "operator", "--hf-endpoint", "hf-mirror:8080"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--hf-endpoint must be an http(s) URL such as https://hf-mirror.internal, got 'hf-mirror:8080'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "kubetune.cli", "operator"], capture_output=True, text=True, timeout=60,
                       env={**env, "HF_ENDPOINT": "ftp://mirror"})
    assert r.returncode == 2 and "HF_ENDPOINT must be an http(s) URL" in r.stderr
    r = subprocess.run([sys.executable, "-m", "kubetune.cli", "estimate", "--model", "hf://acme/x"],
                       capture_output=True, text=True, timeout=60, env={**env, "HF_ENDPOINT": "mirror.internal"})
    assert r.returncode == 2 and "HF_ENDPOINT must be an http(s) URL" in r.stderr and "Traceback" not in r.stderr


def test_trainer_env_is_checked_like_a_jobs_env():
    from kubetune.controller.cli import trainer_env
    from kubetune.errors import UsageError

    assert trainer_env(["HTTPS_PROXY=http://p:3128", "NO_PROXY=a=b,c", "X="]) == (
        ("HTTPS_PROXY", "http://p:3128"), ("NO_PROXY", "a=b,c"), ("X", ""))
    for bad, msg in (("HTTPS_PROXY", "expected NAME=VALUE"), ("1X=y", "expected NAME=VALUE"),
                     ("HF_TOKEN=x", "this name is set by kubetune"),
                     ("KUBETUNE_RUN=3", "this name is set by kubetune")):
        try:
            trainer_env([bad])
        except UsageError as e:
            assert msg in str(e) and str(e).startswith("--trainer-env"), e
        else:
            raise AssertionError(f"{bad} accepted")


@pytest.mark.parametrize("value", ["0", "-5", "nan", "soon", "1e9"])
def test_an_interval_flag_must_be_a_positive_number_of_seconds(value):
    import argparse

    from kubetune.controller.cli import add_arguments, operator_config

    p = argparse.ArgumentParser(prog="kubetune operator", exit_on_error=False)
    add_arguments(p)
    for flag in ("--retry-interval", "--progress-interval"):
        with pytest.raises(argparse.ArgumentError, match=f"argument {flag}: must be a number of seconds > 0 and "
                                                         f"< 86400, got '{value}'"):
            p.parse_args([flag, value])
    cfg = operator_config(p.parse_args(["--retry-interval", "3", "--standalone"]))
    assert (cfg.retry_interval, cfg.progress_interval) == (3.0, 10.0)


@pytest.mark.parametrize("value", ["14", "3601", "20.5", "-30", "soon"])
def test_the_peering_lifetime_is_whole_seconds_kopf_can_renew_in_time(value):
    import argparse

    from kubetune.controller.cli import add_arguments, operator_config

    p = argparse.ArgumentParser(prog="kubetune operator", exit_on_error=False)
    add_arguments(p)
    with pytest.raises(argparse.ArgumentError,
                       match=f"argument --peering-lifetime: must be whole seconds from 15 to 3600, got '{value}'"):
        p.parse_args(["--peering-lifetime", value])
    assert operator_config(p.parse_args([])).peering_lifetime == 60
    assert operator_config(p.parse_args(["--peering-lifetime", "15"])).peering_lifetime == 15
