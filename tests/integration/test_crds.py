"""The FineTuneJob CRD on a real kube-apiserver: it installs, `kubectl explain` shows its docs, valid
examples are accepted and bad objects are rejected with the CRD's own schema and CEL messages."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from kubetune.devenv.ground import wait_until as wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "kubetune.io_finetunejobs.yaml"


@pytest.fixture(scope="module")
def crd(ground):
    ground.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    ground.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s")
    # Established can come a moment before discovery serves the new kind to kubectl.
    wait_for("finetunejobs in discovery", lambda: ground.kubectl(
        "get", "finetunejobs", "-A", check=False).returncode == 0, 30)
    return yaml.safe_load(CRD_FILE.read_text())


def _schema(crd: dict) -> dict:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_crd_is_established_with_its_names(ground, crd):
    got = ground.kubectl_json("get", "crd", "finetunejobs.kubetune.io")
    assert got["spec"]["group"] == "kubetune.io"
    assert got["spec"]["names"]["kind"] == "FineTuneJob"
    assert "ftj" in got["spec"]["names"]["shortNames"]
    assert ground.kubectl("get", "ftj", "-A").returncode == 0


@pytest.mark.parametrize("field_path", ["spec", "spec.method", "spec.training.epochs", "spec.method.quantization.bits"])
def test_kubectl_explain_shows_the_crd_docs(ground, crd, field_path):
    node = _schema(crd)
    for part in field_path.split("."):
        node = node["properties"][part]
    out = wait_for(f"kubectl explain finetunejob.{field_path}", lambda: (lambda r: r.returncode == 0 and r.stdout)(
        ground.kubectl("explain", f"finetunejob.{field_path}", check=False)), 30)
    # explain re-wraps long descriptions; compare the words.
    assert " ".join(node["description"].split()) in " ".join(out.split())


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "examples").glob("*.yaml")))
def test_examples_are_accepted(ground, crd, namespace, example):
    res = ground.kubectl("create", "--dry-run=server", "-n", namespace, "-f", str(REPO / "examples" / example),
                         check=False)
    assert res.returncode == 0, res.stderr


def _base() -> dict:
    return yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())


def _set(obj: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        obj = obj.setdefault(p, {})
    if value is _DELETE:
        obj.pop(last, None)
    else:
        obj[last] = value


_DELETE = object()

# (id, changes to the quickstart example, message the apiserver must answer with)
BAD = [
    ("epochs-and-maxsteps", {"spec.training.epochs": 1},
     "set exactly one of training.epochs and training.maxSteps"),
    ("neither-epochs-nor-maxsteps", {"spec.training.maxSteps": _DELETE},
     "set exactly one of training.epochs and training.maxSteps"),
    ("lora-settings-on-full", {"spec.method.type": "full"},
     "method.lora is only valid with method.type lora or qlora"),
    ("quantization-on-lora", {"spec.method.quantization": {"bits": 4}},
     "method.quantization is only valid with method.type qlora"),
    ("qlora-bits-3", {"spec.method.type": "qlora", "spec.method.quantization": {"bits": 3},
                      "spec.resources.gpusPerNode": 1},
     'spec.method.quantization.bits: Unsupported value: 3: supported values: "4", "8"'),
    ("qlora-without-gpu", {"spec.method.type": "qlora", "spec.method.quantization": {"bits": 4}},
     "method.type qlora needs a GPU (bitsandbytes): set resources.gpusPerNode >= 1"),
    ("microbatch-not-int-or-auto", {"spec.training.microBatchSize": "big"},
     "microBatchSize must be an integer from 1 to 4096, or 'auto'"),
    ("validation-uri-and-split", {"spec.dataset.validationUri": "s3://kubetune-data/v.jsonl"},
     "set dataset.validationUri or dataset.validationSplit, not both"),
    ("model-uri-missing", {"spec.model.uri": _DELETE}, "spec.model.uri: Required value"),
    ("token-secret-on-s3-model", {"spec.model.tokenSecret": {"name": "hf"}},
     "model.tokenSecret is for hf:// models and datasets; s3:// uses spec.storage.credentialsSecret"),
    ("freeze-without-layers", {"spec.method.type": "freeze", "spec.method.lora": _DELETE},
     "method.freeze (with trainableLayers) is required for method.type freeze and invalid otherwise"),
    ("name-too-long", {"metadata.name": "x" * 51}, "metadata.name must be at most 50 characters"),
    ("unknown-field", {"spec.training.learningRat": 0.1}, 'unknown field "spec.training.learningRat"'),
    ("env-reserved", {"spec.resources.env": [{"name": "HF_TOKEN", "value": "hf_x"}]},
     "spec.resources.env[0]: Invalid value: this name is set by kubetune (KUBETUNE_*, HOME"),
    ("env-twice", {"spec.resources.env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "NCCL_DEBUG", "value": "WARN"}]},
     'spec.resources.env[1]: Duplicate value: {"name":"NCCL_DEBUG"}'),
    ("resume-from-not-s3", {"spec.checkpoints.resumeFrom": "gs://bucket/run-1/"}, "spec.checkpoints.resumeFrom: Invalid value"),
]


@pytest.mark.parametrize("changes,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_finetunejobs_are_rejected_with_their_message(ground, crd, namespace, changes, message):
    obj = copy.deepcopy(_base())
    for path, value in changes.items():
        _set(obj, path, value)
    res = ground.kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(obj), check=False)
    assert res.returncode != 0, f"accepted: {res.stdout}"
    assert message in res.stderr, res.stderr
    # A dry run proves nothing was half-created; a real create was attempted above.
    assert ground.kubectl("get", "ftj", "-n", namespace, "-o", "name").stdout.strip() == ""


def test_a_valid_finetunejob_is_stored_with_defaults(ground, crd, namespace):
    ground.kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(_base()))
    got = ground.kubectl_json("get", "ftj", "quickstart", "-n", namespace)
    assert got["spec"]["training"]["maxSteps"] == _base()["spec"]["training"]["maxSteps"]
    # Defaults declared in the schema are applied by the apiserver itself.
    assert got["spec"]["method"]["lora"]["dropout"] == 0.0
