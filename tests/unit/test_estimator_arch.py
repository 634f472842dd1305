"""Architectures: config.json parsing, the catalog, exact parameter counts."""
from __future__ import annotations

import pytest

from kubetune.api.v1alpha1 import ModelSource
from kubetune.errors import UsageError
from kubetune.estimator import ArchitectureNotFound, catalog, catalog_architecture, from_config, resolve_architecture

# Published totals (model cards / safetensors metadata): exact where the number is exact.
EXACT = {
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "meta-llama/Llama-3.2-3B": 3_212_749_824,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "Qwen/Qwen3-0.6B": 596_049_920,
    "google/gemma-2-2b": 2_614_341_888,
    "google/gemma-2-9b": 9_241_705_984,
    "google/gemma-3-1b-pt": 999_885_952,
    "google/gemma-3-4b-pt": 4_300_079_472,
    "google/gemma-3-27b-pt": 27_432_406_640,
    "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552,
    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,
    "openai-community/gpt2": 124_439_808,
    "EleutherAI/pythia-160m": 162_322_944,
}
# Rounded published sizes (billions)
ROUNDED = {
    "meta-llama/Llama-3.1-70B": 70.55, "meta-llama/Llama-3.1-405B": 405.85, "meta-llama/Llama-2-7b-hf": 6.74,
    "Qwen/Qwen2.5-1.5B": 1.54, "Qwen/Qwen2.5-3B": 3.09, "Qwen/Qwen2.5-14B": 14.77, "Qwen/Qwen2.5-32B": 32.76,
    "Qwen/Qwen2.5-72B": 72.71, "Qwen/Qwen3-8B": 8.19, "Qwen/Qwen3-30B-A3B": 30.53, "Qwen/Qwen3-235B-A22B": 235.09,
    "mistralai/Mistral-Nemo-Base-2407": 12.25, "mistralai/Mixtral-8x22B-v0.1": 140.63, "google/gemma-2-27b": 27.23,
    "google/gemma-3-12b-pt": 12.19, "microsoft/phi-4": 14.66, "Qwen/Qwen1.5-MoE-A2.7B": 14.32,
    "EleutherAI/pythia-6.9b": 6.86, "openai-community/gpt2-xl": 1.56, "HuggingFaceTB/SmolLM2-1.7B": 1.71,
}


@pytest.mark.parametrize("name,total", sorted(EXACT.items()))
def test_exact_published_totals(name, total):
    assert catalog_architecture(name).total_params == total


@pytest.mark.parametrize("name,billions", sorted(ROUNDED.items()))
def test_rounded_published_totals(name, billions):
    assert catalog_architecture(name).total_params / 1e9 == pytest.approx(billions, abs=0.01)


def test_every_catalog_entry_builds():
    for n in catalog.names():
        a = catalog_architecture(n)
        assert a.total_params > 1e8 and a.name == n


@pytest.mark.parametrize("name", ["llama-3.1-8b", "hf://meta-llama/Llama-3.1-8B@main", "META-LLAMA/llama-3.1-8b",
                                  "Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"])
def test_aliases_and_revisions(name):
    assert catalog_architecture(name).total_params == 8_030_261_248


def test_lora_params_llama_all_linear_and_subsets():
    a = catalog_architecture("llama-3.1-8b")
    assert a.lora_params(("all-linear",), 16) == 41_943_040  # calibration trainable_params
    # q,v only: r * ((4096+4096) + (4096+1024)) per layer
    assert a.lora_params(("q_proj", "v_proj"), 8) == 32 * 8 * (8192 + 5120)
    assert a.lora_params(("model.layers.0.self_attn.q_proj",), 8) == 32 * 8 * 8192  # dotted names: leaf matched
    with pytest.raises(UsageError, match="c_attn"):
        a.lora_params(("c_attn",), 8)


def test_config_json_keys_of_each_family():
    gpt2 = from_config({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257})
    assert gpt2.total_params == 124_439_808
    assert {m.name for _, b in gpt2.blocks for m in b.linears} == {"c_attn", "c_proj", "c_fc"}
    phi = catalog_architecture("phi-3-mini")
    assert {m.name for _, b in phi.blocks for m in b.linears} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    neox = catalog_architecture("EleutherAI/pythia-160m")
    assert {m.name for _, b in neox.blocks for m in b.linears} == {"query_key_value", "dense", "dense_h_to_4h",
                                                                  "dense_4h_to_h"}
    # nested text_config (Gemma 3 multimodal): the vision tower counts as frozen parameters
    g3 = catalog_architecture("gemma-3-4b")
    assert g3.model_type == "gemma3_text" and g3.extra_frozen_params > 4e8


def test_unknown_model_type_is_approximated_or_rejected():
    a = from_config({"model_type": "olmo3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "intermediate_size": 128, "vocab_size": 100})
    assert a.approximate
    with pytest.raises(UsageError, match="model_type 'mamba' is not supported"):
        from_config({"model_type": "mamba", "hidden_size": 64}, "x/config.json")


@pytest.mark.parametrize("cfg,msg", [
    ({"hidden_size": 64}, "missing model_type"),
    ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 10},
     "missing intermediate_size"),
    ({"model_type": "llama", "hidden_size": -1, "num_hidden_layers": 2, "num_attention_heads": 4,
      "intermediate_size": 8, "vocab_size": 10}, "hidden_size must be a positive integer"),
    ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 6,
      "intermediate_size": 8, "num_key_value_heads": 4, "head_dim": 16, "vocab_size": 10},
     "not a multiple of num_key_value_heads"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_config_names_file_and_rule(cfg, msg):
    with pytest.raises(UsageError, match=msg) as e:
        from_config(cfg, "models/x/config.json")
    assert "models/x/config.json" in str(e.value)


def test_resolve_inline_then_catalog_then_reader():
    inline = ModelSource.model_validate({"uri": "s3://models/m/", "architecture": {
        "modelType": "qwen2", "hiddenSize": 896, "numHiddenLayers": 24, "numAttentionHeads": 14, "numKeyValueHeads": 2,
        "intermediateSize": 4864, "vocabSize": 151936, "tieWordEmbeddings": True}})
    assert resolve_architecture(inline).total_params == 494_032_768
    assert resolve_architecture(ModelSource(uri="hf://Qwen/Qwen2.5-7B@v1")).total_params == 7_615_616_512
    seen = []

    def reader(uri):
        seen.append(uri)
        return '{"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, ' \
               '"num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": true}'

    assert resolve_architecture(ModelSource(uri="pvc://models/llama"), reader).total_params == 1_235_814_400
    assert seen == ["pvc://models/llama"]


def test_resolve_errors_name_the_uri():
    with pytest.raises(ArchitectureNotFound,
                       match=r"spec.model.uri hf://acme/secret-model: not in kubetune's model catalog"):
        resolve_architecture(ModelSource(uri="hf://acme/secret-model"))

    def broken(uri):
        raise OSError("403 Forbidden")

    with pytest.raises(ArchitectureNotFound, match="403 Forbidden") as e:
        resolve_architecture(ModelSource(uri="s3://bucket/m/"), broken)
    assert "spec.model.architecture" in str(e.value)
    with pytest.raises(ArchitectureNotFound, match="not valid JSON"):
        resolve_architecture(ModelSource(uri="s3://bucket/m/"), lambda uri: "{nope")
