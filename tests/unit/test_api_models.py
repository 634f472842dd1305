"""The API models accept good specs and reject bad ones with messages that name the field."""
from __future__ import annotations

import pytest

from kubetune.api.base import PATTERN_HELP, quantity_to_decimal, quantity_to_float
from kubetune.api.v1alpha1 import FineTuneJob, TrainerConfig, check_object
from kubetune.api.validation import parse_job, parse_spec

from builders import parse_errors, patched

GOOD = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "demo"},
    "spec": {
        "model": {"uri": "hf://meta-llama/Llama-3.1-8B@main"},
        "dataset": {"uri": "s3://data/train.jsonl", "format": "alpaca"},
        "method": {"type": "lora", "lora": {"rank": 8}},
        "training": {"maxSteps": 100, "microBatchSize": 4},
        "checkpoints": {"uri": "s3://ckpt/runs/"},
    },
}


def job(**patch) -> dict:
    """GOOD with dotted-path overrides; a value of ... deletes the key."""
    return patched(GOOD, **patch)


def test_good_spec_parses_with_defaults():
    j = parse_job(GOOD)
    assert isinstance(j, FineTuneJob)
    assert j.spec.method.lora.rank == 8 and j.spec.method.lora.alpha == 32
    assert j.spec.method.effective_lora.target_modules == ["all-linear"]
    assert j.spec.training.gradient_checkpointing is True
    assert j.spec.resources.gpus_per_node == 1 and j.spec.resources.total_gpus == 1
    assert j.spec.checkpoints.deletion_policy == "Retain"
    # camelCase round trip: what we dump is what a user writes
    dumped = j.dump()
    assert dumped["spec"]["training"]["maxSteps"] == 100
    assert "max_steps" not in str(dumped)
    assert parse_job(dumped).spec == j.spec


@pytest.mark.parametrize(
    "uri",
    ["hf://gpt2", "hf://Qwen/Qwen2.5-0.5B-Instruct@v1.0", "s3://my-bucket/models/llama/", "pvc://models/llama-8b",
     "file:///models/tiny"],
)
def test_model_uri_schemes_accepted(uri):
    assert parse_job(job(spec__model__uri=uri)).spec.model.uri == uri


