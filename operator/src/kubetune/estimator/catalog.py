"""Built-in catalog of popular open models, so that ``hf://`` names estimate offline.

Each entry is the part of the model's public config.json that the estimate needs (architecture
dimensions are public facts, copied from the model repositories' config.json). Keys are Hugging Face
repo ids; every entry also answers to a short lower-case alias (the repo name without the org, e.g.
``llama-3.1-8b``) and to its -Instruct / -it variants, which share the base model's dimensions.
tests/unit/test_estimator_catalog.py checks parameter totals against the published sizes.
"""

from __future__ import annotations

from typing import Any

# (model_type, hidden, layers, heads, kv_heads, head_dim|None, intermediate, vocab, tied, max_pos, extra)
_E = tuple[str, int, int, int, int, "int | None", int, int, bool, int, dict]

_ENTRIES: dict[str, _E] = {
    # Meta Llama (gated repos; dims from config.json)
    "meta-llama/Llama-3.2-1B": ("llama", 2048, 16, 32, 8, 64, 8192, 128256, True, 131072, {}),
    "meta-llama/Llama-3.2-3B": ("llama", 3072, 28, 24, 8, 128, 8192, 128256, True, 131072, {}),
    "meta-llama/Llama-3.1-8B": ("llama", 4096, 32, 32, 8, 128, 14336, 128256, False, 131072, {}),
    "meta-llama/Meta-Llama-3-8B": ("llama", 4096, 32, 32, 8, 128, 14336, 128256, False, 8192, {}),
    "meta-llama/Llama-3.1-70B": ("llama", 8192, 80, 64, 8, 128, 28672, 128256, False, 131072, {}),
    "meta-llama/Llama-3.3-70B-Instruct": ("llama", 8192, 80, 64, 8, 128, 28672, 128256, False, 131072, {}),
    "meta-llama/Meta-Llama-3-70B": ("llama", 8192, 80, 64, 8, 128, 28672, 128256, False, 8192, {}),
    "meta-llama/Llama-3.1-405B": ("llama", 16384, 126, 128, 8, 128, 53248, 128256, False, 131072, {}),
    "meta-llama/Llama-2-7b-hf": ("llama", 4096, 32, 32, 32, 128, 11008, 32000, False, 4096, {}),
    "meta-llama/Llama-2-13b-hf": ("llama", 5120, 40, 40, 40, 128, 13824, 32000, False, 4096, {}),
    "meta-llama/Llama-2-70b-hf": ("llama", 8192, 80, 64, 8, 128, 28672, 32000, False, 4096, {}),
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": ("llama", 2048, 22, 32, 4, 64, 5632, 32000, False, 2048, {}),
    "HuggingFaceTB/SmolLM2-135M": ("llama", 576, 30, 9, 3, 64, 1536, 49152, True, 8192, {}),
    "HuggingFaceTB/SmolLM2-360M": ("llama", 960, 32, 15, 5, 64, 2560, 49152, True, 8192, {}),
    "HuggingFaceTB/SmolLM2-1.7B": ("llama", 2048, 24, 32, 32, 64, 8192, 49152, True, 8192, {}),
    # Mistral
    "mistralai/Mistral-7B-v0.1": (
        "mistral",
        4096,
        32,
        32,
        8,
        128,
        14336,
        32000,
        False,
        32768,
        {"sliding_window": 4096},
    ),
    "mistralai/Mistral-7B-v0.3": ("mistral", 4096, 32, 32, 8, 128, 14336, 32768, False, 32768, {}),
    "mistralai/Mistral-Nemo-Base-2407": ("mistral", 5120, 40, 32, 8, 128, 14336, 131072, False, 1024000, {}),
    "mistralai/Mistral-Small-24B-Base-2501": ("mistral", 5120, 40, 32, 8, 128, 32768, 131072, False, 32768, {}),
    "mistralai/Mixtral-8x7B-v0.1": (
        "mixtral",
        4096,
        32,
        32,
        8,
        128,
        14336,
        32000,
        False,
        32768,
        {"num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    "mistralai/Mixtral-8x22B-v0.1": (
        "mixtral",
        6144,
        56,
        48,
        8,
        128,
        16384,
        32768,
        False,
        65536,
        {"num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    # Qwen2.5
    "Qwen/Qwen2.5-0.5B": ("qwen2", 896, 24, 14, 2, 64, 4864, 151936, True, 32768, {}),
    "Qwen/Qwen2.5-1.5B": ("qwen2", 1536, 28, 12, 2, 128, 8960, 151936, True, 131072, {}),
    "Qwen/Qwen2.5-3B": ("qwen2", 2048, 36, 16, 2, 128, 11008, 151936, True, 32768, {}),
    "Qwen/Qwen2.5-7B": ("qwen2", 3584, 28, 28, 4, 128, 18944, 152064, False, 131072, {}),
    "Qwen/Qwen2.5-14B": ("qwen2", 5120, 48, 40, 8, 128, 13824, 152064, False, 131072, {}),
    "Qwen/Qwen2.5-32B": ("qwen2", 5120, 64, 40, 8, 128, 27648, 152064, False, 131072, {}),
    "Qwen/Qwen2.5-72B": ("qwen2", 8192, 80, 64, 8, 128, 29568, 152064, False, 131072, {}),
    "Qwen/Qwen2-7B": ("qwen2", 3584, 28, 28, 4, 128, 18944, 152064, False, 131072, {}),
    # Qwen3
    "Qwen/Qwen3-0.6B": ("qwen3", 1024, 28, 16, 8, 128, 3072, 151936, True, 40960, {}),
    "Qwen/Qwen3-1.7B": ("qwen3", 2048, 28, 16, 8, 128, 6144, 151936, True, 40960, {}),
    "Qwen/Qwen3-4B": ("qwen3", 2560, 36, 32, 8, 128, 9728, 151936, True, 40960, {}),
    "Qwen/Qwen3-8B": ("qwen3", 4096, 36, 32, 8, 128, 12288, 151936, False, 40960, {}),
    "Qwen/Qwen3-14B": ("qwen3", 5120, 40, 40, 8, 128, 17408, 151936, False, 40960, {}),
    "Qwen/Qwen3-32B": ("qwen3", 5120, 64, 64, 8, 128, 25600, 151936, False, 40960, {}),
    "Qwen/Qwen3-30B-A3B": (
        "qwen3_moe",
        2048,
        48,
        32,
        4,
        128,
        6144,
        151936,
        False,
        40960,
        {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768},
    ),
    "Qwen/Qwen3-235B-A22B": (
        "qwen3_moe",
        4096,
        94,
        64,
        4,
        128,
        12288,
        151936,
        False,
        40960,
        {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1536},
    ),
    "Qwen/Qwen1.5-MoE-A2.7B": (
        "qwen2_moe",
        2048,
        24,
        16,
        16,
        128,
        5632,
        151936,
        False,
        8192,
        {
            "num_experts": 60,
            "num_experts_per_tok": 4,
            "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632,
        },
    ),
    # Gemma
    "google/gemma-2-2b": ("gemma2", 2304, 26, 8, 4, 256, 9216, 256000, True, 8192, {"sliding_window": 4096}),
    "google/gemma-2-9b": ("gemma2", 3584, 42, 16, 8, 256, 14336, 256000, True, 8192, {"sliding_window": 4096}),
    "google/gemma-2-27b": ("gemma2", 4608, 46, 32, 16, 128, 36864, 256000, True, 8192, {"sliding_window": 4096}),
    "google/gemma-3-1b-pt": ("gemma3_text", 1152, 26, 4, 1, 256, 6912, 262144, True, 32768, {"sliding_window": 512}),
    "google/gemma-3-4b-pt": ("gemma3", 2560, 34, 8, 4, 256, 10240, 262208, True, 131072, {"sliding_window": 1024}),
    "google/gemma-3-12b-pt": ("gemma3", 3840, 48, 16, 8, 256, 15360, 262208, True, 131072, {"sliding_window": 1024}),
    "google/gemma-3-27b-pt": ("gemma3", 5376, 62, 32, 16, 128, 21504, 262208, True, 131072, {"sliding_window": 1024}),
    # Phi (phi3 architecture)
    "microsoft/Phi-3-mini-4k-instruct": (
        "phi3",
        3072,
        32,
        32,
        32,
        96,
        8192,
        32064,
        False,
        4096,
        {"sliding_window": 2047},
    ),
    "microsoft/Phi-3.5-mini-instruct": ("phi3", 3072, 32, 32, 32, 96, 8192, 32064, False, 131072, {}),
    "microsoft/Phi-3-medium-4k-instruct": (
        "phi3",
        5120,
        40,
        40,
        10,
        128,
        17920,
        32064,
        False,
        4096,
        {"sliding_window": 2047},
    ),
    "microsoft/phi-4": ("phi3", 5120, 40, 40, 10, 128, 17920, 100352, False, 16384, {}),
    "microsoft/Phi-4-mini-instruct": ("phi3", 3072, 32, 24, 8, 128, 8192, 200064, True, 131072, {}),
    # GPT-NeoX (Pythia)
    "EleutherAI/pythia-160m": ("gpt_neox", 768, 12, 12, 12, None, 3072, 50304, False, 2048, {}),
    "EleutherAI/pythia-410m": ("gpt_neox", 1024, 24, 16, 16, None, 4096, 50304, False, 2048, {}),
    "EleutherAI/pythia-1b": ("gpt_neox", 2048, 16, 8, 8, None, 8192, 50304, False, 2048, {}),
    "EleutherAI/pythia-1.4b": ("gpt_neox", 2048, 24, 16, 16, None, 8192, 50304, False, 2048, {}),
    "EleutherAI/pythia-2.8b": ("gpt_neox", 2560, 32, 32, 32, None, 10240, 50304, False, 2048, {}),
    "EleutherAI/pythia-6.9b": ("gpt_neox", 4096, 32, 32, 32, None, 16384, 50432, False, 2048, {}),
    "EleutherAI/pythia-12b": ("gpt_neox", 5120, 36, 40, 40, None, 20480, 50688, False, 2048, {}),
    # GPT-2
    "openai-community/gpt2": ("gpt2", 768, 12, 12, 12, None, 3072, 50257, True, 1024, {}),
    "openai-community/gpt2-medium": ("gpt2", 1024, 24, 16, 16, None, 4096, 50257, True, 1024, {}),
    "openai-community/gpt2-large": ("gpt2", 1280, 36, 20, 20, None, 5120, 50257, True, 1024, {}),
    "openai-community/gpt2-xl": ("gpt2", 1600, 48, 25, 25, None, 6400, 50257, True, 1024, {}),
    # BERT-style encoders (as AutoModelForCausalLM builds them: LM head, no pooler)
    "google-bert/bert-base-uncased": ("bert", 768, 12, 12, 12, None, 3072, 30522, True, 512, {"type_vocab_size": 2}),
    "google-bert/bert-large-uncased": ("bert", 1024, 24, 16, 16, None, 4096, 30522, True, 512, {"type_vocab_size": 2}),
    "FacebookAI/roberta-base": ("roberta", 768, 12, 12, 12, None, 3072, 50265, True, 514, {"type_vocab_size": 1}),
    "FacebookAI/roberta-large": ("roberta", 1024, 24, 16, 16, None, 4096, 50265, True, 514, {"type_vocab_size": 1}),
}

# Instruct / chat variants share their base model's dimensions.
_VARIANTS: dict[str, str] = {
    "meta-llama/Llama-3.2-1B-Instruct": "meta-llama/Llama-3.2-1B",
    "meta-llama/Llama-3.2-3B-Instruct": "meta-llama/Llama-3.2-3B",
    "meta-llama/Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",
    "meta-llama/Meta-Llama-3-8B-Instruct": "meta-llama/Meta-Llama-3-8B",
    "meta-llama/Llama-3.1-70B-Instruct": "meta-llama/Llama-3.1-70B",
    "meta-llama/Meta-Llama-3-70B-Instruct": "meta-llama/Meta-Llama-3-70B",
    "meta-llama/Llama-3.1-405B-Instruct": "meta-llama/Llama-3.1-405B",
    "meta-llama/Llama-2-7b-chat-hf": "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-13b-chat-hf": "meta-llama/Llama-2-13b-hf",
    "meta-llama/Llama-2-70b-chat-hf": "meta-llama/Llama-2-70b-hf",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M",
    "HuggingFaceTB/SmolLM2-360M-Instruct": "HuggingFaceTB/SmolLM2-360M",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "HuggingFaceTB/SmolLM2-1.7B",
    "mistralai/Mistral-7B-Instruct-v0.1": "mistralai/Mistral-7B-v0.1",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistralai/Mistral-7B-v0.3",
    "mistralai/Mistral-Nemo-Instruct-2407": "mistralai/Mistral-Nemo-Base-2407",
    "mistralai/Mistral-Small-24B-Instruct-2501": "mistralai/Mistral-Small-24B-Base-2501",
    "mistralai/Mixtral-8x7B-Instruct-v0.1": "mistralai/Mixtral-8x7B-v0.1",
    "mistralai/Mixtral-8x22B-Instruct-v0.1": "mistralai/Mixtral-8x22B-v0.1",
    "google/gemma-2-2b-it": "google/gemma-2-2b",
    "google/gemma-2-9b-it": "google/gemma-2-9b",
    "google/gemma-2-27b-it": "google/gemma-2-27b",
    "google/gemma-3-1b-it": "google/gemma-3-1b-pt",
    "google/gemma-3-4b-it": "google/gemma-3-4b-pt",
    "google/gemma-3-12b-it": "google/gemma-3-12b-pt",
    "google/gemma-3-27b-it": "google/gemma-3-27b-pt",
    "Qwen/Qwen2-7B-Instruct": "Qwen/Qwen2-7B",
    "Qwen/Qwen1.5-MoE-A2.7B-Chat": "Qwen/Qwen1.5-MoE-A2.7B",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "bert-base-uncased": "google-bert/bert-base-uncased",
    "bert-large-uncased": "google-bert/bert-large-uncased",
    "roberta-base": "FacebookAI/roberta-base",
    "roberta-large": "FacebookAI/roberta-large",
}
for _size in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B"):
    _VARIANTS[f"Qwen/Qwen2.5-{_size}-Instruct"] = f"Qwen/Qwen2.5-{_size}"
    _VARIANTS[f"Qwen/Qwen2.5-Coder-{_size}"] = f"Qwen/Qwen2.5-{_size}"
    _VARIANTS[f"Qwen/Qwen2.5-Coder-{_size}-Instruct"] = f"Qwen/Qwen2.5-{_size}"
for _size in ("0.6B", "1.7B", "4B", "8B", "14B", "32B", "30B-A3B", "235B-A22B"):
    _VARIANTS[f"Qwen/Qwen3-{_size}-Base"] = f"Qwen/Qwen3-{_size}"


def _config(entry: _E) -> dict[str, Any]:
    mt, h, L, a, kv, hd, i, V, tied, mp, extra = entry
    if mt == "gpt2":
        cfg: dict[str, Any] = {
            "model_type": mt,
            "n_embd": h,
            "n_layer": L,
            "n_head": a,
            "n_inner": i,
            "vocab_size": V,
            "n_positions": mp,
            "tie_word_embeddings": tied,
        }
    else:
        cfg = {
            "model_type": mt,
            "hidden_size": h,
            "num_hidden_layers": L,
            "num_attention_heads": a,
            "num_key_value_heads": kv,
            "intermediate_size": i,
            "vocab_size": V,
            "tie_word_embeddings": tied,
            "max_position_embeddings": mp,
        }
        if hd is not None:
            cfg["head_dim"] = hd
    cfg.update(extra)
    if mt == "gemma3":  # the multimodal wrapper: text_config + the SigLIP vision tower
        cfg = {"model_type": "gemma3", "text_config": {**cfg, "model_type": "gemma3_text"}, "vision_config": {}}
    return cfg


CATALOG: dict[str, dict[str, Any]] = {k: _config(v) for k, v in _ENTRIES.items()}
for _k, _base in _VARIANTS.items():
    if "/" in _k:
        CATALOG[_k] = CATALOG[_base]

ALIASES: dict[str, str] = {}
for _k in list(CATALOG):
    ALIASES.setdefault(_k.split("/", 1)[1].lower(), _k)
for _k, _base in _VARIANTS.items():
    if "/" not in _k:
        ALIASES[_k.lower()] = _base
# friendly short names
ALIASES.update(
    {
        "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
        "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
        "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
        "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
        "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
        "llama-3.3-70b": "meta-llama/Llama-3.3-70B-Instruct",
        "llama-3.1-405b": "meta-llama/Llama-3.1-405B",
        "llama-2-7b": "meta-llama/Llama-2-7b-hf",
        "llama-2-13b": "meta-llama/Llama-2-13b-hf",
        "llama-2-70b": "meta-llama/Llama-2-70b-hf",
        "mistral-7b": "mistralai/Mistral-7B-v0.3",
        "mistral-7b-v0.1": "mistralai/Mistral-7B-v0.1",
        "mistral-nemo-12b": "mistralai/Mistral-Nemo-Base-2407",
        "mistral-small-24b": "mistralai/Mistral-Small-24B-Base-2501",
        "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
        "mixtral-8x22b": "mistralai/Mixtral-8x22B-v0.1",
        "gemma-3-1b": "google/gemma-3-1b-pt",
        "gemma-3-4b": "google/gemma-3-4b-pt",
        "gemma-3-12b": "google/gemma-3-12b-pt",
        "gemma-3-27b": "google/gemma-3-27b-pt",
        "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
        "phi-3.5-mini": "microsoft/Phi-3.5-mini-instruct",
        "phi-3-medium": "microsoft/Phi-3-medium-4k-instruct",
        "phi-4": "microsoft/phi-4",
        "phi-4-mini": "microsoft/Phi-4-mini-instruct",
        "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
    }
)


def lookup(name: str) -> tuple[str, dict[str, Any]] | None:
    """(canonical repo id, config) for a repo id (any case) or alias; None when unknown.

    ``name`` may carry an ``hf://`` prefix and an ``@revision`` suffix; both are ignored.
    """
    n = name.strip()
    if n.startswith("hf://"):
        n = n[5:]
    n = n.split("@", 1)[0].strip("/")
    if n in CATALOG:
        return n, CATALOG[n]
    low = n.lower()
    for k in CATALOG:
        if k.lower() == low:
            return k, CATALOG[k]
    if low in ALIASES:
        k = ALIASES[low]
        return k, CATALOG[k]
    return None


def names() -> list[str]:
    return sorted(CATALOG)
