"""The checked-in CRD is exactly what the models generate, it is a structural schema, and every
example validates against both the models and the CRD's own OpenAPI schema."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from kubetune.api.base import PATTERN_HELP, py_regex
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
        "metadata.name of a multi-node job (resources.nodes > 1) must be lowercase letters, digits and '-'",
        "resources.memory must be a Kubernetes quantity greater than 0 and at most 64Ti",
        "resources.podAnnotations keys must be qualified names",
        "resources.nodeSelector keys must be label keys",
        "a toleration's tolerationSeconds is only valid with effect NoExecute",
        "model.architecture.numExpertsPerTok must be at most numLocalExperts",
        "without user:password@ (credentials go in storage.credentialsSecret)",
    ]:
        assert message in text or any(message in r["message"] for r in _rules(crd())), message


def test_printer_columns():
    cols = {c["name"]: c["jsonPath"] for c in crd()["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert list(cols) == ["Phase", "Method", "Model", "Progress", "State", "GPU Mem", "Node", "Test", "Age"]
    wide = [c["name"] for c in crd()["spec"]["versions"][0]["additionalPrinterColumns"] if c.get("priority")]
    assert wide == ["State", "Test"] and cols["State"] == ".status.progress.state"  # -o wide only
    assert cols["Test"] == ".status.result.evaluation.headline"  # the evaluation's base-vs-tuned change
    assert cols["GPU Mem"] == ".status.estimate.perGpu"
    v = crd()["spec"]["versions"][0]
    assert v["subresources"] == {"status": {}}
    assert crd()["spec"]["names"]["shortNames"] == ["ftj"]


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_all_required_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.yaml", "lora-8b.yaml", "qlora-8b.yaml", "full-1b.yaml", "multi-gpu-70b.yaml",
            "too-big.yaml", "dpo-8b.yaml"} <= names


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
        (("training", "maxSteps"), 2**63, "greater than the maximum"),
        (("resources", "nodeSelector"), {"pool": "x" * 64}, "is too long"),
        (("resources", "memory"), "9" * 65, "is too long"),
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


def _rules(node):
    """Every x-kubernetes-validations entry in the schema, wherever it sits."""
    if isinstance(node, dict):
        yield from node.get("x-kubernetes-validations", [])
        for v in node.values():
            yield from _rules(v)
    elif isinstance(node, list):
        for v in node:
            yield from _rules(v)


def _regexes(rule: str) -> list[str]:
    return re.findall(r"matches\(r'([^']*)'\)", rule)


def test_no_schema_pattern_the_apiserver_would_answer_with_a_regex():
    # A failed `pattern` makes the apiserver print the whole regex (300 characters for a URI); a
    # CEL rule prints its message. Every pattern of the models becomes such a rule.
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert not [p for p, node in _walk(schema) if "pattern" in node]
    assert "pattern:" not in render()


def test_every_message_is_plain_words():
    rules = list(_rules(crd()))
    assert len(rules) > 40
    for r in rules:
        m = r["message"]
        assert not re.search(r"\\[sdwpx]|\[\^|\(\?|\^\(|\]\*|\$$", m), f"a regex in the message: {m}"
        assert len(m) <= 400, m  # a sentence or two, not a dump
        assert not m.lower().startswith("or "), m


def test_a_pattern_rule_says_what_kubetune_validate_says():
    matched = 0
    for r in _rules(crd()):
        if r["rule"].startswith("self.matches(r'") and r["rule"].endswith("')"):
            (pattern,) = _regexes(r["rule"])
            assert r["message"] == f"expected {PATTERN_HELP[pattern]}"
            matched += 1
    assert matched >= 15


def test_cel_regexes_read_the_same_in_go_and_rust():
    # Go's RE2 (the apiserver) and Rust's regex (pydantic) disagree on \s, \w, \d, \b (ASCII vs
    # Unicode) and on Unicode tables (\p{..}); our regexes use explicit classes only.
    found = [p for r in _rules(crd()) for p in _regexes(r["rule"])]
    assert len(found) >= 20
    for p in found:
        assert not re.search(r"\\[sSwWdDbBpP]", p), p
        assert "(?" not in p, p  # no flags or look-arounds (RE2 has no look-arounds)
        py_regex(p)  # and Python's re reads it too


def test_strings_with_a_rule_have_a_max_length():
    # CEL's cost estimate is bounded by maxLength; without it the apiserver assumes megabytes.
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        if any("matches(" in r["rule"] and r["rule"].startswith(("self.matches", "string(self)", "self == ''"))
               for r in node.get("x-kubernetes-validations", [])):
            assert "maxLength" in node, path
