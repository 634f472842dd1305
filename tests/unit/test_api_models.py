"""The API models accept good specs and reject bad ones with messages that name the field."""
from __future__ import annotations

import copy

import pytest

from kubetune.api.base import quantity_to_float
from kubetune.api.v1alpha1 import FineTuneJob, TrainerConfig
from kubetune.api.validation import parse_job, parse_spec

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
    obj = copy.deepcopy(GOOD)
    for dotted, value in patch.items():
        *parents, leaf = dotted.split("__")
        node = obj
        for p in parents:
            node = node.setdefault(p, {})
        if value is ...:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return obj


def errors_of(obj: dict) -> str:
    with pytest.raises(ValueError) as e:
        parse_job(obj)
    return str(e.value)


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
         "spec.dataset.uri: 'hf://org/name/' is not valid: expected a data URI: s3://bucket/file.jsonl, pvc://claim/path, "
         "hf://org/dataset[/path][@revision] or file:///path"),
        ({"spec__model__uri": "http://example.com/model"},
         "spec.model.uri: 'http://example.com/model' is not valid: expected a model URI: hf://org/name[@revision]"),
        ({"spec__model__uri": "s3://Bad_Bucket/x"}, "spec.model.uri: 's3://Bad_Bucket/x' is not valid: expected a model URI"),
        ({"spec__storage__endpoint": "minio:9000"}, "spec.storage.endpoint: 'minio:9000' is not valid: expected an http:// or https:// URL"),
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
        ({"spec__training__precision": "int8"}, "spec.training.precision: Input should be 'bf16', 'bf16-mixed', 'fp16' or 'fp32'"),
        ({"spec__training__learningRate": -1}, "spec.training.learningRate: Input should be greater than 0"),
        ({"spec__checkpoints": ...}, "spec.checkpoints: required field is missing"),
        ({"spec__checkpoints__uri": "gs://bucket/x"}, "spec.checkpoints.uri: 'gs://bucket/x' is not valid: expected an S3 URI: s3://bucket/prefix/"),
        ({"spec__resources__memory": "lots"}, "spec.resources.memory: 'lots' is not a Kubernetes quantity (examples: 8, 500m, 64Gi, 80G)"),
        ({"spec__resources__gpusPerNode": 17}, "spec.resources.gpusPerNode: Input should be less than or equal to 16"),
        ({"spec__resources__nodes": 2, "spec__resources__gpusPerNode": 0}, "resources.nodes > 1 needs resources.gpusPerNode >= 1"),
        ({"spec__dataset__validationSplit": 0.1, "spec__dataset__validationUri": "s3://data/v.jsonl"}, "not both"),
        ({"spec__dataset__format": "csv"}, "spec.dataset.format: Input should be 'auto', 'alpaca', 'chat' or 'text'"),
        ({"spec__storage__credentialsSecret": {"name": "s3", "accessKey": "AKIA..."}}, "spec.storage.credentialsSecret.accessKey: unknown field"),
        ({"spec__model__tokenSecret": {"name": "hf", "token": "hf_x"}}, "spec.model.tokenSecret.token: unknown field"),
        ({"spec__model__uri": "s3://models/llama/", "spec__model__tokenSecret": {"name": "hf"}},
         "spec: model.tokenSecret is for hf:// models and datasets; s3:// uses spec.storage.credentialsSecret"),
        ({"metadata__name": "x" * 51}, "metadata.name: String should have at most 50 characters"),
    ],
)
def test_bad_specs_name_the_field(patch, expected):
    msg = errors_of(job(**patch))
    assert expected in msg, msg


def test_a_bad_micro_batch_is_one_line_with_the_path_the_user_wrote():
    # Not one line per union branch (`microBatchSize.constrained-int`, `microBatchSize.literal['auto']`).
    assert errors_of(job(spec__training__microBatchSize="4")).splitlines() == [
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
    msg = errors_of(job(spec__method=method))
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
    msg = errors_of(job(spec__training__earlyStopping={"patience": 2}, spec__training__evalSteps=10))
    assert "training.earlyStopping needs validation data" in msg
    msg = errors_of(job(spec__training__earlyStopping={"patience": 2}, spec__dataset__validationSplit=0.1))
    assert "training.earlyStopping needs training.evalSteps" in msg
    assert "output.mergeAdapter is only valid" in errors_of(
        job(spec__method={"type": "full"}, spec__output={"mergeAdapter": True})
    )
    assert "qlora needs a GPU" in errors_of(job(spec__method={"type": "qlora"}, spec__resources={"gpusPerNode": 0}))


def test_several_errors_are_all_reported():
    msg = errors_of(job(spec__method__lora__rank=0, spec__training__precision="int8", spec__dataset__uri="ftp://x"))
    lines = msg.splitlines()
    assert len(lines) == 3
    assert {l.split(":")[0] for l in lines} == {"spec.method.lora.rank", "spec.training.precision", "spec.dataset.uri"}


def test_parse_spec_prefixes_spec():
    with pytest.raises(ValueError, match=r"^spec\.training: set exactly one"):
        parse_spec({**GOOD["spec"], "training": {"epochs": 1, "maxSteps": 3}})


def test_auto_batch_and_int_batch():
    assert parse_job(job(spec__training__microBatchSize="auto")).spec.training.micro_batch_size == "auto"
    assert parse_job(job(spec__training__microBatchSize=16)).spec.training.micro_batch_size == 16


@pytest.mark.parametrize("q, value", [("64Gi", 64 * 2**30), ("500m", 0.5), ("8", 8.0), (16, 16.0), ("80G", 80e9), ("1e3", 1000.0)])
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