@pytest.mark.parametrize(
    "uri",
    ["hf://tatsu-lab/alpaca", "hf://HuggingFaceH4/ultrachat_200k/data/train_sft-*.parquet",
     "hf://org/name/data@refs/convert/parquet", "hf://org/name/sft/train.jsonl@v2"],
)
def test_a_dataset_uri_may_name_a_path_in_an_hf_repository(uri):
    assert parse_job(job(spec__dataset__uri=uri)).spec.dataset.uri == uri


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"spec__model__uri": "hf://org/name/subfolder"},
         "spec.model.uri: 'hf://org/name/subfolder' is not valid: expected a model URI: hf://org/name[@revision]"),
        ({"spec__dataset__uri": "hf://org/name/"},
         "spec.dataset.uri: 'hf://org/name/' is not valid: expected a data URI: s3://bucket/file.jsonl, "
         "pvc://claim/path, hf://org/dataset[/path][@revision] or file:///path"),
        ({"spec__model__uri": "http://example.com/model"},
         "spec.model.uri: 'http://example.com/model' is not valid: expected a model URI: hf://org/name[@revision]"),
        ({"spec__model__uri": "s3://Bad_Bucket/x"},
         "spec.model.uri: 's3://Bad_Bucket/x' is not valid: expected a model URI"),
        ({"spec__storage__endpoint": "minio:9000"},
         "spec.storage: storage.endpoint must be an http:// or https:// URL"),
        ({"spec__method__type": "dpo"}, "spec.method.type: Input should be 'full', 'lora', 'qlora'"),
        ({"spec__method__lora__rank": 0}, "spec.method.lora.rank: Input should be greater than or equal to 1"),
        ({"spec__method__lora__rnak": 4}, "spec.method.lora.rnak: unknown field"),
        ({"spec__training__epochs": 2}, "spec.training: set exactly one of training.epochs and training.maxSteps"),
        ({"spec__training__maxSteps": ...}, "spec.training: set exactly one of training.epochs and training.maxSteps"),
        ({"spec__training__microBatchSize": "big"},
         "spec.training.microBatchSize: must be an integer from 1 to 4096, or 'auto' (got 'big')"),
        ({"spec__training__microBatchSize": 0},
         "spec.training.microBatchSize: must be an integer from 1 to 4096, or 'auto' (got 0)"),
        ({"spec__training__microBatchSize": True},
         "spec.training.microBatchSize: must be an integer from 1 to 4096, or 'auto' (got True)"),
        ({"spec__training__precision": "int8"},
         "spec.training.precision: Input should be 'bf16', 'bf16-mixed', 'fp16' or 'fp32'"),
        ({"spec__training__learningRate": -1}, "spec.training.learningRate: Input should be greater than 0"),
        ({"spec__checkpoints": ...}, "spec.checkpoints: required field is missing"),
        ({"spec__checkpoints__uri": "gs://bucket/x"},
         "spec.checkpoints.uri: 'gs://bucket/x' is not valid: expected an S3 URI: s3://bucket/prefix/"),
        ({"spec__resources__memory": "lots"},
         "spec.resources.memory: resources.memory must be a Kubernetes quantity greater than 0 and at most 64Ti"),
        ({"spec__resources__gpusPerNode": 17}, "spec.resources.gpusPerNode: Input should be less than or equal to 16"),
        ({"spec__resources__nodes": 2, "spec__resources__gpusPerNode": 0},
         "resources.nodes > 1 needs resources.gpusPerNode >= 1"),
        ({"spec__dataset__validationSplit": 0.1, "spec__dataset__validationUri": "s3://data/v.jsonl"}, "not both"),
        ({"spec__dataset__format": "csv"},
         "spec.dataset.format: Input should be 'auto', 'alpaca', 'chat', 'text', 'preference' or 'kto'"),
        ({"spec__storage__credentialsSecret": {"name": "s3", "accessKey": "AKIA..."}},
         "spec.storage.credentialsSecret.accessKey: unknown field"),
        ({"spec__model__tokenSecret": {"name": "hf", "token": "hf_x"}}, "spec.model.tokenSecret.token: unknown field"),
        ({"spec__model__uri": "s3://models/llama/", "spec__model__tokenSecret": {"name": "hf"}},
         "spec: model.tokenSecret is for hf:// models and datasets; s3:// uses spec.storage.credentialsSecret"),
        ({"metadata__name": "x" * 51}, "metadata.name must be at most 50 characters"),
    ],
)
def test_bad_specs_name_the_field(patch, expected):
    msg = parse_errors(job(**patch))
    assert expected in msg, msg


def test_a_bad_micro_batch_is_one_line_with_the_path_the_user_wrote():
    # Not one line per union branch (`microBatchSize.constrained-int`, `microBatchSize.literal['auto']`).
    assert parse_errors(job(spec__training__microBatchSize="4")).splitlines() == [
        "spec.training.microBatchSize: must be an integer from 1 to 4096, or 'auto' (got '4')"]


@pytest.mark.parametrize(
    "method, expected",
    [
        ({"type": "full", "lora": {"rank": 8}}, "method.lora is only valid with method.type lora or qlora"),
        ({"type": "lora", "quantization": {"bits": 4}}, "method.quantization is only valid with method.type qlora"),
        ({"type": "qlora", "quantization": {"bits": 3}}, "spec.method.quantization.bits: Input should be 4 or 8"),
        ({"type": "freeze"}, "method.freeze (with trainableLayers) is required for method.type freeze"),
        ({"type": "full", "freeze": {"trainableLayers": 2}}, "method.freeze (with trainableLayers) is required"),
        ({"type": "lora", "virtualTokens": 10}, "method.virtualTokens is only valid with method.type prompt-tuning"),
    ],
)
def test_method_cross_field_rules(method, expected):
    msg = parse_errors(job(spec__method=method))
    assert expected in msg and msg.startswith("spec.method"), msg


def test_good_methods():
    for method in (
        {"type": "full"},
        {"type": "qlora", "quantization": {"bits": 8}},
        {"type": "freeze", "freeze": {"trainableLayers": 2}},
        {"type": "prompt-tuning", "virtualTokens": 16},
        {"type": "prefix-tuning"},
    ):
        assert parse_job(job(spec__method=method)).spec.method.type == method["type"]
    assert parse_job(job(spec__method={"type": "prefix-tuning"})).spec.method.effective_virtual_tokens == 20


