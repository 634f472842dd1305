"""The checked-in CRD is exactly what the models generate, it is a structural schema, and every
example validates against both the models and the CRD's own OpenAPI schema."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from kubetune.api.crd import crd, render
from kubetune.api.validation import load_jobs, parse_job

CRD_FILE = "crds/kubetune.io_finetunejobs.yaml"


def test_checked_in_crd_matches_generated(repo: Path):
    on_disk = (repo / CRD_FILE).read_text()
    assert on_disk == render(), f"{CRD_FILE} is stale: run `kubetune crd -o {CRD_FILE}` (or `make crd`)"


def test_kubetune_crd_command_prints_it(repo: Path):
    out = subprocess.run([sys.executable, "-m", "kubetune.cli", "crd"], capture_output=True, text=True, check=True)
    assert yaml.safe_load(out.stdout) == yaml.safe_load((repo / CRD_FILE).read_text())


def test_crd_round_trips_through_yaml():
    assert yaml.safe_load(render()) == crd()


def _walk(node, path="$"):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.get("properties", {}).items():
            yield from _walk(v, f"{path}.{k}")
        if isinstance(node.get("items"), dict):
            yield from _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural():
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "$defs" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{path}: anyOf only for int-or-string"
        if path not in ("$", "$.metadata") and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description (kubectl explain would be empty)"


def test_metadata_schema_is_type_only():
    # kube-apiserver rejects the CRD if metadata's schema says anything else, even a description
    assert crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["metadata"] == {"type": "object"}


def test_cel_rules_are_emitted():
    text = render()
    for message in [
        "set exactly one of training.epochs and training.maxSteps",
        "method.lora is only valid with method.type lora or qlora",
        "method.quantization is only valid with method.type qlora",
        "microBatchSize must be an integer from 1 to 4096, or 'auto'",
        "metadata.name must be at most 50 characters",
    ]:
        assert message in text


def test_printer_columns():
    cols = {c["name"]: c["jsonPath"] for c in crd()["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert list(cols) == ["Phase", "Method", "Model", "Progress", "State", "GPU Mem", "Node", "Age"]
    wide = [c["name"] for c in crd()["spec"]["versions"][0]["additionalPrinterColumns"] if c.get("priority")]
    assert wide == ["State"] and cols["State"] == ".status.progress.state"  # -o wide only
    assert cols["GPU Mem"] == ".status.estimate.perGpu"
    v = crd()["spec"]["versions"][0]
    assert v["subresources"] == {"status": {}}
    assert crd()["spec"]["names"]["shortNames"] == ["ftj"]


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_all_required_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.yaml", "lora-8b.yaml", "qlora-8b.yaml", "full-1b.yaml", "multi-gpu-70b.yaml",
            "too-big.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_against_models_and_crd_schema(path: Path):
    jobs = load_jobs(path)
    assert jobs and all(j.metadata.name for j in jobs)
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "FineTuneJob":
            jsonschema.Draft4Validator(schema).validate(doc["spec"])


@pytest.mark.parametrize(
    "where, value, match",
    [
        (("method", "type"), "dpo", "'dpo' is not one of"),
        (("checkpoints", "uri"), "gs://bucket/x", "does not match"),
        (("resources", "memory"), "lots", "does not match"),
        (("training", "learningRate"), 0, "less than or equal to the minimum"),
        (("method", "lora", "rank"), 0, "less than the minimum"),
    ],
)
def test_crd_schema_rejects_what_models_reject(where, value, match):
    # The offline twin of tests/integration/test_crds.py: the apiserver applies these same keywords.
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    doc = yaml.safe_load((EXAMPLES[0].parent / "quickstart.yaml").read_text())
    bad = doc["spec"]
    node = bad
    for key in where[:-1]:
        node = node.setdefault(key, {})
    node[where[-1]] = value
    with pytest.raises(jsonschema.ValidationError, match=match):
        jsonschema.Draft4Validator(schema).validate(bad)
    with pytest.raises(ValueError, match=".".join(("spec",) + where[:-1])):
        parse_job(doc)
