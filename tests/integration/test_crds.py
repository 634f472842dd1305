"""The FineTuneJob CRD on a real kube-apiserver: it installs, `kubectl explain` shows its docs, valid
examples are accepted and bad objects are rejected with the CRD's own schema and CEL messages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetune.api.validation import parse_job
from kubetune.devenv.ground import wait_until as wait_for

from builders import parse_errors, with_paths

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


def _quickstart(changes: dict) -> dict:
    """The quickstart example with ``changes`` by dotted path (a value of ... deletes the key)."""
    return with_paths(_base(), changes, sep=".")


def _refused_by_both(ground, namespace: str, obj: dict, words: str) -> tuple[str, str]:
    """The apiserver refuses ``obj`` and so do the models, both in ``words``: (its stderr, their message)."""
    res = ground.kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(obj), check=False)
    assert res.returncode != 0, f"the apiserver accepted it: {res.stdout}"
    assert words in _words(res.stderr), res.stderr
    message = parse_errors(obj)
    assert words in _words(message), message
    return res.stderr, message


def _accepted_by_both(ground, namespace: str, obj: dict) -> None:
    parse_job(obj)
    res = ground.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", stdin=json.dumps(obj), check=False)
    assert res.returncode == 0, res.stderr

# (id, changes to the quickstart example, message the apiserver must answer with)
BAD = [
    ("epochs-and-maxsteps", {"spec.training.epochs": 1},
     "set exactly one of training.epochs and training.maxSteps"),
    ("neither-epochs-nor-maxsteps", {"spec.training.maxSteps": ...},
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
    ("model-uri-missing", {"spec.model.uri": ...}, "spec.model.uri: Required value"),
    ("token-secret-on-s3-model", {"spec.model.tokenSecret": {"name": "hf"}},
     "model.tokenSecret is for hf:// models and datasets; s3:// uses spec.storage.credentialsSecret"),
    ("freeze-without-layers", {"spec.method.type": "freeze", "spec.method.lora": ...},
     "method.freeze (with trainableLayers) is required for method.type freeze and invalid otherwise"),
    ("name-too-long", {"metadata.name": "x" * 51}, "metadata.name must be at most 50 characters"),
    ("unknown-field", {"spec.training.learningRat": 0.1}, 'unknown field "spec.training.learningRat"'),
    ("env-reserved", {"spec.resources.env": [{"name": "HF_TOKEN", "value": "hf_x"}]},
     "spec.resources.env[0]: Invalid value: this name is set by kubetune (KUBETUNE_*, HOME"),
    ("env-twice",
     {"spec.resources.env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "NCCL_DEBUG", "value": "WARN"}]},
     'spec.resources.env[1]: Duplicate value: {"name":"NCCL_DEBUG"}'),
    ("resume-from-not-s3", {"spec.checkpoints.resumeFrom": "gs://bucket/run-1/"},
     "spec.checkpoints.resumeFrom: Invalid value"),
]


@pytest.mark.parametrize("changes,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_finetunejobs_are_rejected_with_their_message(ground, crd, namespace, changes, message):
    obj = _quickstart(changes)
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



# Hostile and careless input (issue #19). Each case is refused by the real apiserver AND by the
# models (the operator, `kubetune validate`), and both answers carry the same rule words.
QTY = "must be a Kubernetes quantity greater than 0 and at most"
QUALIFIED = ("[prefix/]name, the name at most 63 letters, digits, '-', '_' or '.' that starts and ends with a "
             "letter or digit")
LABEL = ("expected a Kubernetes label value: at most 63 letters, digits, '-', '_' or '.', starting and ending with a "
         "letter or digit")
MODEL_URI = "expected a model URI: hf://org/name[@revision], s3://bucket/prefix/, pvc://claim/path or file:///path"
ARCH = {"modelType": "llama", "hiddenSize": 64, "numHiddenLayers": 2, "numAttentionHeads": 4,
        "intermediateSize": 128, "vocabSize": 512}
MULTI_NODE = {"spec.resources.nodes": 2, "spec.resources.gpusPerNode": 1}
HOSTILE = [
    ("cpu-negative", {"spec.resources.cpu": "-1"}, f"resources.cpu {QTY} 1024 (e.g. 8)"),
    ("cpu-zero", {"spec.resources.cpu": 0}, f"resources.cpu {QTY} 1024"),
    ("memory-1e400", {"spec.resources.memory": "1e400"}, f"resources.memory {QTY} 64Ti (e.g. 32Gi)"),
    ("memory-1e20", {"spec.resources.memory": "1e20"}, f"resources.memory {QTY} 64Ti"),
    ("memory-exponent-wraps-int32", {"spec.resources.memory": "1e4294967296"}, f"resources.memory {QTY} 64Ti"),
    ("memory-fractional-exponent", {"spec.resources.memory": "1e2.5"}, f"resources.memory {QTY} 64Ti"),
    ("memory-int-past-bound", {"spec.resources.memory": 10**15}, f"resources.memory {QTY} 64Ti"),
    ("memory-just-past-bound", {"spec.resources.memory": "70368744177664.000000001"}, f"resources.memory {QTY} 64Ti"),
    ("memory-not-a-quantity", {"spec.resources.memory": "lots"}, f"resources.memory {QTY} 64Ti"),
    ("ephemeral-negative", {"spec.resources.ephemeralStorage": "-10Gi"}, f"resources.ephemeralStorage {QTY} 1Pi"),
    ("min-gpu-memory-2Ti", {"spec.resources.minGpuMemory": "2Ti"}, f"resources.minGpuMemory {QTY} 1Ti"),
    ("annotation-key", {"spec.resources.podAnnotations": {"bad key!": "x"}},
     f"resources.podAnnotations keys must be qualified names: {QUALIFIED}"),
    ("annotation-key-two-slashes", {"spec.resources.podAnnotations": {"a/b/c": "x"}},
     "resources.podAnnotations keys must be qualified names"),
    ("annotations-total", {"spec.resources.podAnnotations": {f"a{i}": "x" * 2000 for i in range(40)}},
     "resources.podAnnotations may hold at most 65536 characters in all (keys and values)"),
    ("node-selector-key", {"spec.resources.nodeSelector": {"pool name": "gpu"}},
     f"resources.nodeSelector keys must be label keys: {QUALIFIED}"),
    ("node-selector-value", {"spec.resources.nodeSelector": {"pool": "-gpu"}}, LABEL),
    ("toleration-key", {"spec.resources.tolerations": [{"key": "bad key", "operator": "Exists"}]},
     f"a toleration key must be a qualified name: {QUALIFIED}"),
    ("toleration-value", {"spec.resources.tolerations": [{"key": "k", "value": "a b"}]}, LABEL),
    ("toleration-exists-with-value", {"spec.resources.tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]},
     "a toleration with operator Exists matches any value: leave its value out, or use operator Equal"),
    ("toleration-seconds-without-noexecute", {"spec.resources.tolerations": [{"key": "k", "tolerationSeconds": 60}]},
     "a toleration's tolerationSeconds is only valid with effect NoExecute"),
    ("toleration-empty-key-equal", {"spec.resources.tolerations": [{"value": "v"}]},
     "a toleration without a key must have operator Exists (it then tolerates every taint)"),
    ("queue-name", {"spec.runPolicy.queueName": "team a"}, LABEL),
    ("priority-class", {"spec.resources.priorityClassName": "Training_High"},
     "expected a Kubernetes object name: lowercase letters, digits, '-' and '.', starting and ending with a letter or "
     "digit"),
    ("gpu-product", {"spec.resources.gpuProduct": "NVIDIA H100"}, LABEL),
    ("image-leading-space", {"spec.runPolicy.image": " ghcr.io/org/trainer:1"},
     "expected a container image reference: [registry[:port]/]path[:tag][@sha256:digest]"),
    ("secret-key", {"spec.storage.credentialsSecret": {"name": "s3", "accessKeyIdKey": "AWS KEY"}},
     "expected a Secret or ConfigMap key: letters, digits, '-', '_' and '.', not starting with '..'"),
    ("region-newline", {"spec.storage.region": "us-east-1\n"}, "expected an S3 region: letters, digits and '-'"),
    ("endpoint-userinfo", {"spec.storage.endpoint": "http://minio:s3cr3t@minio:9000"},
     "without user:password@ (credentials go in storage.credentialsSecret), ?query or #fragment"),
    ("endpoint-query", {"spec.storage.endpoint": "https://s3.example.com/?X-Amz-Credential=k"},
     "without user:password@ (credentials go in storage.credentialsSecret), ?query or #fragment"),
    ("lora-target-nul", {"spec.method.lora.targetModules": ["q_proj\x00"]}, "expected a module name"),
    # Unicode whitespace and controls: Go's ASCII \s passed these, pydantic's Unicode \s refused them
    ("uri-nbsp", {"spec.model.uri": "s3://kubetune-models/tiny\u00a0llama/"}, MODEL_URI),
    ("uri-vt", {"spec.model.uri": "s3://kubetune-models/tiny\x0bllama/"}, MODEL_URI),
    ("uri-u2028", {"spec.model.uri": "s3://kubetune-models/tiny\u2028llama/"}, MODEL_URI),
    ("uri-nul", {"spec.model.uri": "s3://kubetune-models/tiny\x00llama/"}, MODEL_URI),
    ("uri-zero-width-space", {"spec.model.uri": "file:///models/\u200btiny"}, MODEL_URI),
    ("data-uri-ideographic-space", {"spec.dataset.uri": "s3://kubetune-data/train\u3000.jsonl"}, "expected a data URI"),
    ("checkpoints-uri-bom", {"spec.checkpoints.uri": "s3://kubetune/\ufeffckpt/"}, "expected an S3 URI"),
    # integers past any real run (or past int64 downstream)
    ("max-steps-1e12", {"spec.training.maxSteps": 10**12}, "less than or equal to 100000000"),
    ("save-steps-1e12", {"spec.checkpoints.saveSteps": 10**12}, "less than or equal to 100000000"),
    ("active-deadline-2^40", {"spec.runPolicy.activeDeadlineSeconds": 2**40}, "less than or equal to 31622400"),
    ("ttl-2^31", {"spec.runPolicy.ttlSecondsAfterFinished": 2**31}, "less than or equal to 31622400"),
    ("effective-batch-2^40", {"spec.training.effectiveBatchSize": 2**40}, "less than or equal to 1048576"),
    # architecture dims
    ("arch-layers-1e12", {"spec.model.architecture": {**ARCH, "numHiddenLayers": 10**12}},
     "less than or equal to 1024"),
    ("arch-vocab", {"spec.model.architecture": {**ARCH, "vocabSize": 2**23}}, "less than or equal to 4194304"),
    ("arch-experts-per-token", {"spec.model.architecture": {**ARCH, "numLocalExperts": 8, "numExpertsPerTok": 9}},
     "model.architecture.numExpertsPerTok must be at most numLocalExperts (a token is routed to some of the experts)"),
    ("arch-kv-heads", {"spec.model.architecture": {**ARCH, "numKeyValueHeads": 8}},
     "model.architecture.numKeyValueHeads must be at most numAttentionHeads"),
    # the headless Service of a multi-node job is named after the FineTuneJob
    ("multi-node-dotted-name", {"metadata.name": "tiny.llama", **MULTI_NODE},
     "metadata.name of a multi-node job (resources.nodes > 1) must be lowercase letters, digits and '-', starting with "
     "a letter, without dots: its headless Service is named after it"),
    ("multi-node-digit-first", {"metadata.name": "7b-llama", **MULTI_NODE},
     "metadata.name of a multi-node job (resources.nodes > 1) must be lowercase letters"),
]


def _words(text: str) -> str:
    # kubectl and the apiserver quote and wrap; compare the words
    return " ".join(text.replace('\\"', '"').split())


@pytest.mark.parametrize("changes,words", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_values_are_refused_by_the_apiserver_and_the_models_in_the_same_words(
        ground, crd, namespace, changes, words):
    stderr, message = _refused_by_both(ground, namespace, _quickstart(changes), words)
    # a password in the endpoint is not echoed back (the operator would copy it into the status)
    assert "s3cr3t" not in stderr and "s3cr3t" not in message
    assert ground.kubectl("get", "ftj", "-n", namespace, "-o", "name").stdout.strip() == ""


SANE = [
    ("quantities-at-the-bounds", {"spec.resources.cpu": 1024, "spec.resources.memory": "64Ti",
                                  "spec.resources.ephemeralStorage": "1Pi", "spec.resources.minGpuMemory": "1Ti"}),
    ("quantities-small", {"spec.resources.cpu": "500m", "spec.resources.memory": 2147483648}),
    ("annotations-and-selector", {
        "spec.resources.podAnnotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
                                          "note": "free text, spaces: ok"},
        "spec.resources.nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": ""}}),
    ("tolerations", {"spec.resources.tolerations": [
        {"operator": "Exists"}, {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "value": "true", "effect": "NoExecute", "tolerationSeconds": 300}]}),
    ("names", {"spec.resources.priorityClassName": "system-cluster-critical",
               "spec.runPolicy.queueName": "team-a.gpu_q",
               "spec.runPolicy.image": "registry.local:5000/kubetune/trainer@sha256:" + "a" * 64,
               "spec.storage.region": "eu-central-1"}),
    ("endpoint-ipv6-port-path", {"spec.storage.endpoint": "http://[fd00::1]:9000/s3/"}),
    ("non-ascii-path", {"spec.model.uri": "s3://kubetune-models/données/tiny-llama/"}),
    ("dotted-name-single-node", {"metadata.name": "tiny.llama"}),
    ("multi-node-plain-name",
     {"metadata.name": "tiny-llama", "spec.resources.nodes": 4, "spec.resources.gpusPerNode": 8}),
    ("architecture-at-the-maxima", {"spec.model.architecture": {
        **ARCH, "numHiddenLayers": 1024, "hiddenSize": 65536, "intermediateSize": 262144, "vocabSize": 4194304,
        "numAttentionHeads": 1024, "numKeyValueHeads": 1024, "headDim": 1024, "maxPositionEmbeddings": 2**24,
        "numLocalExperts": 1024, "numExpertsPerTok": 1024}}),
]


@pytest.mark.parametrize("changes", [s[1] for s in SANE], ids=[s[0] for s in SANE])
def test_sane_values_are_accepted_by_both(ground, crd, namespace, changes):
    _accepted_by_both(ground, namespace, _quickstart(changes))


def test_no_admission_message_is_a_regex(ground, crd, namespace):
    # Every URI field at once: each answer is the rule in words, none a 300-character regex.
    obj = _quickstart({path: "gs://bucket/x" for path in (
        "spec.model.uri", "spec.dataset.uri", "spec.checkpoints.uri", "spec.checkpoints.resumeFrom", "spec.output.uri",
        "spec.storage.endpoint")})
    res = ground.kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(obj), check=False)
    assert res.returncode != 0
    assert res.stderr.count("Invalid value") == 6, res.stderr
    assert "[^" not in res.stderr and "\\s" not in res.stderr and "should match" not in res.stderr, res.stderr


# spec.objective (issue #21): what cannot combine is refused by the apiserver's CEL rules and by the models, in the
# same words. The quickstart is a LoRA job on alpaca data; each case turns it into a preference job.
PAIRS = {"spec.dataset.format": "preference"}
OBJECTIVE_BAD = [
    ("dpo-on-alpaca-data", {"spec.objective": {"type": "dpo"}},
     "dataset.format must be auto or preference with objective.type dpo, orpo or simpo (they train on {prompt, "
     "chosen, rejected} pairs)"),
    ("kto-on-pairs", {**PAIRS, "spec.objective": {"type": "kto"}},
     "dataset.format must be auto or kto with objective.type kto (it trains on unpaired {prompt, completion, label} "
     "examples)"),
    ("pairs-without-objective", PAIRS,
     "dataset.format must be auto, alpaca, chat or text with objective.type sft (preference and kto data need a "
     "preference objective)"),
    ("implicit-reference-with-full", {**PAIRS, "spec.method": {"type": "full"},
                                      "spec.objective": {"type": "dpo", "reference": "implicit"}},
     "objective.reference implicit needs an adapter method (method.type lora, qlora, prompt-tuning or prefix-tuning): "
     "it disables the adapters to get the base model; with method.type full or freeze use copy or precomputed"),
    ("copy-reference-with-qlora", {**PAIRS, "spec.method": {"type": "qlora"}, "spec.resources.gpusPerNode": 1,
                                   "spec.objective": {"type": "dpo", "reference": "copy"}},
     "objective.reference copy cannot be used with method.type qlora: the copy would be a second quantized base "
     "model, while the base with the adapters disabled is the same reference at no memory cost; use implicit (the "
     "default) or precomputed"),
    ("reference-with-orpo", {**PAIRS, "spec.objective": {"type": "orpo", "reference": "copy"}},
     "objective.reference is only valid with objective.type dpo or kto: sft, orpo and simpo use no reference model"),
    ("gamma-with-dpo", {**PAIRS, "spec.objective": {"type": "dpo", "gamma": 1}},
     "objective.gamma is only valid with objective.type simpo"),
    ("beta-with-sft", {"spec.objective": {"type": "sft", "beta": 0.1}},
     "objective.beta is only valid with objective.type dpo, orpo, kto or simpo"),
    ("loss-with-kto", {"spec.dataset.format": "kto", "spec.objective": {"type": "kto", "loss": "sigmoid"}},
     "objective.loss is only valid with objective.type dpo"),
    ("smoothing-with-ipo", {**PAIRS, "spec.objective": {"type": "dpo", "loss": "ipo", "labelSmoothing": 0.1}},
     "objective.labelSmoothing is only valid with objective.type dpo and objective.loss sigmoid (the default)"),
    ("desirable-weight-with-dpo", {**PAIRS, "spec.objective": {"type": "dpo", "desirableWeight": 2}},
     "objective.desirableWeight is only valid with objective.type kto"),
    ("undesirable-weight-with-simpo", {**PAIRS, "spec.objective": {"type": "simpo", "undesirableWeight": 2}},
     "objective.undesirableWeight is only valid with objective.type kto"),
    ("packing-with-dpo", {**PAIRS, "spec.dataset.packing": True, "spec.objective": {"type": "dpo"}},
     "dataset.packing is only valid with objective.type sft (preference objectives score each whole sequence on its "
     "own)"),
]


@pytest.mark.parametrize("changes,words", [b[1:] for b in OBJECTIVE_BAD], ids=[b[0] for b in OBJECTIVE_BAD])
def test_objective_rules_are_the_same_words_in_the_apiserver_and_the_models(ground, crd, namespace, changes, words):
    _refused_by_both(ground, namespace, _quickstart(changes), words)


OBJECTIVE_GOOD = [
    ("dpo-defaults", {**PAIRS, "spec.objective": {"type": "dpo"}}),
    ("dpo-auto-format", {"spec.dataset.format": "auto",
                         "spec.objective": {"type": "dpo", "beta": 0.5, "loss": "sigmoid", "labelSmoothing": 0.1,
                                            "reference": "precomputed"}}),
    ("dpo-full-copy",
     {**PAIRS, "spec.method": {"type": "full"}, "spec.objective": {"type": "dpo", "reference": "copy"}}),
    ("orpo", {**PAIRS, "spec.objective": {"type": "orpo", "beta": 0.2}}),
    ("simpo", {**PAIRS, "spec.objective": {"type": "simpo", "beta": 2.5, "gamma": 0.8}}),
    ("kto", {"spec.dataset.format": "kto",
             "spec.objective": {"type": "kto", "desirableWeight": 1, "undesirableWeight": 1.5}}),
    ("sft-empty-objective", {"spec.objective": {}, "spec.dataset.packing": True}),
]


@pytest.mark.parametrize("changes", [g[1] for g in OBJECTIVE_GOOD], ids=[g[0] for g in OBJECTIVE_GOOD])
def test_good_objectives_are_accepted_by_both(ground, crd, namespace, changes):
    _accepted_by_both(ground, namespace, _quickstart(changes))


def test_an_empty_objective_is_stored_as_sft(ground, crd, namespace):
    obj = _quickstart({"spec.objective": {}})
    got = json.loads(ground.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", "-o", "json",
                                    stdin=json.dumps(obj)).stdout)
    assert got["spec"]["objective"] == {"type": "sft"}  # only the type has a schema default