def test_spec_level_rules():
    msg = parse_errors(job(spec__training__earlyStopping={"patience": 2}, spec__training__evalSteps=10))
    assert "training.earlyStopping needs validation data" in msg
    msg = parse_errors(job(spec__training__earlyStopping={"patience": 2}, spec__dataset__validationSplit=0.1))
    assert "training.earlyStopping needs training.evalSteps" in msg
    assert "output.mergeAdapter is only valid" in parse_errors(
        job(spec__method={"type": "full"}, spec__output={"mergeAdapter": True})
    )
    assert "qlora needs a GPU" in parse_errors(job(spec__method={"type": "qlora"}, spec__resources={"gpusPerNode": 0}))


def test_several_errors_are_all_reported():
    msg = parse_errors(job(spec__method__lora__rank=0, spec__training__precision="int8", spec__dataset__uri="ftp://x"))
    lines = msg.splitlines()
    assert len(lines) == 3
    fields = {line.split(":")[0] for line in lines}
    assert fields == {"spec.method.lora.rank", "spec.training.precision", "spec.dataset.uri"}


def test_parse_spec_prefixes_spec():
    with pytest.raises(ValueError, match=r"^spec\.training: set exactly one"):
        parse_spec({**GOOD["spec"], "training": {"epochs": 1, "maxSteps": 3}})


def test_auto_batch_and_int_batch():
    assert parse_job(job(spec__training__microBatchSize="auto")).spec.training.micro_batch_size == "auto"
    assert parse_job(job(spec__training__microBatchSize=16)).spec.training.micro_batch_size == 16


@pytest.mark.parametrize(
    "q, value", [("64Gi", 64 * 2**30), ("500m", 0.5), ("8", 8.0), (16, 16.0), ("80G", 80e9), ("1e3", 1000.0)])
def test_quantities(q, value):
    assert quantity_to_float(q) == pytest.approx(value)


def test_inline_architecture_is_config_json():
    arch = {"modelType": "llama", "hiddenSize": 64, "numHiddenLayers": 2, "numAttentionHeads": 4,
            "intermediateSize": 128, "vocabSize": 512}
    j = parse_job(job(spec__model__architecture=arch))
    assert j.spec.model.architecture.to_hf_config() == {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "vocab_size": 512, "tie_word_embeddings": False,
    }


def test_trainer_config_embeds_the_same_spec():
    spec = parse_job(GOOD).spec
    cfg = TrainerConfig.model_validate({
        "job": {"namespace": "ml", "name": "demo", "run": 2},
        "spec": spec.dump(),
        "resolved": {"microBatchSize": 4, "gradientAccumulationSteps": 2},
        "paths": {"checkpointsUri": "s3://ckpt/runs/ml/demo/run-2/", "outputUri": "s3://ckpt/runs/ml/demo/run-2/final/",
                  "progressUri": "s3://ckpt/runs/ml/demo/run-2/progress.json"},
    })
    assert cfg.spec == spec and cfg.kind == "TrainerConfig"
    assert TrainerConfig.model_validate(cfg.dump()) == cfg


def test_a_hub_token_serves_a_gated_model_or_a_gated_dataset():
    s = parse_job(job(spec__model__tokenSecret={"name": "hf"})).spec
    assert (s.model.token_secret.name, s.model.token_secret.key) == ("hf", "HF_TOKEN")
    s = parse_job(job(spec__model__uri="s3://models/llama/", spec__model__tokenSecret={"name": "hf", "key": "token"},
                      spec__dataset__uri="hf://org/gated-data")).spec
    assert s.model.token_secret.key == "token"


# ---------------------------------------------------------------------------------------------
# Hostile and careless input (issue #19): whatever flows into a child object (Job, pod, Service,
# labels, annotations) is refused at parse time with the same words the apiserver says
# (tests/integration/test_crds.py::HOSTILE holds the same cases against the real apiserver).

