"""Tiny real models and data for tests and the local demo: a random-init Llama or Qwen2 with a
word-level tokenizer and chat template, built in seconds on CPU (no hub downloads), and small JSONL
data sets in the three formats whose answers a few dozen steps can learn."""
from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
INIT_RANGE = 0.2  # logits of a usable scale, so adapters over frozen heads can learn in a few steps
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]

FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "lime", "mango", "melon", "peach", "pear", "plum", "kiwi"]
COLORS = ["red", "yellow", "crimson", "purple", "yellow", "green", "orange", "green", "pink", "green", "violet", "brown"]
ANIMALS = ["cat", "dog", "cow", "hen", "pig", "fox", "owl", "bee"]
SOUNDS = ["meow", "woof", "moo", "cluck", "oink", "yip", "hoot", "buzz"]


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        i = rng.randrange(len(FRUITS))
        if rng.random() < 0.5:
            rows.append({"instruction": f"What color is the {FRUITS[i]} ?", "input": "", "output": f"The {FRUITS[i]} is {COLORS[i]} ."})
        else:
            j = rng.randrange(len(ANIMALS))
            rows.append({"instruction": "What does this animal say ?", "input": ANIMALS[j],
                         "output": f"The {ANIMALS[j]} says {SOUNDS[j]} {SOUNDS[j]} ."})
    return rows


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        i, j = rng.randrange(len(FRUITS)), rng.randrange(len(ANIMALS))
        rows.append({"messages": [
            {"role": "system", "content": "You answer briefly ."},
            {"role": "user", "content": f"What color is the {FRUITS[i]} ?"},
            {"role": "assistant", "content": f"The {FRUITS[i]} is {COLORS[i]} ."},
            {"role": "user", "content": f"And the {ANIMALS[j]} ?"},
            {"role": "assistant", "content": f"The {ANIMALS[j]} says {SOUNDS[j]} ."},
        ]})
    return rows


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """{prompt, chosen, rejected}: the chosen response is the prompt's words reversed, the rejected one
    random words of the same length, so the preference is learnable and the responses equally long."""
    rng = random.Random(seed)
    words = FRUITS + ANIMALS + SOUNDS
    rows = []
    for _ in range(n):
        prompt = [rng.choice(words) for _ in range(4)]
        rows.append({"prompt": " ".join(prompt), "chosen": " ".join(reversed(prompt)),
                     "rejected": " ".join(rng.choice(words) for _ in range(4))})
    return rows


def kto_rows(n: int, seed: int = 0) -> list[dict]:
    """KTO's unpaired {prompt, completion, label}: each preference pair as one desirable and one
    undesirable example."""
    return [r for p in preference_rows(n, seed) for r in (
        {"prompt": p["prompt"], "completion": p["chosen"], "label": True},
        {"prompt": p["prompt"], "completion": p["rejected"], "label": False})]


def text_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randrange(len(ANIMALS))
        words = [f"the {ANIMALS[(k + t) % len(ANIMALS)]} says {SOUNDS[(k + t) % len(SOUNDS)]} ." for t in range(4)]
        rows.append({"text": " ".join(words)})
    return rows


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Write rows; raw_lines maps a 1-based line number to a literal line to put there instead."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows]
    for lineno, raw in sorted((raw_lines or {}).items()):
        lines.insert(lineno - 1, raw)
    path.write_text("\n".join(lines) + "\n")
    return path


def _corpus() -> list[str]:
    from kubetune_trainer.data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    texts = [ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, "You answer briefly . What color is the And ? says"]
    texts += [" ".join(FRUITS + COLORS + ANIMALS + SOUNDS)]
    texts += [json.dumps(r) for r in alpaca_rows(50)]
    return texts


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_corpus(), trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=SPECIALS[4:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def build_model_dir(out: Path, seed: int = 0, family: str = "llama") -> Path:
    """A tiny random-init model plus tokenizer in out (a transformers model directory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    # family: a transformers model_type (llama, qwen2, gemma2, ...) at the same tiny dims
    moe = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
               shared_expert_intermediate_size=64) if family in ("mixtral", "qwen2_moe", "qwen3_moe") else {}
    # grouped-query attention where the type has it: GPT-2 and GPT-NeoX would keep the attribute unused,
    # and peft's prefix tuning would read it
    gqa = dict(num_key_value_heads=2, head_dim=16) if family not in ("gpt2", "gpt_neox") else {}
    cfg = AutoConfig.for_model(
        family, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=False,
        initializer_range=INIT_RANGE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **gqa, **moe)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(out))
    return out


