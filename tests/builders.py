"""Builders for the FineTuneJobs unit tests plan and price: one valid base, changed by keyword, instead of
``deepcopy(SPEC)`` followed by mutation (kubeflow's ``MakeTrainJobWrapper(...).Obj()`` is the model). Beside
netkit.py: tests/conftest.py puts tests/ on sys.path.

    spec(method={"type": "full"}, resources={"gpusPerNode": 8})  # a section merges into the base's
    spec(training__optimizer="adamw-8bit", output=None)          # one field by its path; None deletes
    spec(base=BIG, checkpoints={"keep": 1})                      # a module's own base (a spec_dict)
    job("pref", objective={"type": "dpo"})                        # the whole FineTuneJob object
    patched(GOOD, spec__method__type="full", spec__output=...)   # any object: set by path, ... deletes
    with_paths(obj, {"spec.model.uri": ...}, sep=".")             # the same, paths from a table
    parse_errors(obj)                                             # the message parse_job refuses obj with
"""
from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import yaml

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.api.validation import parse_spec

BASE_SPEC: dict[str, Any] = {
    "model": {"uri": "hf://meta-llama/Llama-3.1-8B"},
    "dataset": {"uri": "s3://data/train.jsonl", "maxSeqLength": 2048},
    "method": {"type": "lora"},
    "training": {"maxSteps": 10, "microBatchSize": 4},
    "checkpoints": {"uri": "s3://ckpt/"},
}


# The operator's tests (test_reconcile, test_operator_state): a small real model the catalog knows, with
# the S3 Secret the operator looks up.
OPERATOR_SPEC: dict[str, Any] = {
    "model": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
    "dataset": {"uri": "s3://data/train.jsonl", "maxSeqLength": 1024},
    "method": {"type": "lora"},
    "training": {"maxSteps": 100, "microBatchSize": 4},
    "storage": {"credentialsSecret": {"name": "s3"}},
    "checkpoints": {"uri": "s3://ckpt/runs/"},
}


def ready_nodes() -> list[dict]:
    """The dev ground's fake GPU fleet (kubetune.devenv.fleet) as Node objects, every one Ready."""
    from kubetune.devenv.fleet import manifests

    out = []
    for n in manifests():
        n = copy.deepcopy(n)
        n["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        out.append(n)
    return out


def _parent(d: dict, path: str, sep: str = "__") -> tuple[dict, str]:
    """The dict that holds ``a__b__c`` (made on the way as needed) and the key in it."""
    *parents, leaf = path.split(sep)
    node = d
    for p in parents:
        node = node.setdefault(p, {})
    return node, leaf


def spec_dict(base: dict | None = None, **changes: Any) -> dict:
    """``base`` (BASE_SPEC) with ``changes``: a dict merges into the section of its name, another value
    replaces it; ``a__b=value`` sets one field by its path; None deletes."""
    d = copy.deepcopy(BASE_SPEC if base is None else base)
    for key, value in changes.items():
        node, leaf = _parent(d, key)
        if value is None:
            node.pop(leaf, None)
        elif isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = {**node[leaf], **copy.deepcopy(value)}
        else:
            node[leaf] = copy.deepcopy(value)
    return d


def spec(base: dict | None = None, **changes: Any) -> FineTuneJobSpec:
    """The spec, validated as the operator receives it (a ValueError names the field)."""
    return parse_spec(spec_dict(base, **changes))


def job(name: str = "demo", base: dict | None = None, **changes: Any) -> dict:
    """A FineTuneJob object around ``spec_dict(base, **changes)``."""
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": spec_dict(base, **changes)}


def patched(base: dict, **patch: Any) -> dict:
    """A deep copy of ``base`` with ``a__b=value`` set by path; a value of ... deletes the key. Unlike
    spec_dict, a dict replaces what was there and None is kept (a null the API has to refuse)."""
    return with_paths(base, patch)


def with_paths(base: dict, changes: dict[str, Any], sep: str = "__") -> dict:
    """``patched`` with the paths in a dict, split at ``sep`` (``{"spec.resources.cpu": 0}`` with ".")."""
    obj = copy.deepcopy(base)
    for path, value in changes.items():
        node, leaf = _parent(obj, path, sep)
        if value is ...:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return obj


def parse_errors(obj: dict) -> str:
    """The message parse_job refuses the FineTuneJob ``obj`` with (the test fails if it parses)."""
    import pytest

    from kubetune.api.validation import parse_job

    with pytest.raises(ValueError) as e:
        parse_job(obj)
    return str(e.value)


def job_yaml(name: str = "demo", base: dict | None = None, **changes: Any) -> str:
    return yaml.safe_dump(job(name, base, **changes))


def modules_loaded_by(code: str, *prefixes: str) -> list[str]:
    """The modules under ``prefixes`` that running ``code`` in a fresh interpreter loads."""
    probe = f"import sys\n{code}\nprint('\\n'.join(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return out.split()


def run_estimate(capsys, *argv: str) -> tuple[int, str, str]:
    """`kubetune estimate ARGV`: (exit code, stdout, stderr)."""
    from kubetune.cli import main

    rc = main(["estimate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err