QTY = "must be a Kubernetes quantity greater than 0 and at most"
QUALIFIED = "[prefix/]name, the name at most 63 letters, digits, '-', '_' or '.'"
LABEL = PATTERN_HELP[r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"]
URI_WS = "is not valid: expected a model URI: hf://org/name[@revision], s3://bucket/prefix/, pvc://claim/path or file:///path"
ARCH = {"modelType": "llama", "hiddenSize": 64, "numHiddenLayers": 2, "numAttentionHeads": 4,
        "intermediateSize": 128, "vocabSize": 512}


@pytest.mark.parametrize(
    "patch, expected",
    [
        # quantities: negative, zero, absurd, past the bound
        ({"spec__resources__cpu": "-1"}, f"spec.resources.cpu: resources.cpu {QTY} 1024 (e.g. 8)"),
        ({"spec__resources__cpu": 0}, f"spec.resources.cpu: resources.cpu {QTY} 1024"),
        ({"spec__resources__cpu": "2000"}, f"spec.resources.cpu: resources.cpu {QTY} 1024"),
        ({"spec__resources__memory": "1e400"}, f"spec.resources.memory: resources.memory {QTY} 64Ti (e.g. 32Gi)"),
        ({"spec__resources__memory": "1e20"}, f"spec.resources.memory: resources.memory {QTY} 64Ti"),
        ({"spec__resources__memory": "65Ti"}, f"spec.resources.memory: resources.memory {QTY} 64Ti"),
        # Go reads a long exponent into an int32 (1e4294967296 wraps to 1); a fraction is no quantity
        ({"spec__resources__memory": "1e4294967296"}, f"spec.resources.memory: resources.memory {QTY} 64Ti"),
        ({"spec__resources__memory": "1e2.5"}, f"spec.resources.memory: resources.memory {QTY} 64Ti"),
        ({"spec__resources__memory": "8Gi\n"}, f"spec.resources.memory: resources.memory {QTY} 64Ti"),
        ({"spec__resources__ephemeralStorage": "-10Gi"},
         f"spec.resources.ephemeralStorage: resources.ephemeralStorage {QTY} 1Pi (e.g. 200Gi)"),
        ({"spec__resources__ephemeralStorage": "2Pi"}, f"resources.ephemeralStorage {QTY} 1Pi"),
        ({"spec__resources__minGpuMemory": "2Ti"},
         f"spec.resources.minGpuMemory: resources.minGpuMemory {QTY} 1Ti (e.g. 40Gi)"),
        ({"spec__resources__minGpuMemory": "0"}, f"resources.minGpuMemory {QTY} 1Ti"),
        # annotations, node selectors, tolerations: the pod's own rules
        ({"spec__resources__podAnnotations": {"bad key!": "x"}},
         f"spec.resources.podAnnotations: resources.podAnnotations keys must be qualified names: {QUALIFIED}"),
        ({"spec__resources__podAnnotations": {"a/b/c": "x"}}, "resources.podAnnotations keys must be qualified names"),
        ({"spec__resources__podAnnotations": {"x" * 64: "x"}}, "resources.podAnnotations keys must be qualified names"),
        ({"spec__resources__podAnnotations": {"Example.com/x": "x"}},
         "resources.podAnnotations keys must be qualified names"),
        ({"spec__resources__podAnnotations": {f"a{i}": "x" * 2000 for i in range(40)}},
         "spec.resources.podAnnotations: resources.podAnnotations may hold at most 65536 characters in all"),
        ({"spec__resources__nodeSelector": {"pool name": "gpu"}},
         f"spec.resources.nodeSelector: resources.nodeSelector keys must be label keys: {QUALIFIED}"),
        ({"spec__resources__nodeSelector": {"pool": "x" * 64}},
         "spec.resources.nodeSelector.pool: String should have at most 63"),
        ({"spec__resources__nodeSelector": {"pool": "-gpu"}},
         f"spec.resources.nodeSelector.pool: '-gpu' is not valid: expected {LABEL}"),
        ({"spec__resources__tolerations": [{"key": "bad key"}]},
         f"spec.resources.tolerations[0].key: a toleration key must be a qualified name: {QUALIFIED}"),
        ({"spec__resources__tolerations": [{"key": "k", "value": "a b"}]},
         f"spec.resources.tolerations[0].value: 'a b' is not valid: expected {LABEL}"),
        ({"spec__resources__tolerations": [{"operator": "Exists", "key": "k", "value": "v"}]},
         "spec.resources.tolerations[0]: a toleration with operator Exists matches any value: leave its value out, or "
         "use operator Equal"),
        ({"spec__resources__tolerations": [{"key": "k", "tolerationSeconds": 60}]},
         "spec.resources.tolerations[0]: a toleration's tolerationSeconds is only valid with effect NoExecute"),
        ({"spec__resources__tolerations": [{"value": "v"}]},
         "spec.resources.tolerations[0]: a toleration without a key must have operator Exists (it then tolerates every "
         "taint)"),
        ({"spec__resources__tolerations": [{"key": "k", "effect": "NoExecute", "tolerationSeconds": 2**63}]},
         "spec.resources.tolerations[0].tolerationSeconds: Input should be less than or equal to 31622400"),
        # names that become label values, pod fields or object names
        ({"spec__runPolicy__queueName": "team a"},
         f"spec.runPolicy.queueName: 'team a' is not valid: expected {LABEL}"),
        ({"spec__resources__priorityClassName": "Training_High"},
         "spec.resources.priorityClassName: 'Training_High' is not valid: expected a Kubernetes object name"),
        ({"spec__resources__priorityClassName": "a..b"}, "spec.resources.priorityClassName: 'a..b' is not valid"),
        ({"spec__resources__gpuProduct": "NVIDIA H100"},
         f"spec.resources.gpuProduct: 'NVIDIA H100' is not valid: expected {LABEL}"),
        ({"spec__runPolicy__image": " ghcr.io/org/trainer:1"},
         "spec.runPolicy.image: ' ghcr.io/org/trainer:1' is not valid: expected a container image reference"),
        ({"spec__runPolicy__image": "ghcr.io/Org/trainer"}, "expected a container image reference"),
        ({"spec__runPolicy__image": "trainer:1\n"}, "expected a container image reference"),
        ({"spec__storage__credentialsSecret": {"name": "s3", "accessKeyIdKey": "AWS KEY"}},
         "spec.storage.credentialsSecret.accessKeyIdKey: 'AWS KEY' is not valid: expected a Secret or ConfigMap key"),
        ({"spec__model__tokenSecret": {"name": "hf", "key": ".."}}, "spec.model.tokenSecret.key: '..' is not valid"),
        ({"spec__storage__serviceAccountName": "a..b"}, "spec.storage.serviceAccountName: 'a..b' is not valid"),
        ({"spec__storage__region": "us-east-1\n"},
         "spec.storage.region: 'us-east-1\\n' is not valid: expected an S3 region"),
        ({"spec__method__lora__targetModules": ["q_proj\x00"]},
         "spec.method.lora.targetModules[0]: 'q_proj\\x00' is not valid: expected a module name"),
        # endpoint: no userinfo (and the password is not echoed), no query or fragment
        ({"spec__storage__endpoint": "http://minio:s3cr3t@minio:9000"},
         "spec.storage: storage.endpoint must be an http:// or https:// URL: scheme, host, optional :port and /path, "
         "without user:password@ (credentials go in storage.credentialsSecret), ?query or #fragment"),
        ({"spec__storage__endpoint": "https://s3.example.com/?x=1"}, "credentials go in storage.credentialsSecret"),
        ({"spec__storage__endpoint": "https://s3.example.com/#x"}, "credentials go in storage.credentialsSecret"),
        ({"spec__storage__endpoint": "https://s3.example.com\u00a0"}, "spec.storage: storage.endpoint must be an http://"),
        # Unicode whitespace and controls: pydantic's Unicode \s and Go's ASCII \s used to disagree
        ({"spec__model__uri": "s3://models/llama\u00a0/"}, f"spec.model.uri: 's3://models/llama\\xa0/' {URI_WS}"),
        ({"spec__model__uri": "s3://models/llama\x0b/"}, f"spec.model.uri: 's3://models/llama\\x0b/' {URI_WS}"),
        ({"spec__model__uri": "s3://models/llama\u2028/"}, f"spec.model.uri: 's3://models/llama\\u2028/' {URI_WS}"),
        ({"spec__model__uri": "s3://models/llama\x00/"}, f"spec.model.uri: 's3://models/llama\\x00/' {URI_WS}"),
        ({"spec__model__uri": "file:///models/\u200btiny"}, URI_WS),
        ({"spec__dataset__uri": "hf://org/data/train\u3000.jsonl"},
         "spec.dataset.uri: 'hf://org/data/train\\u3000.jsonl' is not valid"),
        ({"spec__checkpoints__uri": "s3://ckpt/\ufeffruns/"},
         "spec.checkpoints.uri: 's3://ckpt/\\ufeffruns/' is not valid"),
        # integers past any real run (and past int64)
        ({"spec__training__maxSteps": 2**63},
         "spec.training.maxSteps: Input should be less than or equal to 100000000"),
        ({"spec__training__maxSteps": 100, "spec__training__evalSteps": 10**20},
         "spec.training.evalSteps: Input should be less"),
        ({"spec__training__loggingSteps": 10**19}, "spec.training.loggingSteps: Input should be less than or equal"),
        ({"spec__training__effectiveBatchSize": 2**40},
         "spec.training.effectiveBatchSize: Input should be less than or equal to 1048576"),
        ({"spec__checkpoints__saveSteps": 2**64}, "spec.checkpoints.saveSteps: Input should be less than or equal"),
        ({"spec__runPolicy__activeDeadlineSeconds": 2**63},
         "spec.runPolicy.activeDeadlineSeconds: Input should be less than or equal to 31622400"),
        ({"spec__runPolicy__ttlSecondsAfterFinished": 2**31},
         "spec.runPolicy.ttlSecondsAfterFinished: Input should be less than or equal"),
        # architecture dims
        ({"spec__model__architecture": {**ARCH, "numHiddenLayers": 10**12}},
         "spec.model.architecture.numHiddenLayers: Input should be less than or equal to 1024"),
        ({"spec__model__architecture": {**ARCH, "hiddenSize": 65537}},
         "architecture.hiddenSize: Input should be less than or equal to 65536"),
        ({"spec__model__architecture": {**ARCH, "intermediateSize": 2**20}},
         "architecture.intermediateSize: Input should be less than or equal to 262144"),
        ({"spec__model__architecture": {**ARCH, "vocabSize": 2**23}},
         "architecture.vocabSize: Input should be less than or equal to 4194304"),
        ({"spec__model__architecture": {**ARCH, "numAttentionHeads": 2048}},
         "architecture.numAttentionHeads: Input should be less than or equal to 1024"),
        ({"spec__model__architecture": {**ARCH, "headDim": 4096}},
         "architecture.headDim: Input should be less than or equal to 1024"),
        ({"spec__model__architecture": {**ARCH, "maxPositionEmbeddings": 2**40}},
         "architecture.maxPositionEmbeddings: Input should be less"),
        ({"spec__model__architecture": {**ARCH, "numLocalExperts": 4096}},
         "architecture.numLocalExperts: Input should be less than or equal to 1024"),
        ({"spec__model__architecture": {**ARCH, "numLocalExperts": 8, "numExpertsPerTok": 9}},
         "spec.model.architecture: model.architecture.numExpertsPerTok must be at most numLocalExperts"),
        ({"spec__model__architecture": {**ARCH, "numKeyValueHeads": 8}},
         "spec.model.architecture: model.architecture.numKeyValueHeads must be at most numAttentionHeads"),
        # the FineTuneJob as a whole: a multi-node job's Service is named after it
        ({"metadata__name": "llama.run", "spec__resources": {"nodes": 2, "gpusPerNode": 8}},
         "metadata.name of a multi-node job (resources.nodes > 1) must be lowercase letters, digits and '-', starting "
         "with a letter, without dots: its headless Service is named after it"),
        ({"metadata__name": "7b-run", "spec__resources": {"nodes": 2}}, "metadata.name of a multi-node job"),
    ],
    ids=lambda v: None if isinstance(v, dict) else v[:40],
)
def test_hostile_values_are_refused_with_the_rule_in_plain_words(patch, expected):
    msg = parse_errors(job(**patch))
    assert expected in msg, msg
    assert "s3cr3t" not in msg  # a password in the endpoint is not echoed into a status
    assert "\\s" not in msg and "[^" not in msg and "(?" not in msg, f"a regex in the message: {msg}"


@pytest.mark.parametrize(
    "patch",
    [
        {"spec__resources__cpu": "500m"}, {"spec__resources__cpu": 1024}, {"spec__resources__cpu": "1e3"},
        {"spec__resources__memory": "64Ti"}, {"spec__resources__memory": 17179869184},
        {"spec__resources__memory": "1.5Gi"},
        {"spec__resources__ephemeralStorage": "1Pi"}, {"spec__resources__minGpuMemory": "80Gi"},
        {"spec__resources__podAnnotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
                                             "note": "any text: ok"}},
        {"spec__resources__nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": ""}},
        {"spec__resources__tolerations": [
            {"operator": "Exists"}, {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "spot", "value": "true", "effect": "NoExecute", "tolerationSeconds": 300}]},
        {"spec__resources__priorityClassName": "system-cluster-critical"},
        {"spec__runPolicy__queueName": "team-a.gpu_queue"},
        {"spec__runPolicy__image": "registry.local:5000/kubetune/trainer:dev-1.2"},
        {"spec__runPolicy__image": "ghcr.io/kubetune/trainer@sha256:" + "a" * 64},
        {"spec__runPolicy__image": "trainer"},
        {"spec__storage__endpoint": "https://minio.storage.svc.cluster.local:9000/"},
        {"spec__storage__endpoint": "http://[fd00::1]:9000"},
        {"spec__storage__region": "eu-central-1"},
        {"spec__model__uri": "s3://models/données/llama-8b/"},
        {"spec__model__tokenSecret": {"name": "hf", "key": ".hf-token"}},
        {"spec__training__maxSteps": 100_000_000, "spec__checkpoints__saveSteps": 100_000_000},
        {"spec__runPolicy__activeDeadlineSeconds": 366 * 24 * 3600},
        {"metadata__name": "llama.run"},  # single node: the name is not a Service name
        {"metadata__name": "llama-run", "spec__resources": {"nodes": 4, "gpusPerNode": 8}},
    ],
    ids=lambda p: ",".join(f"{k.split('__')[-1]}" for k in p),
)
def test_sane_values_still_parse(patch):
    parse_job(job(**patch))


