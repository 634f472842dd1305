"""Model architectures for the memory estimate.

A Hugging Face config.json (or an inline ``spec.model.architecture``, or a catalog entry) becomes an
:class:`Architecture`: normalized dimensions plus a table of every parameter-bearing module, so that
parameter counts (total, LoRA, frozen, quantizable) are exact sums of module shapes rather than
rules of thumb. Everything that does not depend on the training plan is computed once here.

Pure Python: no torch, no transformers. Module names and shapes follow transformers' modeling files
(``modeling_llama.py``, ``modeling_phi3.py``, ``modeling_gpt_neox.py``, ``modeling_gpt2.py``,
``modeling_bert.py``, ...) for AutoModelForCausalLM; ``tests/unit/test_estimator_real_models.py``
checks the counts against models that transformers builds from the same config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping, NamedTuple

from kubetune.errors import UsageError

# Activation groups: which tensor a linear layer reads. Adapters on modules of the same group share
# (or each copy) the same input, which is what decides activation memory (see memory.py).
ATTN_IN = "attn_in"  # output of the pre-attention norm (BERT: the layer input)
ATTN_OUT = "attn_out"  # attention output, already saved by SDPA
MLP_IN = "mlp_in"  # output of the pre-MLP norm
MLP_MID = "mlp_mid"  # MLP intermediate (act(gate) * up, or act(fc))
SHARED_MID = "shared_mid"  # MoE shared expert intermediate
HEAD_IN = "head_in"  # BERT-style LM head transform input (last hidden state)


@dataclass(frozen=True)
class Linear:
    """One nn.Linear (or GPT-2 Conv1D) in a block: what peft can adapt and bitsandbytes quantizes."""

    name: str  # leaf module name, as peft's target_modules match it
    d_in: int
    d_out: int
    bias: bool
    group: str

    @cached_property  # read in every estimate's inner sums; the dataclass is frozen, so it never changes
    def params(self) -> int:
        return self.d_in * self.d_out + (self.d_out if self.bias else 0)


@dataclass(frozen=True)
class MoE:
    experts: int
    top_k: int
    intermediate: int  # per expert
    shared_intermediate: int = 0  # qwen2_moe shared expert (0: none)

    @property
    def expert_params(self) -> int:
        # transformers >= 5 stores experts as fused 3D tensors (gate_up_proj [E, 2i, h], down_proj [E, h, i]):
        # not nn.Linear, so neither peft's all-linear nor bitsandbytes touch them.
        return 0


@dataclass(frozen=True)
class Block:
    """A transformer block (all blocks of one kind are identical)."""

    linears: tuple[Linear, ...]
    other_params: int  # norms, routers, 3D expert tensors: not Linear modules
    expert_params: int = 0  # part of other_params that are MoE expert weights
    moe: MoE | None = None
    # peft >= 0.21 with transformers 5 adapts some MoE models' router and fused 3D expert tensors under
    # all-linear (target_parameters, "ParamWrapper"): (name, LoRA params per unit of rank) per block.
    param_targets: tuple[tuple[str, int], ...] = ()

    @cached_property
    def linear_params(self) -> int:
        return sum(m.params for m in self.linears)

    @cached_property
    def params(self) -> int:
        return self.linear_params + self.other_params


@dataclass(frozen=True, eq=False)
class Architecture:
    """Normalized architecture with exact parameter bookkeeping.

    ``blocks`` is a tuple of (count, Block) so that models with two kinds of layer (Qwen-MoE dense and
    sparse layers) stay exact. Head-related modules live outside the blocks.
    """

    model_type: str
    family: str  # llama | phi3 | gpt_neox | gpt2 | bert (how a block is wired; see memory.py)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    blocks: tuple[tuple[int, Block], ...]
    embed_params: int  # input token embeddings
    other_embed_params: int  # position / token-type embeddings, embedding norm
    lm_head_params: int  # 0 when tied
    final_norm_params: int
    head_linears: tuple[Linear, ...] = ()  # LoRA-targetable linears outside blocks (BERT LM-head transform)
    head_other_params: int = 0  # head norms, output bias
    extra_frozen_params: int = 0  # parts a text fine-tune never runs (Gemma 3 vision tower)
    norm: str = "rms"  # rms | gemma | ln  (how norms save activations)
    gated_mlp: bool = True
    act: str = "silu"  # silu | gelu | gelu_new (gelu_new is element-wise python: saves more)
    act_fn: str = "silu"  # the gated MLP's activation as config.json names it (which Liger kernel fits)
    qk_norm: bool = False
    norms_per_block: int = 2
    parallel_residual: bool = False
    final_logit_softcapping: bool = False
    attn_softcapping: bool = False
    eager_attention: bool = False  # transformers has no SDPA path for this model (Gemma 2): s^2 scores stored
    sliding_window: int | None = None
    max_position_embeddings: int | None = None
    hidden_dropout: float = 0.0
    approximate: bool = False  # model_type not modelled exactly: llama-style layout assumed
    name: str | None = None  # catalog id when it came from the catalog
    disk_weight_bytes: int = 2  # bytes per parameter of the checkpoint files (config.json's dtype)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def block_params(self) -> int:
        return sum(n * b.params for n, b in self.blocks)

    @property
    def total_params(self) -> int:
        """Parameters of the base model (tied weights counted once), as ``sum(p.numel())`` reports."""
        c = self._cache.get("total")
        if c is None:
            c = (
                self.embed_params
                + self.other_embed_params
                + self.block_params
                + self.final_norm_params
                + self.lm_head_params
                + sum(m.params for m in self.head_linears)
                + self.head_other_params
                + self.extra_frozen_params
            )
            self._cache["total"] = c
        return c

    @property
    def linear_params(self) -> int:
        """Parameters inside nn.Linear modules that bitsandbytes quantizes (all but the output head)."""
        return sum(n * b.linear_params for n, b in self.blocks) + sum(m.params for m in self.head_linears)

    @property
    def largest_block_params(self) -> int:
        return max(b.params for _, b in self.blocks)

    @property
    def head_params(self) -> int:
        """Parameters outside the blocks that a run uses (embeddings, final norm, output head)."""
        return self.total_params - self.block_params - self.extra_frozen_params

    def module_names(self) -> set[str]:
        names = {m.name for _, b in self.blocks for m in b.linears}
        names.update(m.name for m in self.head_linears)
        return names

    def lora_modules(self, targets: tuple[str, ...]) -> tuple[tuple[int, Linear], ...]:
        """(count over the model, Linear) for every module LoRA adapts, as peft matches ``targets``.

        ``all-linear`` is every Linear/Conv1D but the output head (peft's rule). A name matches a
        module whose leaf name equals it (peft also matches dotted suffixes: the last component is
        used here). Unknown names raise a UsageError listing the model's module names.
        """
        key = ("lora_modules", targets)
        c = self._cache.get(key)
        if c is not None:
            return c
        names = self.module_names()
        wanted: set[str] = set()
        for t in targets:
            t = t.strip()
            if t in ("all-linear", "all_linear", "all"):
                wanted |= names
                continue
            leaf = t.rsplit(".", 1)[-1]
            if leaf not in names:
                raise UsageError(
                    f"LoRA target {t!r} is not a linear module of {self.model_type}: use all-linear or some of "
                    f"{', '.join(sorted(names))}"
                )
            wanted.add(leaf)
        out: list[tuple[int, Linear]] = []
        for n, b in self.blocks:
            out.extend((n, m) for m in b.linears if m.name in wanted)
        out.extend((1, m) for m in self.head_linears if m.name in wanted)
        res = tuple(out)
        self._cache[key] = res
        return res

    def lora_params(self, targets: tuple[str, ...], rank: int) -> int:
        """peft LoRA parameters: r * (d_in + d_out) per adapted module (lora_A, lora_B, no bias), plus
        the MoE router/expert tensors peft adapts under all-linear."""
        n = sum(c * rank * (m.d_in + m.d_out) for c, m in self.lora_modules(targets))
        if self.targets_moe_params(targets):
            n += sum(c * rank * per for c, b in self.blocks for _, per in b.param_targets)
        return n

    def targets_moe_params(self, targets: tuple[str, ...]) -> bool:
        return any(t.strip() in ("all-linear", "all_linear", "all") for t in targets) and any(
            b.param_targets for _, b in self.blocks
        )

    def summary(self) -> str:
        moe = next((b.moe for _, b in self.blocks if b.moe), None)
        s = (
            f"{self.model_type}: {self.num_layers} layers, hidden {self.hidden_size}, heads {self.num_heads}/"
            f"{self.num_kv_heads}x{self.head_dim}, mlp {self.intermediate_size}, vocab {self.vocab_size}"
        )
        if moe:
            s += f", {moe.experts} experts (top-{moe.top_k}, {moe.intermediate} wide)"
        if self.tie_word_embeddings:
            s += ", tied embeddings"
        return s


# ------------------------------------------------------------------------------------------------
# config.json -> Architecture


def _get(cfg: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        v = cfg.get(k)
        if v is not None:
            return v
    return default


def _req_int(cfg: Mapping[str, Any], where: str, *keys: str, default: Any = None) -> int:
    v = _get(cfg, *keys, default=default)
    if v is None:
        raise UsageError(f"{where}: missing {keys[0]} (needed for the memory estimate)")
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or v != v
        or v in (float("inf"), float("-inf"))
        or int(v) != v
        or v < 1
    ):
        raise UsageError(f"{where}: {keys[0]} must be a positive integer, got {v!r}")
    if v > MAX_DIM:  # bounds the arithmetic below (floats stay finite, ints stay small)
        raise UsageError(f"{where}: {keys[0]} is {v!r}, more than any model has (at most {MAX_DIM}): check it")
    return int(v)


# Hostile or careless input (issue #19): every dimension is bounded, and so is the whole model, so that
# the estimate's arithmetic stays cheap and its byte counts fit the int64 fields of status.estimate.
MAX_DIM = 1 << 40
MAX_PARAMS = 10**15  # 1,000x the largest published model: no cluster trains it


def _check_size(arch: "Architecture", where: str) -> "Architecture":
    n = arch.total_params
    if n > MAX_PARAMS:
        raise UsageError(
            f"{where}: the architecture has {n:.3g} parameters, more than {MAX_PARAMS:.0e} (num_hidden_layers "
            f"{arch.num_layers}, hidden_size {arch.hidden_size}, intermediate_size {arch.intermediate_size}, "
            f"vocab_size {arch.vocab_size}): check those fields"
        )
    return arch


# model_type -> family. Families share a block layout; the rest are dims.
LLAMA_LIKE = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmo2",
    "granite",
    "internlm2",
    "yi",
    "deepseek",
}
FAMILIES = {
    **{t: "llama" for t in LLAMA_LIKE},
    "phi3": "phi3",
    "gpt_neox": "gpt_neox",
    "gpt2": "gpt2",
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
}
# transformers' default tie_word_embeddings per model_type (used when config.json leaves it out)
_TIE_DEFAULT = {
    "gemma": True,
    "gemma2": True,
    "gemma3": True,
    "gemma3_text": True,
    "gpt2": True,
    "bert": True,
    "roberta": True,
    "xlm-roberta": True,
}
SUPPORTED = sorted(FAMILIES)
# MoE model types whose router and 3D experts peft adapts under all-linear (peft's v4->v5 conversion map)
PEFT_MOE_PARAM_TARGETS = {"mixtral", "qwen3_moe"}


def from_config(config: Mapping[str, Any], where: str = "config.json", name: str | None = None) -> Architecture:
    """Build an Architecture from config.json keys (snake_case, as on the Hub).

    ``where`` names the source in error messages (a file path, a catalog name or spec.model.uri).
    """
    if not isinstance(config, Mapping):
        raise UsageError(f"{where}: expected a JSON object (a Hugging Face config.json)")
    cfg: dict[str, Any] = dict(config)
    model_type = cfg.get("model_type")
    # What the download weighs: fp32 checkpoints (GPT-2, BERT, many small models) are twice bf16.
    # No dtype (or a pre-quantized one, smaller) is priced as bf16.
    fp32 = (cfg.get("dtype") or cfg.get("torch_dtype")) == "float32"
    disk_bytes = 4 if fp32 and not cfg.get("quantization_config") else 2
    # Multimodal wrappers (Gemma 3 4B+): the language model is text_config; the vision tower is
    # counted as frozen parameters that a text fine-tune never runs.
    extra_frozen = 0
    if isinstance(cfg.get("text_config"), Mapping):
        text = dict(cfg["text_config"])
        if model_type == "gemma3":
            extra_frozen = _gemma3_vision_params(cfg.get("vision_config") or {}, text)
        text.setdefault("model_type", {"gemma3": "gemma3_text"}.get(str(model_type), model_type))
        if "tie_word_embeddings" in cfg and "tie_word_embeddings" not in text:
            text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
        cfg, model_type = text, text["model_type"]
    if not model_type or not isinstance(model_type, str):
        raise UsageError(f"{where}: missing model_type (one of {', '.join(SUPPORTED)})")
    family = FAMILIES.get(model_type)
    approximate = family is None
    if family is None:
        # Unknown decoder: if it has the usual keys, price it as a llama-style block and say so.
        usual = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        if not all(k in cfg for k in usual):
            raise UsageError(
                f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED)}); "
                "give an inline spec.model.architecture with a supported modelType"
            )
        family = "llama"
    builder = {"llama": _llama, "phi3": _phi3, "gpt_neox": _gpt_neox, "gpt2": _gpt2, "bert": _bert}[family]
    arch = builder(cfg, model_type, where)
    if extra_frozen or approximate or name or disk_bytes != 2:
        arch = _replace(
            arch, extra_frozen_params=extra_frozen, approximate=approximate, name=name, disk_weight_bytes=disk_bytes
        )
    return _check_size(arch, where)


def _replace(a: Architecture, **kw: Any) -> Architecture:
    from dataclasses import replace

    return replace(a, _cache={}, **kw)


def _tie(cfg: Mapping[str, Any], model_type: str) -> bool:
    v = cfg.get("tie_word_embeddings")
    return bool(_TIE_DEFAULT.get(model_type, False) if v is None else v)


def _attn_dims(cfg: Mapping[str, Any], where: str, h: int) -> tuple[int, int, int]:
    heads = _req_int(cfg, where, "num_attention_heads", "n_head")
    kv = _req_int(cfg, where, "num_key_value_heads", default=heads)
    hd = cfg.get("head_dim")
    if hd is None:
        if h % heads:
            raise UsageError(f"{where}: hidden_size {h} is not divisible by num_attention_heads {heads}; set head_dim")
        hd = h // heads
    hd = _req_int({"head_dim": hd}, where, "head_dim")
    if heads % kv:
        raise UsageError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    return heads, kv, hd


class _DecoderDims(NamedTuple):
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    q_dim: int  # heads x head_dim
    kv_dim: int  # kv_heads x head_dim


def _decoder_dims(cfg: Mapping[str, Any], where: str) -> _DecoderDims:
    """The dimensions llama- and phi3-style config.json files share (read in this order: the first missing one
    is the one an error names)."""
    h = _req_int(cfg, where, "hidden_size")
    layers = _req_int(cfg, where, "num_hidden_layers")
    heads, kv, hd = _attn_dims(cfg, where, h)
    inter = _req_int(cfg, where, "intermediate_size")
    return _DecoderDims(h, layers, heads, kv, hd, inter, _req_int(cfg, where, "vocab_size"), heads * hd, kv * hd)


def _sliding_window(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and value > 0 else None


def _llama(cfg: Mapping[str, Any], model_type: str, where: str) -> Architecture:
    d = _decoder_dims(cfg, where)
    gemma = model_type.startswith("gemma")
    qk_norm = model_type in ("qwen3", "qwen3_moe", "gemma3", "gemma3_text", "olmo2")
    norms_per_block = 4 if model_type in ("gemma2", "gemma3", "gemma3_text") else 2
    norm_params = norms_per_block * d.hidden + (2 * d.head_dim if qk_norm else 0)
    if model_type == "olmo2":  # q/k norms over the whole projection
        norm_params = norms_per_block * d.hidden + d.q_dim + d.kv_dim
    blocks = _llama_blocks(cfg, model_type, where, d, _llama_attention(cfg, model_type, d), norm_params)
    act = str(_get(cfg, "hidden_act", "hidden_activation", default="silu"))
    # what the MLP computes: Gemma's modules read hidden_activation, the others hidden_act (transformers'
    # defaults where config.json leaves it out)
    act_fn = str(cfg.get("hidden_activation") or cfg.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu"))
    sliding = cfg.get("sliding_window") if (cfg.get("use_sliding_window", True) is not False) else None
    if model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and not cfg.get("use_sliding_window", False):
        sliding = None
    tie = _tie(cfg, model_type)
    return Architecture(
        model_type=model_type,
        family="llama",
        hidden_size=d.hidden,
        num_layers=d.layers,
        num_heads=d.heads,
        num_kv_heads=d.kv_heads,
        head_dim=d.head_dim,
        intermediate_size=d.intermediate,
        vocab_size=d.vocab,
        tie_word_embeddings=tie,
        blocks=blocks,
        embed_params=d.vocab * d.hidden,
        other_embed_params=0,
        lm_head_params=0 if tie else d.vocab * d.hidden,
        final_norm_params=d.hidden,
        norm="gemma" if gemma else "rms",
        gated_mlp=True,
        act="gelu" if "gelu" in act else "silu",
        act_fn=act_fn,
        qk_norm=qk_norm,
        norms_per_block=norms_per_block,
        final_logit_softcapping=bool(cfg.get("final_logit_softcapping", 30.0 if model_type == "gemma2" else None)),
        attn_softcapping=bool(cfg.get("attn_logit_softcapping", 50.0 if model_type == "gemma2" else None)),
        eager_attention=model_type == "gemma2",
        sliding_window=_sliding_window(sliding),
        max_position_embeddings=cfg.get("max_position_embeddings"),
    )


def _llama_attention(cfg: Mapping[str, Any], model_type: str, d: _DecoderDims) -> tuple[Linear, ...]:
    if model_type in ("qwen2", "qwen2_moe"):
        qkv_bias, o_bias = bool(cfg.get("qkv_bias", True)), False
    else:
        qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
    return (
        Linear("q_proj", d.hidden, d.q_dim, qkv_bias, ATTN_IN),
        Linear("k_proj", d.hidden, d.kv_dim, qkv_bias, ATTN_IN),
        Linear("v_proj", d.hidden, d.kv_dim, qkv_bias, ATTN_IN),
        Linear("o_proj", d.q_dim, d.hidden, o_bias, ATTN_OUT),
    )


def _gated_mlp(hidden: int, inter: int, bias: bool, down_group: str = MLP_MID) -> tuple[Linear, ...]:
    return (
        Linear("gate_proj", hidden, inter, bias, MLP_IN),
        Linear("up_proj", hidden, inter, bias, MLP_IN),
        Linear("down_proj", inter, hidden, bias, down_group),
    )


def _llama_blocks(
    cfg: Mapping[str, Any], model_type: str, where: str, d: _DecoderDims, attn: tuple[Linear, ...], norm_params: int
) -> tuple[tuple[int, Block], ...]:
    """(count, Block): every layer dense, or the sparse (MoE) layers and the dense ones among them."""
    dense = Block(attn + _gated_mlp(d.hidden, d.intermediate, bool(cfg.get("mlp_bias", False))), norm_params)
    if not (_get(cfg, "num_local_experts", "num_experts", default=0) or 0):
        return ((d.layers, dense),)
    sparse = _moe_block(cfg, model_type, where, d, attn, norm_params)
    # Qwen-MoE: layer i is sparse iff i not in mlp_only_layers and (i+1) % decoder_sparse_step == 0
    step = _req_int(cfg, where, "decoder_sparse_step", default=1)
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise UsageError(f"{where}: mlp_only_layers must be a list of layer indices, got {only!r}")
    # closed form, never a loop over the layers (a hostile num_hidden_layers must not freeze us):
    # the multiples of step, less the listed dense layers among them
    layers = d.layers
    n_sparse = layers // step - sum(1 for i in set(only) if 0 <= i < layers and (i + 1) % step == 0)
    blocks: list[tuple[int, Block]] = []
    if n_sparse:
        blocks.append((n_sparse, sparse))
    if layers - n_sparse:
        blocks.append((layers - n_sparse, dense))
    return tuple(blocks)


def _moe_block(
    cfg: Mapping[str, Any], model_type: str, where: str, d: _DecoderDims, attn: tuple[Linear, ...], norm_params: int
) -> Block:
    """A sparse layer: the router and the experts' fused 3D tensors (not Linears), an optional shared expert."""
    h = d.hidden
    top_k = _req_int(cfg, where, "num_experts_per_tok", default=2)
    moe_i = _req_int(cfg, where, "moe_intermediate_size", "intermediate_size")
    shared_i = int(cfg.get("shared_expert_intermediate_size") or 0) if model_type == "qwen2_moe" else 0
    n_experts = _req_int(cfg, where, "num_local_experts", "num_experts")
    experts = n_experts * 3 * h * moe_i
    shared: tuple[Linear, ...] = ()
    if shared_i:
        shared = _gated_mlp(h, shared_i, False, SHARED_MID) + (Linear("shared_expert_gate", h, 1, False, MLP_IN),)
    # peft maps all-linear on these v5 MoE layouts to the router weight (rank r) and the experts'
    # gate_up_proj (rank 2r: gate and up fused) and down_proj (rank r), each stacked over the experts
    ptargets: tuple[tuple[str, int], ...] = ()
    if model_type in PEFT_MOE_PARAM_TARGETS:
        ptargets = (
            ("gate", h + n_experts),
            ("gate_up_proj", 2 * n_experts * (h + 2 * moe_i)),
            ("down_proj", n_experts * (moe_i + h)),
        )
    return Block(
        attn + shared, norm_params + n_experts * h + experts, experts, MoE(n_experts, top_k, moe_i, shared_i), ptargets
    )


def _phi3(cfg: Mapping[str, Any], model_type: str, where: str) -> Architecture:
    d = _decoder_dims(cfg, where)
    h, inter = d.hidden, d.intermediate
    lin = (
        Linear("qkv_proj", h, d.q_dim + 2 * d.kv_dim, False, ATTN_IN),
        Linear("o_proj", d.q_dim, h, False, ATTN_OUT),
        Linear("gate_up_proj", h, 2 * inter, False, MLP_IN),
        Linear("down_proj", inter, h, False, MLP_MID),
    )
    tie = _tie(cfg, model_type)
    return Architecture(
        model_type=model_type,
        family="phi3",
        hidden_size=h,
        num_layers=d.layers,
        num_heads=d.heads,
        num_kv_heads=d.kv_heads,
        head_dim=d.head_dim,
        intermediate_size=inter,
        vocab_size=d.vocab,
        tie_word_embeddings=tie,
        blocks=((d.layers, Block(lin, 2 * h)),),
        embed_params=d.vocab * h,
        other_embed_params=0,
        lm_head_params=0 if tie else d.vocab * h,
        final_norm_params=h,
        norm="rms",
        act_fn=str(cfg.get("hidden_act") or "silu"),
        sliding_window=_sliding_window(cfg.get("sliding_window")),
        max_position_embeddings=cfg.get("max_position_embeddings"),
    )


def _gpt_neox(cfg: Mapping[str, Any], model_type: str, where: str) -> Architecture:
    h = _req_int(cfg, where, "hidden_size")
    L = _req_int(cfg, where, "num_hidden_layers")
    heads = _req_int(cfg, where, "num_attention_heads")
    inter = _req_int(cfg, where, "intermediate_size", default=4 * h)
    V = _req_int(cfg, where, "vocab_size")
    bias = bool(cfg.get("attention_bias", True))
    lin = (
        Linear("query_key_value", h, 3 * h, bias, ATTN_IN),
        Linear("dense", h, h, bias, ATTN_OUT),
        Linear("dense_h_to_4h", h, inter, True, MLP_IN),
        Linear("dense_4h_to_h", inter, h, True, MLP_MID),
    )
    tie = _tie(cfg, model_type)
    return Architecture(
        model_type=model_type,
        family="gpt_neox",
        hidden_size=h,
        num_layers=L,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=h // heads,
        intermediate_size=inter,
        vocab_size=V,
        tie_word_embeddings=tie,
        blocks=((L, Block(lin, 4 * h)),),
        embed_params=V * h,
        other_embed_params=0,
        lm_head_params=0 if tie else V * h,
        final_norm_params=2 * h,
        norm="ln",
        gated_mlp=False,
        act="gelu",
        parallel_residual=bool(cfg.get("use_parallel_residual", True)),
        max_position_embeddings=cfg.get("max_position_embeddings"),
    )


def _gpt2(cfg: Mapping[str, Any], model_type: str, where: str) -> Architecture:
    h = _req_int(cfg, where, "n_embd", "hidden_size")
    L = _req_int(cfg, where, "n_layer", "num_hidden_layers")
    heads = _req_int(cfg, where, "n_head", "num_attention_heads")
    inter = _req_int(cfg, where, "n_inner", "intermediate_size", default=4 * h)
    V = _req_int(cfg, where, "vocab_size")
    npos = _req_int(cfg, where, "n_positions", "max_position_embeddings", default=1024)
    lin = (
        Linear("c_attn", h, 3 * h, True, ATTN_IN),
        Linear("c_proj", h, h, True, ATTN_OUT),
        Linear("c_fc", h, inter, True, MLP_IN),
        Linear("c_proj", inter, h, True, MLP_MID),
    )
    tie = _tie(cfg, model_type)
    act = str(cfg.get("activation_function", "gelu_new"))
    return Architecture(
        model_type=model_type,
        family="gpt2",
        hidden_size=h,
        num_layers=L,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=h // heads,
        intermediate_size=inter,
        vocab_size=V,
        tie_word_embeddings=tie,
        blocks=((L, Block(lin, 4 * h)),),
        embed_params=V * h,
        other_embed_params=npos * h,
        lm_head_params=0 if tie else V * h,
        final_norm_params=2 * h,
        norm="ln",
        gated_mlp=False,
        act="gelu_new" if act in ("gelu_new", "gelu_pytorch_tanh_python") else "gelu",
        max_position_embeddings=npos,
    )


def _bert(cfg: Mapping[str, Any], model_type: str, where: str) -> Architecture:
    """BERT-style encoders as AutoModelForCausalLM builds them (BertLMHeadModel / RobertaForCausalLM):
    no pooler; an LM head (dense + LayerNorm + decoder tied to the word embeddings + output bias)."""
    h = _req_int(cfg, where, "hidden_size")
    L = _req_int(cfg, where, "num_hidden_layers")
    heads = _req_int(cfg, where, "num_attention_heads")
    inter = _req_int(cfg, where, "intermediate_size", default=4 * h)
    V = _req_int(cfg, where, "vocab_size")
    npos = _req_int(cfg, where, "max_position_embeddings", default=512)
    ntype = int(cfg.get("type_vocab_size", 2) or 0)
    lin = (
        Linear("query", h, h, True, ATTN_IN),
        Linear("key", h, h, True, ATTN_IN),
        Linear("value", h, h, True, ATTN_IN),
        Linear("dense", h, h, True, ATTN_OUT),
        Linear("dense", h, inter, True, MLP_IN),
        Linear("dense", inter, h, True, MLP_MID),
    )
    tie = _tie(cfg, model_type)
    return Architecture(
        model_type=model_type,
        family="bert",
        hidden_size=h,
        num_layers=L,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=h // heads,
        intermediate_size=inter,
        vocab_size=V,
        tie_word_embeddings=tie,
        blocks=((L, Block(lin, 4 * h)),),
        embed_params=V * h,
        other_embed_params=npos * h + ntype * h + 2 * h,
        lm_head_params=0 if tie else V * h,
        final_norm_params=0,
        head_linears=(Linear("dense", h, h, True, HEAD_IN),),
        head_other_params=2 * h + V,
        norm="ln",
        gated_mlp=False,
        act="gelu",
        max_position_embeddings=npos,
        hidden_dropout=float(cfg.get("hidden_dropout_prob", 0.1) or 0.0),
    )


def _gemma3_vision_params(vision: Mapping[str, Any], text: Mapping[str, Any]) -> int:
    """SigLIP vision tower + Gemma 3 multimodal projector (frozen; unused by text-only training)."""
    vh = int(vision.get("hidden_size", 1152))
    vi = int(vision.get("intermediate_size", 4304))
    vl = int(vision.get("num_hidden_layers", 27))
    patch = max(1, int(vision.get("patch_size", 14)))
    img = int(vision.get("image_size", 896))
    ch = int(vision.get("num_channels", 3))
    th = int(text.get("hidden_size", 2560))
    emb = ch * patch * patch * vh + vh + (img // patch) ** 2 * vh
    layer = 4 * (vh * vh + vh) + 2 * (2 * vh) + (vh * vi + vi) + (vi * vh + vh)
    return emb + vl * layer + 2 * vh + vh * th + vh


def from_model_architecture(ma: Any, where: str = "spec.model.architecture") -> Architecture:
    """From the API's inline ModelArchitecture (camelCase on the wire, config.json keys in Python)."""
    cfg = ma.to_hf_config()
    if cfg.get("moe_intermediate_size") is None and cfg.get("num_local_experts"):
        cfg["moe_intermediate_size"] = cfg["intermediate_size"]
    return from_config(cfg, where)