def test_the_largest_real_architectures_fit_the_maxima_with_room():
    from kubetune.api.v1alpha1 import ModelArchitecture
    from kubetune.estimator.catalog import CATALOG

    fields = ModelArchitecture.model_fields
    checked = 0
    for name, cfg in CATALOG.items():
        known = {k: v for k, v in cfg.items() if k in fields}
        if {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"} <= set(known):
            ModelArchitecture.model_validate(known)
            checked += 1
            for k, v in known.items():
                le = next((m.le for m in fields[k].metadata if hasattr(m, "le")), None)
                if isinstance(v, int) and not isinstance(v, bool) and le and k != "num_experts_per_tok":
                    assert v * 2 <= le, f"{name}: {k}={v} is within 2x of the maximum {le}"
    assert checked >= 10


def test_check_object_gives_the_operator_the_root_rules():
    spec = parse_job(job(spec__resources={"nodes": 2, "gpusPerNode": 8})).spec
    assert check_object("llama-70b", spec) == []
    assert check_object("llama.70b", spec) == [
        "metadata.name of a multi-node job (resources.nodes > 1) must be lowercase letters, digits and '-', starting "
        "with a letter, without dots: its headless Service is named after it"]
    assert check_object("x" * 51, spec)[0].startswith("metadata.name must be at most 50 characters")
    assert check_object("llama.70b", parse_job(GOOD).spec) == []  # one node: no Service


def test_exact_quantities_no_float_rounding():
    assert quantity_to_decimal("64Ti") == 64 * 2**40
    assert quantity_to_decimal("1e400") > quantity_to_decimal("64Ti")  # not inf, not an error
    assert quantity_to_decimal("500m") == quantity_to_decimal("0.5")
    just_over = str(64 * 2**40) + ".000000001"
    assert "resources.memory must be" in parse_errors(job(spec__resources__memory=just_over))


def test_no_rule_message_starts_with_or():
    from kubetune.api.crd import crd

    def messages(node):
        if isinstance(node, dict):
            for r in node.get("x-kubernetes-validations", []):
                yield r["message"]
            for v in node.values():
                yield from messages(v)
        elif isinstance(node, list):
            for v in node:
                yield from messages(v)

    found = list(messages(crd())) + list(PATTERN_HELP.values())
    assert len(found) > 40
    assert not [m for m in found if m.lower().startswith("or ")]
