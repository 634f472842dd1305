"""The FineTuneJob API, kubetune.io/v1alpha1.

These models are the single source of truth: the CRD in crds/ is generated from them
(`kubetune crd`), the operator parses custom resources with them, and the trainer reads its
rendered config through them. Descriptions here are what `kubectl explain` prints.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final, Literal, get_args

from pydantic import Field, PlainValidator, WithJsonSchema, field_validator

from kubetune.api import registry
from kubetune.api.base import (
    CONFIG_KEY,
    DNS1035_LABEL,
    DNS1123_SUBDOMAIN,
    LABEL_VALUE,
    PATTERN_HELP,
    QUALIFIED_NAME_HELP,
    UNSAFE_CHARS,
    KModel,
    Rule,
    StatusModel,
    bounded_quantity,
    cel_in,
    cel_not_in,
    full_match,
    is_qualified_name,
    one_of,
    qualified_name_cel,
)
from kubetune.api.constants import CONDITION_TYPES, PHASES

GROUP = "kubetune.io"
VERSION = "v1alpha1"
# Final: the models' apiVersion and kind fields are Literals of these
API_VERSION: Final = "kubetune.io/v1alpha1"  # f"{GROUP}/{VERSION}", spelled out for the type checker
KIND: Final = "FineTuneJob"
assert API_VERSION == f"{GROUP}/{VERSION}"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]

# Job and pod names are derived from the FineTuneJob name (<name>-r<run>, then the Job
# controller's pod suffix), and must stay within the 63-character label limit.
MAX_NAME_LENGTH = 50

# Free-form path characters: anything but controls and (Unicode) spaces, spelled out so the
# apiserver (Go: ASCII \s) and pydantic (Rust: Unicode \s) refuse exactly the same URIs.
_P = f"[^{UNSAFE_CHARS}]"
_P_NO_AT = f"[^@{UNSAFE_CHARS}]"
HF_URI = r"^hf://([A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$"
# a dataset may name a file, a folder or a glob inside its repository (after org/name)
HF_DATA_URI = rf"^hf://[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*(/{_P_NO_AT}+)?)?(@[A-Za-z0-9._/-]+)?$"
S3_URI = rf"^s3://[a-z0-9][a-z0-9.-]{{1,61}}[a-z0-9](/{_P}*)?$"
PVC_URI = rf"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/{_P}*)?$"
FILE_URI = rf"^file:///{_P}*$"


def _any_of(*patterns: str) -> str:
    return "^(" + "|".join(p.strip("^$") for p in patterns) + ")$"


MODEL_URI = _any_of(HF_URI, S3_URI, PVC_URI, FILE_URI)
DATA_URI = _any_of(S3_URI, PVC_URI, HF_DATA_URI, FILE_URI)
S3_ONLY = S3_URI

# Secret, ConfigMap, ServiceAccount and PriorityClass names: the pod spec refuses anything else
NAME_PATTERN = DNS1123_SUBDOMAIN
# scheme://host[:port][/path]: no user:password@ (a credential in plain text, echoed by HTTP
# libraries), no ?query or #fragment (an S3 client appends its own path and query)
_HOST = r"([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])"
URL_PATTERN = rf"^https?://{_HOST}(:[0-9]{{1,5}})?(/[^?#{UNSAFE_CHARS}]*)?$"
# [registry[:port]/]path[:tag][@digest], as github.com/distribution/reference parses it
IMAGE_PATTERN = (
    r"^([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*(:[0-9]{1,5})?/)?"
    r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*"
    r"(:[A-Za-z0-9_][-A-Za-z0-9_.]{0,127})?(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,})?$"
)
# a module name as peft's target_modules matches it (q_proj, mlp.down_proj, all-linear)
MODULE_PATTERN = r"^[A-Za-z0-9_][-A-Za-z0-9_.]*$"
# botocore's own rule for a region name (it goes into endpoint host names)
REGION_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?$"

URL_HELP = (
    "an http:// or https:// URL: scheme, host, optional :port and /path, without user:password@ (credentials "
    "go in storage.credentialsSecret), ?query or #fragment"
)

URI_HELP = (
    "hf://org/name[@revision] (Hugging Face Hub), s3://bucket/prefix/ (S3 or an S3-compatible "
    "store, see spec.storage), pvc://claim/path (a PersistentVolumeClaim in the job's namespace), "
    "or file:///path (a path inside the trainer container)"
)

PATTERN_HELP.update(
    {
        MODEL_URI: "a model URI: hf://org/name[@revision], s3://bucket/prefix/, pvc://claim/path or file:///path",
        DATA_URI: "a data URI: s3://bucket/file.jsonl, pvc://claim/path, hf://org/dataset[/path][@revision] or file:///path",
        S3_ONLY: "an S3 URI: s3://bucket/prefix/ (bucket: 3-63 lowercase letters, digits, dots or dashes)",
        IMAGE_PATTERN: "a container image reference: [registry[:port]/]path[:tag][@sha256:digest], e.g. "
        "ghcr.io/org/trainer:1.2 (lowercase path, no spaces)",
        MODULE_PATTERN: "a module name: letters, digits, '_', '-' and '.', e.g. q_proj or all-linear",
        REGION_PATTERN: "an S3 region: letters, digits and '-', e.g. us-east-1",
    }
)

# ---------------------------------------------------------------------------------------------
# model


# Maxima for inline architecture dims: several times the largest real models (Llama 3.1 405B:
# 126 layers, hidden 16384, intermediate 53248; Gemma 3: vocab 262144; Kimi K2: 384 experts;
# Llama 4 Scout: 10M positions), yet small enough that a parameter count stays far inside int64
# (layers x experts x 3 x hidden x intermediate < 2^56).
MAX_LAYERS = 1024
MAX_HIDDEN = 65536
MAX_INTERMEDIATE = 262144
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_VOCAB = 4194304
MAX_EXPERTS = 1024
MAX_POSITIONS = 2**24


class ModelArchitecture(KModel):
    """The transformer dimensions that drive the memory estimate. Field names are the camelCase
    forms of the Hugging Face config.json keys, so an inline architecture and a config.json are
    interchangeable. Each dimension has a maximum several times the largest real model's."""

    model_type: str = Field(
        description="Architecture family as in config.json model_type: llama, mistral, qwen2, qwen3, "
        "qwen2_moe, qwen3_moe, mixtral, gemma2, gemma3_text, phi3, gpt_neox, gpt2, bert, ...",
        max_length=64,
    )
    hidden_size: int = Field(
        ge=1,
        le=MAX_HIDDEN,
        description="Width of the residual stream (config.json hidden_size), "
        f"at most {MAX_HIDDEN} (4x Llama 3.1 405B's).",
    )
    num_hidden_layers: int = Field(
        ge=1,
        le=MAX_LAYERS,
        description=f"Number of transformer blocks, at most {MAX_LAYERS} (8x the deepest real model's).",
    )
    num_attention_heads: int = Field(ge=1, le=MAX_HEADS, description=f"Number of query heads, at most {MAX_HEADS}.")
    num_key_value_heads: int | None = Field(
        None,
        ge=1,
        le=MAX_HEADS,
        description="Number of key/value heads (grouped-query attention); defaults to "
        "numAttentionHeads, and may not exceed it.",
    )
    head_dim: int | None = Field(
        None,
        ge=1,
        le=MAX_HEAD_DIM,
        description=f"Per-head dimension; defaults to hiddenSize / numAttentionHeads; at most {MAX_HEAD_DIM}.",
    )
    intermediate_size: int = Field(
        ge=1,
        le=MAX_INTERMEDIATE,
        description="Width of the MLP (per expert for MoE models), "
        f"at most {MAX_INTERMEDIATE} (about 5x the widest real model's).",
    )
    vocab_size: int = Field(
        ge=1,
        le=MAX_VOCAB,
        description="Vocabulary size; sets the size of the embeddings and the "
        f"logits; at most {MAX_VOCAB} (16x Gemma 3's).",
    )
    tie_word_embeddings: bool = Field(False, description="Whether the output head shares the input embedding matrix.")
    max_position_embeddings: int | None = Field(
        None,
        ge=1,
        le=MAX_POSITIONS,
        description=f"Longest sequence the model was trained for, at most {MAX_POSITIONS} (2^24).",
    )
    num_local_experts: int | None = Field(
        None,
        ge=1,
        le=MAX_EXPERTS,
        description=f"MoE: experts per layer (Mixtral num_local_experts, Qwen num_experts), at most {MAX_EXPERTS}.",
    )
    num_experts_per_tok: int | None = Field(
        None, ge=1, le=MAX_EXPERTS, description="MoE: experts each token is routed to; at most numLocalExperts."
    )
    moe_intermediate_size: int | None = Field(
        None,
        ge=1,
        le=MAX_INTERMEDIATE,
        description="MoE: MLP width of each expert when it differs from intermediateSize.",
    )

    rules: ClassVar = (
        Rule(
            cel="!has(self.numKeyValueHeads) || self.numKeyValueHeads <= self.numAttentionHeads",
            message="model.architecture.numKeyValueHeads must be at most numAttentionHeads (each key/value head "
            "serves a group of query heads)",
            check=lambda a: a.num_key_value_heads is None or a.num_key_value_heads <= a.num_attention_heads,
            field_path=".numKeyValueHeads",
        ),
        Rule(
            cel="!has(self.numExpertsPerTok) || !has(self.numLocalExperts) || self.numExpertsPerTok <= "
            "self.numLocalExperts",
            message="model.architecture.numExpertsPerTok must be at most numLocalExperts (a token is routed to some "
            "of the experts)",
            check=lambda a: (
                a.num_experts_per_tok is None
                or a.num_local_experts is None
                or a.num_experts_per_tok <= a.num_local_experts
            ),
            field_path=".numExpertsPerTok",
        ),
    )

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json equivalent (snake_case keys)."""
        return self.model_dump(by_alias=False, exclude_none=True)


class TokenSecretRef(KModel):
    """A Hugging Face token from a Secret in the job's namespace. The token is never written inline."""

    name: str = Field(max_length=253, pattern=NAME_PATTERN, description="Secret name.")
    key: str = Field("HF_TOKEN", max_length=253, pattern=CONFIG_KEY, description="Key in the Secret holding the token.")


class ModelSource(KModel):
    """Where the base model comes from."""

    uri: str = Field(
        description=f"Base model location: {URI_HELP}. Examples: hf://meta-llama/Llama-3.1-8B, "
        "s3://models/llama-3.1-8b/.",
        pattern=MODEL_URI,
        max_length=1024,
    )
    architecture: ModelArchitecture | None = Field(
        None,
        description="Inline architecture for the memory estimate, used when the model is not in kubetune's "
        "catalog and its config.json cannot be read by the operator (e.g. a private pvc:// model).",
    )
    trust_remote_code: bool = Field(
        False, description="Allow custom modelling code shipped with the model (transformers trust_remote_code)."
    )
    token_secret: TokenSecretRef | None = Field(
        None,
        description="Secret with a Hugging Face token, for gated or private hf:// models (meta-llama/*) and "
        "datasets: the trainer gets it as HF_TOKEN and the operator reads the model's config.json with it.",
    )


# ---------------------------------------------------------------------------------------------
# dataset


# "auto" detects the format from the first line; each kind of objective data reads its own formats
if TYPE_CHECKING:
    # The registry's names make these Literals at runtime; mypy cannot evaluate a computed Literal, so to
    # it they are str (pydantic still checks the values)
    DatasetFormat = str
else:
    DatasetFormat = Literal[("auto",) + tuple(f for fs in registry.DATA_FORMATS.values() for f in fs)]


class Dataset(KModel):
    """Training data: JSON Lines, one example per line, or Parquet, one per row."""

    uri: str = Field(
        description="Training data (a .jsonl or .parquet file, or a prefix holding such files; an hf:// dataset "
        "trains on its train split when its files name one, or on the file, folder or glob a path after org/name "
        f"names: hf://HuggingFaceH4/ultrachat_200k/data/train_sft-*.parquet): {URI_HELP}.",
        pattern=DATA_URI,
        max_length=1024,
    )
    format: DatasetFormat = Field(
        "auto",
        description="Line (or row) format. alpaca: {instruction, input?, output}; chat: {messages: [{role, content}]} "
        "or ShareGPT {conversations: [{from, value}], system?}, rendered with the tokenizer's chat template; "
        "text: {text}. auto detects it from the first line. For alpaca and chat, only response tokens count in "
        "the loss. Preference objectives (objective.type dpo, orpo, simpo) read preference: {prompt, chosen, "
        "rejected}, each a string or chat messages [{role, content}] (the chosen and rejected responses continue "
        "the prompt); kto reads kto: {prompt, completion, label} with label true for a desirable completion and "
        "false for an undesirable one. The loss counts only the response tokens.",
    )
    validation_uri: str | None = Field(
        None,
        description="Separate validation data, same formats (an hf:// dataset: its validation split, else its "
        f"test split, when its files name them; or the path it names): {URI_HELP}.",
        pattern=DATA_URI,
        max_length=1024,
    )
    validation_split: float | None = Field(
        None, gt=0, lt=1, description="Fraction of the training data held out for validation (e.g. 0.05)."
    )
    test_uri: str | None = Field(
        None,
        description="Separate test data, same formats, only read by the end-of-run evaluation (base vs tuned): "
        f"{URI_HELP}.",
        pattern=DATA_URI,
        max_length=1024,
    )
    test_split: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Fraction of the training data held out as a test set (e.g. 0.2): never trained on, never used "
        "for early stopping or the best checkpoint, only by the end-of-run evaluation. Deterministic given "
        "training.seed, and disjoint from the validation split.",
    )
    max_seq_length: int = Field(
        2048, ge=8, le=1048576, description="Longest tokenized example in tokens; longer examples are truncated."
    )
    packing: bool = Field(
        False,
        description="Pack several examples into each sequence of maxSeqLength tokens (no padding, attention kept "
        "within each example). Faster; the memory estimate assumes full-length sequences either way. Only with "
        "objective.type sft.",
    )
    on_bad_line: Literal["fail", "skip"] = Field(
        "fail",
        description="What to do with a malformed line or row: fail (the run stops and names the file and line "
        "numbers) "
        "or skip (the line is dropped and counted in status.result.metrics.skippedLines).",
    )

    rules: ClassVar = (
        Rule(
            cel="!(has(self.validationUri) && has(self.validationSplit))",
            message="set dataset.validationUri or dataset.validationSplit, not both",
            check=lambda d: not (d.validation_uri and d.validation_split),
        ),
        Rule(
            cel="!(has(self.testUri) && has(self.testSplit))",
            message="set dataset.testUri or dataset.testSplit, not both",
            check=lambda d: not (d.test_uri and d.test_split),
        ),
        Rule(
            cel="!has(self.testSplit) || !has(self.validationSplit) || self.testSplit + self.validationSplit < 1.0",
            message="dataset.validationSplit plus dataset.testSplit must leave training data (their sum below 1)",
            check=lambda d: not (d.test_split and d.validation_split) or d.test_split + d.validation_split < 1,
        ),
    )


# ---------------------------------------------------------------------------------------------
# method


class LoraSettings(KModel):
    """Low-rank adapter settings (peft LoraConfig)."""

    rank: int = Field(16, ge=1, le=1024, description="Adapter rank r.")
    alpha: int = Field(32, ge=1, le=4096, description="Scaling numerator: updates are scaled by alpha/rank.")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the adapter input. Non-zero costs activation memory."
    )
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128, pattern=MODULE_PATTERN)]] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        description="Module names to adapt, e.g. [q_proj, v_proj], or [all-linear] for every linear layer but the "
        "output head.",
    )


class Quantization(KModel):
    """How QLoRA quantizes the frozen base weights (bitsandbytes)."""

    bits: Literal[4, 8] = Field(4, description="4 (NF4/FP4, the QLoRA paper's setting) or 8 (LLM.int8).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; ignored for 8 bits.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")


class FreezeSettings(KModel):
    """Partial fine-tuning: everything is frozen except the top transformer blocks."""

    trainable_layers: int = Field(ge=1, le=1024, description="Number of top transformer blocks to train (k).")
    train_embeddings: bool = Field(False, description="Also train the input embeddings and the output head.")


if TYPE_CHECKING:  # a computed Literal, as DatasetFormat
    MethodType = str
else:
    MethodType = Literal[registry.METHOD_NAMES]
# The registry's facts each rule reads (which methods take method.lora, which need a GPU, ...)
_LORA_METHODS = registry.method_names(settings="lora")
_QUANTIZED_METHODS = registry.method_names(quantized=True)
_FREEZE_METHODS = registry.method_names(settings="freeze")
_VIRTUAL_TOKEN_METHODS = registry.method_names(settings="virtualTokens")
_MERGEABLE_METHODS = registry.method_names(mergeable=True)
_ADAPTER_METHODS = registry.method_names(adapter=True)


class Method(KModel):
    """How the model is fine-tuned."""

    type: MethodType = Field(
        description="full: every weight; lora: low-rank adapters; qlora: adapters over a 4- or 8-bit base; "
        "freeze: train only the top k blocks; prompt-tuning / prefix-tuning: learned virtual tokens."
    )
    lora: LoraSettings | None = Field(
        None, description=f"Adapter settings; only with type {one_of(_LORA_METHODS)} (defaults apply when omitted)."
    )
    quantization: Quantization | None = Field(
        None,
        description=f"Base-weight quantization; only with type {one_of(_QUANTIZED_METHODS)} (defaults to 4-bit NF4).",
    )
    freeze: FreezeSettings | None = Field(
        None, description=f"Which layers train; required with type {one_of(_FREEZE_METHODS)}."
    )
    virtual_tokens: int | None = Field(
        None,
        ge=1,
        le=4096,
        description=f"Number of virtual tokens; only with {one_of(_VIRTUAL_TOKEN_METHODS)} (default 20).",
    )

    rules: ClassVar = (
        Rule(
            cel="!has(self.lora) || " + cel_in("self.type", _LORA_METHODS),
            message=f"method.lora is only valid with method.type {one_of(_LORA_METHODS)}",
            check=lambda m: m.lora is None or m.type in _LORA_METHODS,
            field_path=".lora",
        ),
        Rule(
            cel="!has(self.quantization) || " + cel_in("self.type", _QUANTIZED_METHODS),
            message=f"method.quantization is only valid with method.type {one_of(_QUANTIZED_METHODS)}",
            check=lambda m: m.quantization is None or m.type in _QUANTIZED_METHODS,
            field_path=".quantization",
        ),
        Rule(
            cel=f"({cel_in('self.type', _FREEZE_METHODS)}) == has(self.freeze)",
            message=f"method.freeze (with trainableLayers) is required for method.type {one_of(_FREEZE_METHODS)} "
            "and invalid otherwise",
            check=lambda m: (m.type in _FREEZE_METHODS) == (m.freeze is not None),
        ),
        Rule(
            cel="!has(self.virtualTokens) || " + cel_in("self.type", _VIRTUAL_TOKEN_METHODS),
            message=f"method.virtualTokens is only valid with method.type {one_of(_VIRTUAL_TOKEN_METHODS)}",
            check=lambda m: m.virtual_tokens is None or m.type in _VIRTUAL_TOKEN_METHODS,
            field_path=".virtualTokens",
        ),
    )

    @property
    def info(self) -> registry.MethodInfo:
        return registry.method(self.type)

    @property
    def effective_lora(self) -> LoraSettings:
        return self.lora or LoraSettings()

    @property
    def effective_quantization(self) -> Quantization:
        return self.quantization or Quantization()

    @property
    def effective_virtual_tokens(self) -> int:
        return self.virtual_tokens or 20


# ---------------------------------------------------------------------------------------------
# objective

if TYPE_CHECKING:  # a computed Literal, as DatasetFormat
    ObjectiveType = str
else:
    ObjectiveType = Literal[registry.OBJECTIVE_NAMES]
_OBJ = registry.OBJECTIVES
_BETA_OBJECTIVES = tuple(n for n, o in _OBJ.items() if o.default_beta is not None)
_LOSS_OBJECTIVES = tuple(n for n, o in _OBJ.items() if o.loss_variants)
_SMOOTHING_OBJECTIVES = tuple(n for n, o in _OBJ.items() if o.smoothing_losses)
_GAMMA_OBJECTIVES = registry.objective_names(gamma=True)
_WEIGHT_OBJECTIVES = registry.objective_names(label_weights=True)
_REFERENCE_OBJECTIVES = registry.objective_names(reference=True)
_NO_REFERENCE_OBJECTIVES = registry.objective_names(reference=False)
_SFT_DATA_OBJECTIVES = registry.objective_names(data="sft")
if TYPE_CHECKING:  # computed Literals, as DatasetFormat (ReferenceMode's few names spelled out, checked below)
    LossVariant = str
    ReferenceMode = Literal["implicit", "copy", "precomputed"]
else:
    LossVariant = Literal[tuple(dict.fromkeys(v for o in _OBJ.values() for v in o.loss_variants))]
    ReferenceMode = Literal[registry.REFERENCE_MODES]
    assert get_args(ReferenceMode) == ("implicit", "copy", "precomputed")  # the TYPE_CHECKING spelling


def _only_with(field: str, cel_field: str, names: tuple[str, ...], attr: str, why: str = "") -> Rule:
    """objective.<field> is valid only with the objective types ``names``."""
    return Rule(
        cel=f"!has(self.{cel_field}) || " + cel_in("self.type", names),
        message=f"objective.{field} is only valid with objective.type {one_of(names)}{why}",
        check=lambda o: getattr(o, attr) is None or o.type in names,
        field_path=f".{cel_field}",
    )


def _smoothing_cel() -> str:
    # per objective: its type, and a loss that takes smoothing (an unset loss is the objective's default)
    parts = []
    for n in _SMOOTHING_OBJECTIVES:
        o = _OBJ[n]
        loss = cel_in("self.loss", o.smoothing_losses)
        unset = "!has(self.loss)" if o.loss_variants[0] in o.smoothing_losses else "false"
        parts.append(f"(self.type == '{n}' && ({unset} || {loss}))")
    return "!has(self.labelSmoothing) || " + " || ".join(parts)


def _smoothing_ok(o: "TrainingObjective") -> bool:
    return o.label_smoothing is None or (
        o.type in _SMOOTHING_OBJECTIVES and o.effective_loss in _OBJ[o.type].smoothing_losses
    )


def _smoothing_words() -> str:
    out = []
    for n in _SMOOTHING_OBJECTIVES:
        o = _OBJ[n]
        default = " (the default)" if o.smoothing_losses == o.loss_variants[:1] else ""
        out.append(f"objective.type {n} and objective.loss {one_of(o.smoothing_losses)}{default}")
    return "; or ".join(out)


class TrainingObjective(KModel):
    """What the training optimizes: supervised fine-tuning (sft, the default) or a preference objective.
    Settings left out take the objective's defaults; a setting another objective uses is refused."""

    type: ObjectiveType = Field(
        "sft",
        description="sft: next-token loss on the responses; dpo: direct preference optimization on {prompt, "
        "chosen, rejected} pairs against a reference model; orpo: SFT plus an odds-ratio preference term, no "
        "reference; kto: Kahneman-Tversky optimization on unpaired {prompt, completion, label} examples against "
        "a reference model; simpo: length-normalized preference optimization with a target margin, no reference.",
    )
    beta: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Strength of the preference term (DPO/KTO: how far the policy may move from the reference; "
        "ORPO: the odds-ratio weight; SimPO: the reward scale). Default: "
        + ", ".join(f"{n} {_OBJ[n].default_beta:g}" for n in _BETA_OBJECTIVES)
        + ". Not with sft.",
    )
    loss: LossVariant | None = Field(
        None,
        description="DPO's loss: sigmoid (the paper's, default), ipo (squared, for preferences that are "
        "nearly deterministic) or hinge (SLiC). Only with dpo.",
    )
    label_smoothing: float | None = Field(
        None,
        ge=0,
        lt=0.5,
        description="Assumed probability that a preference label is flipped (conservative "
        "DPO, robust DPO's noise rate), from 0 up to 0.5. Only with dpo and loss sigmoid. Default 0.",
    )
    reference: ReferenceMode | None = Field(
        None,
        description="The reference model dpo and kto compare against. implicit: the base model with the "
        "adapters disabled (adapter methods; no extra memory); copy: a frozen second copy of the model in GPU "
        "memory; precomputed: the reference log-probs are computed in one pass before training, and no reference "
        "model is kept. Default: implicit with an adapter method, copy with full or freeze.",
    )
    gamma: float | None = Field(
        None,
        ge=0,
        le=100,
        description="SimPO's target reward margin (default 0.5). Only with simpo.",
    )
    desirable_weight: float | None = Field(
        None,
        gt=0,
        le=100,
        description="KTO's weight on desirable (label true) examples (default 1). Only with kto.",
    )
    undesirable_weight: float | None = Field(
        None,
        gt=0,
        le=100,
        description="KTO's weight on undesirable (label false) examples (default 1); raise it "
        "when they are fewer. Only with kto.",
    )

    rules: ClassVar = (
        _only_with("beta", "beta", _BETA_OBJECTIVES, "beta"),
        _only_with("loss", "loss", _LOSS_OBJECTIVES, "loss"),
        Rule(
            cel=_smoothing_cel(),
            message=f"objective.labelSmoothing is only valid with {_smoothing_words()}",
            check=_smoothing_ok,
            field_path=".labelSmoothing",
        ),
        _only_with("gamma", "gamma", _GAMMA_OBJECTIVES, "gamma"),
        _only_with("desirableWeight", "desirableWeight", _WEIGHT_OBJECTIVES, "desirable_weight"),
        _only_with("undesirableWeight", "undesirableWeight", _WEIGHT_OBJECTIVES, "undesirable_weight"),
        _only_with(
            "reference",
            "reference",
            _REFERENCE_OBJECTIVES,
            "reference",
            f": {one_of(_NO_REFERENCE_OBJECTIVES, 'and')} use no reference model",
        ),
    )

    @property
    def info(self) -> registry.ObjectiveInfo:
        return registry.objective(self.type)

    # The defaults, in one place for the trainer and the estimator (unset fields stay unset in the spec).
    @property
    def effective_beta(self) -> float | None:
        return self.beta if self.beta is not None else self.info.default_beta

    @property
    def effective_loss(self) -> str | None:
        variants = self.info.loss_variants
        return self.loss if self.loss is not None else (variants[0] if variants else None)

    @property
    def effective_label_smoothing(self) -> float:
        return self.label_smoothing if self.label_smoothing is not None else 0.0

    @property
    def effective_gamma(self) -> float | None:
        return self.gamma if self.gamma is not None else self.info.default_gamma

    @property
    def effective_desirable_weight(self) -> float:
        return self.desirable_weight if self.desirable_weight is not None else registry.DEFAULT_LABEL_WEIGHT

    @property
    def effective_undesirable_weight(self) -> float:
        return self.undesirable_weight if self.undesirable_weight is not None else registry.DEFAULT_LABEL_WEIGHT

    def effective_reference(self, method: str) -> Literal["none", "implicit", "copy", "precomputed"]:
        """The reference model for ``method`` (a method.type): none for objectives without one; unset, the
        adapters-off base for an adapter method (free), else a frozen copy."""
        if not self.info.reference:
            return "none"
        if self.reference is not None:
            return self.reference
        return "implicit" if registry.method(method).adapter else "copy"


def _objective_is(names: tuple[str, ...]) -> str:
    """CEL on the spec: the objective's type is one of ``names`` (no objective, or no type, is sft)."""
    default = TrainingObjective.model_fields["type"].default
    test = cel_in("self.objective.type", names)
    if default in names:
        return f"(!has(self.objective) || !has(self.objective.type) || {test})"
    return f"(has(self.objective) && has(self.objective.type) && {test})"


# Why each kind of objective data needs its formats (the format rule's message says it)
_DATA_WHY = {
    "sft": "(preference and kto data need a preference objective)",
    "paired": "(they train on {prompt, chosen, rejected} pairs)",
    "unpaired": "(it trains on unpaired {prompt, completion, label} examples)",
}


def _format_rule(kind: str) -> Rule:
    names = registry.objective_names(data=kind)
    allowed = ("auto",) + registry.DATA_FORMATS[kind]
    return Rule(
        cel=f"!{_objective_is(names)} || !has(self.dataset.format) || " + cel_in("self.dataset.format", allowed),
        message=f"dataset.format must be {one_of(allowed)} with objective.type {one_of(names)} {_DATA_WHY[kind]}",
        check=lambda s: s.effective_objective.type not in names or s.dataset.format in allowed,
        field_path=".dataset.format",
    )


_OBJECTIVE_SPEC_RULES = (
    Rule(
        cel="!has(self.objective) || !has(self.objective.reference) || self.objective.reference != 'implicit' || "
        + cel_in("self.method.type", _ADAPTER_METHODS),
        message=f"objective.reference implicit needs an adapter method (method.type {one_of(_ADAPTER_METHODS)}): "
        "it disables the adapters to get the base model; with method.type "
        f"{one_of(registry.method_names(adapter=False))} use copy or precomputed",
        check=lambda s: s.objective is None or s.objective.reference != "implicit" or s.method.type in _ADAPTER_METHODS,
        field_path=".objective.reference",
    ),
    Rule(
        cel="!has(self.objective) || !has(self.objective.reference) || self.objective.reference != 'copy' || "
        + cel_not_in("self.method.type", _QUANTIZED_METHODS),
        message=f"objective.reference copy cannot be used with method.type {one_of(_QUANTIZED_METHODS)}: the copy "
        "would be a second quantized base model, while the base with the adapters disabled is the same reference "
        "at no memory cost; use implicit (the default) or precomputed",
        check=lambda s: (
            s.objective is None or s.objective.reference != "copy" or s.method.type not in _QUANTIZED_METHODS
        ),
        field_path=".objective.reference",
    ),
    *(_format_rule(kind) for kind in registry.DATA_FORMATS),
    Rule(
        cel="!has(self.dataset.packing) || !self.dataset.packing || " + _objective_is(_SFT_DATA_OBJECTIVES),
        message=f"dataset.packing is only valid with objective.type {one_of(_SFT_DATA_OBJECTIVES)} (preference "
        "objectives score each whole sequence on its own)",
        check=lambda s: not s.dataset.packing or s.effective_objective.type in _SFT_DATA_OBJECTIVES,
        field_path=".dataset.packing",
    ),
)


# ---------------------------------------------------------------------------------------------
# training

MICRO_BATCH_RULE = "must be an integer from 1 to 4096, or 'auto'"
# Step counts and batch sizes far past any real run, and far inside int64 (the trainer's and
# the status' integers): a careless 1e20 is refused instead of overflowing downstream.
MAX_STEPS = 100_000_000
MAX_EFFECTIVE_BATCH = 1_048_576
# Job durations (Job.spec.activeDeadlineSeconds is int64, ttlSecondsAfterFinished int32)
MAX_SECONDS = 366 * 24 * 3600


def _int_or_auto(v: Any) -> int | str:
    # One validator, not a union: a union reports each failed branch (`.constrained-int`,
    # `.literal['auto']`) as a separate field path, which is not what a user wrote.
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096):
        return v
    raise ValueError(f"{MICRO_BATCH_RULE} (got {v!r})")


IntOrAuto = Annotated[
    int | Literal["auto"],
    PlainValidator(_int_or_auto),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "x-kubernetes-validations": [
                {
                    "rule": "type(self) == int ? self >= 1 && self <= 4096 : self == 'auto'",
                    "message": f"microBatchSize {MICRO_BATCH_RULE}",
                }
            ],
        }
    ),
]


class EarlyStopping(KModel):
    """Stop when the validation metric stops improving. Needs validation data."""

    patience: int = Field(3, ge=1, le=1000, description="Evaluations without improvement before stopping.")
    metric: Literal["eval_loss"] = Field("eval_loss", description="Metric to watch (lower is better).")
    min_delta: float = Field(0.0, ge=0, description="Smallest decrease that counts as an improvement.")


class Training(KModel):
    """Optimization settings."""

    epochs: float | None = Field(
        None, gt=0, le=1000, description="Passes over the training data. Set exactly one of epochs and maxSteps."
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description=f"Optimizer steps to run. Set exactly one of epochs and maxSteps. At most {MAX_STEPS:,}.",
    )
    micro_batch_size: IntOrAuto = Field(
        "auto",
        description="Sequences per GPU per forward pass, or auto: the largest that fits the chosen GPU "
        "(gradient accumulation is then adjusted so the effective batch stays the same).",
    )
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096, description="Micro batches per optimizer step.")
    effective_batch_size: int | None = Field(
        None,
        ge=1,
        le=MAX_EFFECTIVE_BATCH,
        description="Sequences per optimizer step across all GPUs. With microBatchSize auto, gradient accumulation "
        "is derived from it; defaults to microBatchSize x gradientAccumulationSteps x GPUs. At most "
        f"{MAX_EFFECTIVE_BATCH:,}.",
    )
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    scheduler: Literal["linear", "cosine", "cosine_with_restarts", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up the learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW decoupled weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables clipping.")
    optimizer: Literal["adamw", "adamw-8bit", "paged-adamw-8bit"] = Field(
        "adamw", description="adamw (fused, states in the weights' dtype) or bitsandbytes 8-bit AdamW (GPU only)."
    )
    precision: Literal["bf16", "bf16-mixed", "fp16", "fp32"] = Field(
        "bf16",
        description="bf16: bf16 weights and optimizer states (adapters stay fp32); bf16-mixed: fp32 master "
        "weights with bf16 autocast; fp16: fp32 master weights with fp16 autocast and loss scaling; fp32: no "
        "reduced precision. On CPU the trainer computes in fp32 whatever is set.",
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in the backward pass: much less memory for ~30% more compute."
    )
    fused_cross_entropy: bool = Field(
        True,
        description="Compute the loss in chunks without materializing full-vocabulary logits (Liger fused "
        "linear cross-entropy on GPU). Saves roughly 16 bytes x batch x sequence x vocab.",
    )
    fused_kernels: bool = Field(
        True,
        description="On GPU, swap the model's RMSNorm, rotary embedding and gated MLP activation for Liger's "
        "Triton kernels (faster, fewer saved activations), for the model types Liger supports; other models "
        "run unchanged. Turn off to run transformers' own modules.",
    )
    sharding: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="Multi-GPU strategy: ddp replicates the model; fsdp shards weights, gradients and optimizer "
        "states. auto picks fsdp for full fine-tuning across GPUs and ddp otherwise.",
    )
    seed: int = Field(42, ge=0, le=2**31 - 1, description="Seed for weights of new parameters, data order and dropout.")
    eval_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Evaluate every N optimizer steps; by default only at the end."
    )
    logging_steps: int = Field(
        10, ge=1, le=MAX_STEPS, description="Report loss and throughput every N optimizer steps."
    )
    early_stopping: EarlyStopping | None = Field(
        None, description="Stop early when the validation loss stops improving."
    )

    rules: ClassVar = (
        Rule(
            cel="has(self.epochs) != has(self.maxSteps)",
            message="set exactly one of training.epochs and training.maxSteps",
            check=lambda t: (t.epochs is None) != (t.max_steps is None),
        ),
        Rule(
            cel="!has(self.earlyStopping) || has(self.evalSteps)",
            message="training.earlyStopping needs training.evalSteps (how often to evaluate)",
            check=lambda t: t.early_stopping is None or t.eval_steps is not None,
            field_path=".earlyStopping",
        ),
    )


# ---------------------------------------------------------------------------------------------
# resources


class Toleration(KModel):
    """A core/v1 Toleration, passed to the trainer pod."""

    # The rules are the pod's own (ValidateTolerations): a bad toleration is refused here, not
    # when the Job controller fails to create the pod.

    key: (
        Annotated[
            str,
            Rule(
                cel="self == '' || " + qualified_name_cel("self"),
                message="a toleration key must be a qualified name: " + QUALIFIED_NAME_HELP,
                check=lambda k: k == "" or is_qualified_name(k),
            ),
        ]
        | None
    ) = Field(None, max_length=317, description="Taint key to tolerate; empty with operator Exists matches all.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(
        None,
        max_length=63,
        pattern=LABEL_VALUE,
        description="Taint value to match with operator Equal (a label value).",
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, le=MAX_SECONDS, description="For NoExecute: how long the pod stays bound after the taint appears."
    )

    rules: ClassVar = (
        Rule(
            cel="(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
            message="a toleration without a key must have operator Exists (it then tolerates every taint)",
            check=lambda t: bool(t.key) or t.operator == "Exists",
            field_path=".operator",
        ),
        Rule(
            cel="!has(self.value) || self.value == '' || !has(self.operator) || self.operator != 'Exists'",
            message="a toleration with operator Exists matches any value: leave its value out, or use operator Equal",
            check=lambda t: not t.value or t.operator != "Exists",
            field_path=".value",
        ),
        Rule(
            cel="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            message="a toleration's tolerationSeconds is only valid with effect NoExecute",
            check=lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
            field_path=".tolerationSeconds",
        ),
    )


# What the operator sets on every trainer pod (manifests._env), so neither a job's nor the
# operator's --trainer-env may: a second value would silently win or lose.
RESERVED_ENV = (
    "HOME",
    "HF_HOME",
    "HF_TOKEN",
    "HF_ENDPOINT",
    "POD_NAME",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CA_BUNDLE",
    "NNODES",
    "NPROC_PER_NODE",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
PATTERN_HELP[ENV_NAME_PATTERN] = "an environment variable name: letters, digits and '_', not starting with a digit"
# Sizes of what is copied into the trainer's pod and ConfigMap (the ConfigMap embeds the spec, and
# Kubernetes caps one at 1 MiB; annotations are capped at 256 KiB per object)
MAX_ENV_TOTAL = 65536
MAX_ANNOTATIONS_TOTAL = 65536
RESERVED_ENV_MESSAGE = (
    "is set by kubetune (KUBETUNE_*, " + ", ".join(RESERVED_ENV) + "): use the spec field for it "
    "(storage, model.tokenSecret, the operator's --hf-endpoint)"
)


def reserved_env(name: str) -> bool:
    return name.startswith("KUBETUNE_") or name in RESERVED_ENV


class EnvVar(KModel):
    """An environment variable of the trainer container: proxies (HTTPS_PROXY, NO_PROXY), NCCL
    settings, a CA bundle path."""

    name: str = Field(max_length=256, pattern=ENV_NAME_PATTERN, description="Variable name.")
    value: str = Field(
        "", max_length=32768, description="Its value (in plain text: Secrets go through the spec fields)."
    )

    rules: ClassVar = (
        Rule(
            cel="!self.name.startsWith('KUBETUNE_') && !(self.name in ["
            + ", ".join(f"'{n}'" for n in RESERVED_ENV)
            + "])",
            message="this name " + RESERVED_ENV_MESSAGE,
            check=lambda e: not reserved_env(e.name),
        ),
    )


class Resources(KModel):
    """Where and on how much hardware the trainer runs."""

    gpus_per_node: int = Field(
        1, ge=0, le=16, description="GPUs per trainer pod (one pod per node). 0 runs on CPU (tiny models only)."
    )
    nodes: int = Field(
        1,
        ge=1,
        le=256,
        description="Trainer pods; more than one makes an Indexed Job with a headless Service for rendezvous.",
    )
    gpu_product: str | None = Field(
        None,
        max_length=63,
        pattern=LABEL_VALUE,
        description="Only use GPUs of this product (the nvidia.com/gpu.product node label, e.g. "
        "NVIDIA-H100-80GB-HBM3).",
    )
    # Bounds: a quantity past any real node is a typo (or 1e400), and the pod would never schedule.
    min_gpu_memory: Annotated[str, bounded_quantity("resources.minGpuMemory", "1Ti", "40Gi")] | None = Field(
        None,
        description="Only use GPUs with at least this much memory (e.g. 40Gi), even if the estimate needs less. "
        "At most 1Ti.",
    )
    cpu: Annotated[str, bounded_quantity("resources.cpu", "1024", "8")] = Field(
        "4", description="CPU request of each trainer pod: more than 0, at most 1024."
    )
    memory: Annotated[str, bounded_quantity("resources.memory", "64Ti", "32Gi")] = Field(
        "32Gi",
        description="Memory request and limit of each trainer pod (host RAM, not GPU memory): more than 0, at "
        "most 64Ti.",
    )
    ephemeral_storage: Annotated[str, bounded_quantity("resources.ephemeralStorage", "1Pi", "200Gi")] | None = Field(
        None,
        description="Local disk (ephemeral-storage request) of each trainer pod for its work dir: the downloaded "
        "model, checkpoints before upload, the final output. Default: worked out from the model and method "
        "(status.placement.ephemeralStorage). At most 1Pi.",
    )
    node_selector: Annotated[
        dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]],
        Rule(
            cel="self.all(k, " + qualified_name_cel("k") + ")",
            message="resources.nodeSelector keys must be label keys: " + QUALIFIED_NAME_HELP,
            check=lambda d: all(is_qualified_name(k) for k in d),
        ),
    ] = Field(
        default_factory=dict,
        max_length=64,
        description="Extra node labels the trainer pods require (label keys and values).",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations for tainted GPU nodes."
    )
    priority_class_name: str | None = Field(
        None,
        max_length=253,
        pattern=NAME_PATTERN,
        description="PriorityClass of the trainer pods (preemption order); it must exist (kubectl get priorityclass).",
    )
    pod_annotations: Annotated[
        dict[str, Annotated[str, Field(max_length=MAX_ANNOTATIONS_TOTAL)]],
        Rule(
            cel="self.all(k, " + qualified_name_cel("k") + ")",
            message="resources.podAnnotations keys must be qualified names: " + QUALIFIED_NAME_HELP,
            check=lambda d: all(is_qualified_name(k) for k in d),
        ),
        Rule(
            cel=f"self.map(k, k.size() + self[k].size()).sum() <= {MAX_ANNOTATIONS_TOTAL}",
            message=f"resources.podAnnotations may hold at most {MAX_ANNOTATIONS_TOTAL} characters in all (keys and "
            "values)",
            check=lambda d: sum(len(k) + len(v) for k, v in d.items()) <= MAX_ANNOTATIONS_TOTAL,
        ),
    ] = Field(
        default_factory=dict,
        max_length=64,
        description="Extra annotations on the trainer pods, e.g. cluster-autoscaler.kubernetes.io/safe-to-evict: "
        f'"false". Keys are qualified names; at most 64 entries and {MAX_ANNOTATIONS_TOTAL} characters.',
    )
    env: Annotated[
        list[EnvVar],
        Rule(
            cel=f"self.map(e, has(e.value) ? e.value.size() : 0).sum() <= {MAX_ENV_TOTAL}",
            message=f"resources.env values may hold at most {MAX_ENV_TOTAL} characters in all (the trainer's ConfigMap "
            "holds the spec, and Kubernetes caps a ConfigMap at 1 MiB)",
            check=lambda env: sum(len(e.value) for e in env) <= MAX_ENV_TOTAL,
        ),
    ] = Field(
        default_factory=list,
        max_length=64,
        description="Extra environment of the trainer container (HTTPS_PROXY, NCCL_IB_HCA, ...); over the operator's "
        "--trainer-env for the same name.",
        # a map keyed by name: the apiserver refuses a name given twice, and server-side apply merges by name
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )

    @field_validator("env")
    @classmethod
    def _env_names_once(cls, v: list[EnvVar]) -> list[EnvVar]:
        if dup := sorted({e.name for e in v if sum(f.name == e.name for f in v) > 1}):
            raise ValueError(f"each name once ({', '.join(dup)} given twice)")
        return v

    rules: ClassVar = (
        Rule(
            cel="self.nodes == 1 || self.gpusPerNode >= 1",
            message="resources.nodes > 1 needs resources.gpusPerNode >= 1 (multi-node CPU training is not supported)",
            check=lambda r: r.nodes == 1 or r.gpus_per_node >= 1,
        ),
    )

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.nodes


# ---------------------------------------------------------------------------------------------
# storage, checkpoints, output


class SecretRef(KModel):
    """S3 credentials from a Secret in the job's namespace. Keys are never written inline."""

    name: str = Field(max_length=253, pattern=NAME_PATTERN, description="Secret name.")
    access_key_id_key: str = Field(
        "AWS_ACCESS_KEY_ID",
        max_length=253,
        pattern=CONFIG_KEY,
        description="Key in the Secret holding the access key id.",
    )
    secret_access_key_key: str = Field(
        "AWS_SECRET_ACCESS_KEY",
        max_length=253,
        pattern=CONFIG_KEY,
        description="Key in the Secret holding the secret access key.",
    )


class ConfigMapKeyRef(KModel):
    """One key of a ConfigMap in the job's namespace."""

    name: str = Field(max_length=253, pattern=NAME_PATTERN, description="ConfigMap name.")
    key: str = Field("ca.crt", max_length=253, pattern=CONFIG_KEY, description="Key holding the PEM bundle.")


class Storage(KModel):
    """How the trainer reaches S3 for every s3:// URI of the job."""

    # The URL rule sits on Storage, not on this string: a failed string rule makes the apiserver
    # echo the value, and a user:password@ in it is a credential.
    endpoint: str | None = Field(
        None,
        max_length=512,
        description="S3-compatible endpoint URL (MinIO, Ceph, R2, ...); AWS S3 when empty. No user:password@ in it: "
        "credentials go in credentialsSecret.",
    )
    region: str | None = Field(None, max_length=63, pattern=REGION_PATTERN, description="S3 region, e.g. us-east-1.")
    credentials_secret: SecretRef | None = Field(
        None,
        description="Secret with the credentials; without it the pod's ambient identity (serviceAccountName) is used.",
    )
    ca_bundle: ConfigMapKeyRef | None = Field(
        None,
        description="PEM CA bundle (a ConfigMap key) to verify https endpoints signed by a private CA: the S3 "
        "endpoint (as on-prem MinIO or Ceph often is) and the Hub mirror (the operator's --hf-endpoint). "
        "The trainer gets it as AWS_CA_BUNDLE and trusts it beside the public roots for the Hub; the "
        "operator uses it too.",
    )
    service_account_name: str | None = Field(
        None,
        max_length=253,
        pattern=NAME_PATTERN,
        description="ServiceAccount the trainer pods run as: S3 access by workload identity (EKS IRSA or Pod "
        "Identity, GKE Workload Identity) instead of credentialsSecret. Default: the namespace's default.",
    )
    force_path_style: bool = Field(
        True, description="Path-style addressing (bucket in the path), which most S3-compatible stores need."
    )

    rules: ClassVar = (
        Rule(
            cel=f"!has(self.endpoint) || self.endpoint.matches(r'{URL_PATTERN}')",
            message="storage.endpoint must be " + URL_HELP,
            check=lambda s: s.endpoint is None or full_match(URL_PATTERN, s.endpoint),
            field_path=".endpoint",
        ),
    )


class Checkpoints(KModel):
    """Checkpoints go to S3 during training; a restarted or preempted pod resumes from the newest one."""

    uri: str = Field(
        description="S3 prefix for checkpoints, e.g. s3://team-bucket/ckpt/. kubetune writes under "
        "<uri>/<namespace>/<name>/run-<n>/.",
        pattern=S3_ONLY,
        max_length=1024,
    )
    save_steps: int = Field(200, ge=1, le=MAX_STEPS, description="Save a checkpoint every N optimizer steps.")
    keep: int = Field(
        3, ge=1, le=100, description="Newest checkpoints to keep (the best by eval loss is kept as well)."
    )
    deletion_policy: Literal["Retain", "Delete"] = Field(
        "Retain", description="What happens to this job's S3 checkpoints when the FineTuneJob is deleted."
    )
    resume_from: str | None = Field(
        None,
        pattern=S3_ONLY,
        max_length=1024,
        description="Start a run that has no checkpoint of its own from this one: a checkpoint "
        "(<uri>/<namespace>/<name>/run-<n>/checkpoints/checkpoint-<step>/) or a prefix holding some (the newest "
        "committed is used). Model or adapter, optimizer, scheduler, RNG and data position are restored, so a failed "
        "run continues (with runPolicy.rerun) instead of starting over. It must come from the same model and method. "
        "The learning-rate schedule is this spec's from the restored step on, so a run can also be extended with more "
        "maxSteps or a new learningRate.",
    )


class EvaluationPrompt(KModel):
    """A prompt both models answer at the end of the run."""

    prompt: str = Field(min_length=1, max_length=16384, description="The prompt, as a user would write it.")
    reference: str | None = Field(
        None, max_length=16384, description="The expected answer: scored by exact match and ROUGE-L when set."
    )


class Evaluation(KModel):
    """The end-of-run evaluation: base vs tuned on the test set (dataset.testSplit or testUri), and the same
    prompts answered by both models, side by side, in an HTML report under the output URI."""

    prompts: list[EvaluationPrompt] = Field(
        default_factory=list, max_length=1024, description="Prompts both models answer (A/B)."
    )
    prompts_uri: str | None = Field(
        None,
        pattern=DATA_URI,
        max_length=1024,
        description=f"JSON Lines of {{prompt, reference?}} both models answer, after evaluation.prompts: {URI_HELP}.",
    )
    max_prompts: int = Field(
        64,
        ge=1,
        le=10000,
        description="At most this many prompts are answered: the inline ones, then the file's, then the test "
        "examples' own prompts (scored against their responses).",
    )
    max_new_tokens: int = Field(128, ge=1, le=8192, description="Longest answer, in tokens.")
    temperature: float = Field(0.0, ge=0, le=5, description="0: greedy decoding (the default); above 0: sampled.")


class Output(KModel):
    """Where the result goes."""

    uri: str | None = Field(
        None,
        pattern=S3_ONLY,
        max_length=1024,
        description="S3 prefix for the adapter (or full model); kubetune writes under "
        "<uri>/<namespace>/<name>/run-<n>/. Defaults to <checkpoints.uri>/<namespace>/<name>/run-<n>/final/.",
    )
    merge_adapter: bool = Field(
        False, description="Also upload the base model with the adapter merged in (LoRA/QLoRA)."
    )


class RunPolicy(KModel):
    """Lifecycle of the trainer Job."""

    backoff_limit: int = Field(
        3, ge=0, le=100, description="Pod failures before the run fails. Preemption and eviction do not count."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, le=MAX_SECONDS, description="Fail the run when it has run this long (at most 366 days)."
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        le=MAX_SECONDS,
        description="Delete the finished trainer Job (not the FineTuneJob or its artifacts) after this long (at most "
        "366 days).",
    )
    suspend: bool = Field(
        False, description="Stop the trainer pods; checkpoints stay, and unsuspending resumes from the newest."
    )
    queue_name: str | None = Field(
        None,
        max_length=63,
        pattern=LABEL_VALUE,
        description="Kueue LocalQueue; passed to the Job as the kueue.x-k8s.io/queue-name label (so a label value).",
    )
    image: str | None = Field(
        None, max_length=512, pattern=IMAGE_PATTERN, description="Trainer image override, e.g. ghcr.io/org/trainer:1.2."
    )
    image_pull_secrets: list[Annotated[str, Field(max_length=253, pattern=NAME_PATTERN)]] = Field(
        default_factory=list,
        max_length=16,
        description="Secrets (in the job's namespace) to pull the trainer image from a private registry.",
    )
    retry_on_oom: bool = Field(
        True, description="When the trainer runs out of GPU memory, retry once with the estimator's fit advice applied."
    )
    rerun: str | None = Field(
        None,
        max_length=253,
        description="Change it (to any string: a date, a data version) to start a new run of an unchanged spec: "
        "retrain on data updated in place, or retry a failed run once its cause is fixed. Like any "
        "spec change, it waits for an active run to end.",
    )


# ---------------------------------------------------------------------------------------------
# spec


class FineTuneJobSpec(KModel):
    """Desired state of a fine-tuning run."""

    model: ModelSource = Field(description="The base model.")
    dataset: Dataset = Field(description="Training (and validation) data.")
    method: Method = Field(description=f"How to fine-tune: {one_of(registry.METHOD_NAMES)}.")
    objective: TrainingObjective | None = Field(
        None, description=f"What to optimize: {one_of(registry.OBJECTIVE_NAMES)} and their settings. Default: sft."
    )
    training: Training = Field(description="Optimization settings.")
    resources: Resources = Field(default_factory=Resources, description="GPUs, nodes and scheduling constraints.")
    storage: Storage = Field(
        default_factory=Storage, description="S3 endpoint, region and credentials for all s3:// URIs."
    )
    checkpoints: Checkpoints = Field(description="Checkpoint location and cadence.")
    output: Output = Field(default_factory=Output, description="Where the trained adapter or model goes.")
    evaluation: Evaluation | None = Field(
        None,
        description="The end-of-run evaluation's prompts and generation settings. Test data "
        "(dataset.testSplit or testUri) is evaluated with the defaults without it.",
    )
    run_policy: RunPolicy = Field(
        default_factory=RunPolicy, description="Retries, deadlines, suspension, queueing and image."
    )

    rules: ClassVar = (
        Rule(
            cel="!has(self.training.earlyStopping) || has(self.dataset.validationUri) || "
            "has(self.dataset.validationSplit)",
            message="training.earlyStopping needs validation data: set dataset.validationUri or "
            "dataset.validationSplit",
            check=lambda s: (
                s.training.early_stopping is None
                or s.dataset.validation_uri is not None
                or s.dataset.validation_split is not None
            ),
        ),
        Rule(
            cel="!has(self.output) || !has(self.output.mergeAdapter) || !self.output.mergeAdapter || "
            + cel_in("self.method.type", _MERGEABLE_METHODS),
            message=f"output.mergeAdapter is only valid with method.type {one_of(_MERGEABLE_METHODS)}",
            check=lambda s: not s.output.merge_adapter or s.method.type in _MERGEABLE_METHODS,
        ),
        Rule(
            cel="!has(self.model.tokenSecret) || self.model.uri.startsWith('hf://') "
            "|| self.dataset.uri.startsWith('hf://') "
            "|| (has(self.dataset.validationUri) && self.dataset.validationUri.startsWith('hf://'))",
            message="model.tokenSecret is for hf:// models and datasets; s3:// uses spec.storage.credentialsSecret",
            check=lambda s: (
                s.model.token_secret is None
                or any((u or "").startswith("hf://") for u in (s.model.uri, s.dataset.uri, s.dataset.validation_uri))
            ),
        ),
        Rule(
            cel=cel_not_in("self.method.type", _QUANTIZED_METHODS)
            + " || !has(self.resources) || !has(self.resources.gpusPerNode) || self.resources.gpusPerNode >= 1",
            message=f"method.type {one_of(_QUANTIZED_METHODS)} needs a GPU (bitsandbytes): set resources.gpusPerNode "
            ">= 1",
            check=lambda s: s.method.type not in _QUANTIZED_METHODS or s.resources.gpus_per_node >= 1,
        ),
        Rule(
            cel="!has(self.evaluation) || has(self.dataset.testUri) || has(self.dataset.testSplit) || "
            "(has(self.evaluation.prompts) && size(self.evaluation.prompts) > 0) || has(self.evaluation.promptsUri)",
            message="evaluation needs something to evaluate: test data (dataset.testSplit or dataset.testUri) or "
            "prompts (evaluation.prompts or evaluation.promptsUri)",
            check=lambda s: (
                s.evaluation is None
                or bool(s.dataset.test_uri or s.dataset.test_split)
                or bool(s.evaluation.prompts or s.evaluation.prompts_uri)
            ),
        ),
        *_OBJECTIVE_SPEC_RULES,
    )

    @property
    def effective_objective(self) -> TrainingObjective:
        return self.objective or _SFT


_SFT = TrainingObjective()

# ---------------------------------------------------------------------------------------------
# status

Phase = Literal["Pending", "Unschedulable", "Starting", "Running", "Suspended", "Succeeded", "Failed"]
REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
PATTERN_HELP[REASON_PATTERN] = "a CamelCase reason: letters, digits, '_', ',' and ':', starting with a letter"
assert get_args(Phase) == PHASES  # spelled out for type checkers; kubetune.api.constants is the home


class Condition(StatusModel):
    """A metav1.Condition."""

    type: str = Field(max_length=316, description=f"Condition type: one of {', '.join(CONDITION_TYPES)}.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, pattern=REASON_PATTERN, description="CamelCase reason.")
    message: str = Field("", max_length=32768, description="What happened and what to do next.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation the condition was computed for."
    )


class MemoryBreakdown(StatusModel):
    """Per-GPU bytes by term."""

    weights: int = Field(0, description="Model weights (quantized where applicable).")
    gradients: int = Field(0, description="Gradients of trainable parameters.")
    optimizer: int = Field(0, description="Optimizer states (and fp32 master weights).")
    adapters: int = Field(0, description="Adapter / virtual-token parameters.")
    activations: int = Field(0, description="Saved activations for the backward pass.")
    logits: int = Field(0, description="Logits and cross-entropy buffers.")
    overhead: int = Field(0, description="CUDA context and caching-allocator overhead.")
    communication: int = Field(0, description="Collective-communication buffers (multi-GPU).")


class EstimateStatus(StatusModel):
    """The memory estimate the placement used."""

    per_gpu: str = Field(description="Per-GPU memory as a quantity-like string, e.g. 17.3Gi (the GPU Mem column).")
    per_gpu_bytes: int = Field(ge=0, description="Per-GPU device memory in bytes, CUDA context included.")
    breakdown: MemoryBreakdown = Field(default_factory=MemoryBreakdown, description="Per-GPU bytes by term.")
    total_params: int = Field(0, ge=0, description="Parameters of the base model.")
    trainable_params: int = Field(0, ge=0, description="Parameters that are trained.")
    micro_batch_size: int = Field(1, ge=1, description="Micro batch the estimate is for.")
    seq_length: int = Field(1, ge=1, description="Sequence length the estimate is for.")
    allocated_bytes: int = Field(
        0, ge=0, description="Peak bytes allocated by tensors on each GPU (torch.cuda.max_memory_allocated)."
    )
    reserved_bytes: int = Field(
        0,
        ge=0,
        description="Peak bytes the CUDA caching allocator reserves on each GPU "
        "(torch.cuda.max_memory_reserved): allocated plus its simulated fragmentation.",
    )
    allocator_setting: str | None = Field(
        None, description="The PYTORCH_CUDA_ALLOC_CONF the reserved figure assumes, e.g. expandable_segments:False."
    )


class PlacementStatus(StatusModel):
    """Where the trainer was placed and why."""

    node: str | None = Field(None, description="Preferred (best-fit) node; the Node column.")
    nodes: list[str] = Field(default_factory=list, description="All nodes that fit, best first.")
    gpu_product: str | None = Field(None, description="GPU product of the chosen size.")
    gpu_memory_mi_b: int | None = Field(None, alias="gpuMemoryMiB", description="Memory of each chosen GPU in MiB.")
    min_gpu_memory_mi_b: int | None = Field(
        None,
        alias="minGpuMemoryMiB",
        description="Threshold passed to kube-scheduler as nodeAffinity nvidia.com/gpu.memory Gt.",
    )
    micro_batch_size: int | None = Field(None, description="Micro batch the trainer runs with (resolved from auto).")
    gradient_accumulation_steps: int | None = Field(None, description="Gradient accumulation the trainer runs with.")
    ephemeral_storage: str | None = Field(None, description="Local disk (ephemeral-storage) each trainer pod requests.")
    message: str | None = Field(None, description="Why this placement was chosen.")


TrainerState = Literal["starting", "training", "evaluating", "uploading", "finished", "failed", "preempted"]


class Progress(StatusModel):
    """Live training progress, mirrored from the trainer."""

    state: TrainerState | None = Field(
        None,
        description="What the trainer is doing: starting (loading the model and data), training, evaluating, "
        "uploading (the final outputs), finished, failed or preempted.",
    )
    step: int = Field(0, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(None, ge=0, description="Optimizer steps planned.")
    percent: str | None = Field(None, description="step/totalSteps as a percentage, e.g. 42% (the Progress column).")
    epoch: float | None = Field(None, description="Epochs done (fractional).")
    loss: float | None = Field(None, description="Recent training loss.")
    eval_loss: float | None = Field(None, description="Latest validation loss.")
    tokens_per_second: float | None = Field(None, description="Training throughput over all GPUs.")
    eta_seconds: int | None = Field(None, description="Estimated seconds to completion.")
    peak_gpu_memory_bytes: int | None = Field(
        None,
        description="Peak device memory the trainer saw on its GPU (CUDA context + allocator reserved), for "
        "estimate-vs-actual.",
    )
    # A map, not fields: each objective names its own (the registry's ObjectiveInfo.metrics).
    metrics: dict[str, float] | None = Field(
        None,
        max_length=32,
        description="The objective's recent per-step metrics, e.g. rewardAccuracy, rewardMargin, "
        "rewardsChosen and rewardsRejected for the preference objectives.",
    )
    updated_at: datetime | None = Field(None, description="When the trainer reported this.")


class CheckpointStatus(StatusModel):
    """The newest committed checkpoint."""

    latest_uri: str | None = Field(None, description="S3 URI of the newest committed checkpoint.")
    latest_step: int | None = Field(None, description="Its optimizer step.")
    latest_time: datetime | None = Field(None, description="When it was committed.")
    count: int = Field(0, description="Committed checkpoints kept in S3.")


class EvaluationResult(StatusModel):
    """The end-of-run evaluation: the same metrics of the base and the tuned model."""

    base: dict[str, float] = Field(
        default_factory=dict,
        description="The base model's test metrics: loss, perplexity, tokenAccuracy, exactMatch, rougeL (exact "
        "match and ROUGE-L over the answers that have a reference).",
    )
    tuned: dict[str, float] = Field(default_factory=dict, description="The tuned model's, the same metrics.")
    delta: dict[str, float] = Field(default_factory=dict, description="tuned - base, per metric.")
    headline: str | None = Field(
        None, max_length=256, description="The main change, in words (kubectl get -o wide shows it)."
    )
    examples: int | None = Field(None, description="Test examples scored.")
    prompts: int | None = Field(None, description="Prompts both models answered.")


class ResultStatus(StatusModel):
    """What the run produced."""

    adapter_uri: str | None = Field(None, description="S3 URI of the trained adapter (or full model).")
    merged_uri: str | None = Field(None, description="S3 URI of the merged model, when output.mergeAdapter is set.")
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Final metrics: trainLoss, evalLoss, perplexity, baseEvalLoss, basePerplexity, skippedLines, ...",
    )
    evaluation: EvaluationResult | None = Field(
        None, description="Base vs tuned on the test set and the prompts (dataset.testSplit, spec.evaluation)."
    )
    report_uri: str | None = Field(
        None,
        description="S3 URI of the A/B report (report.html; answers.jsonl and summary.json beside it): "
        "`kubetune report NAME` shows it.",
    )


class RunOverrides(StatusModel):
    """What an out-of-memory retry changed, on top of spec.training."""

    micro_batch_size: int | None = Field(None, description="Micro batch used instead of the spec's.")
    gradient_accumulation_steps: int | None = Field(None, description="Accumulation that keeps the effective batch.")
    gradient_checkpointing: bool | None = Field(None, description="Gradient checkpointing forced on.")
    fused_cross_entropy: bool | None = Field(None, description="Fused cross-entropy forced on.")


class RunRecord(StatusModel):
    """One past or current run. A spec change to a finished job starts a new run."""

    run: int = Field(ge=1, description="Run number (the kubetune.io/run label).")
    generation: int = Field(ge=0, description="metadata.generation the run was started for.")
    phase: Phase = Field(description="Last phase of the run.")
    reason: str | None = Field(None, description="Why the run ended.")
    start_time: datetime | None = Field(None, description="When the run was created.")
    completion_time: datetime | None = Field(None, description="When it finished.")
    result: ResultStatus | None = Field(None, description="What it produced.")
    overrides: RunOverrides | None = Field(
        None,
        description="Settings the operator changed for this run on top of the spec (after an out-of-memory failure).",
    )


class FineTuneJobStatus(StatusModel):
    """Observed state, written by the operator."""

    phase: Phase | None = Field(
        None, description="Pending, Unschedulable, Starting, Running, Suspended, Succeeded or Failed."
    )
    observed_generation: int | None = Field(None, description="metadata.generation the status reflects.")
    run: int | None = Field(None, description="Current run number.")
    # maxItems bounds the apiserver's CEL cost estimate of the reason rule on every condition
    conditions: list[Condition] = Field(
        default_factory=list, max_length=32, description="Latest observations, metav1-style (one per type)."
    )
    estimate: EstimateStatus | None = Field(None, description="Per-GPU memory estimate and its breakdown.")
    placement: PlacementStatus | None = Field(None, description="Chosen GPUs and nodes.")
    progress: Progress | None = Field(None, description="Live training progress.")
    checkpoints: CheckpointStatus | None = Field(None, description="Newest committed checkpoint.")
    result: ResultStatus | None = Field(None, description="Outputs and final metrics of the current run.")
    history: list[RunRecord] = Field(default_factory=list, description="Every run of this job, oldest first.")
    start_time: datetime | None = Field(None, description="When the current run started.")
    completion_time: datetime | None = Field(None, description="When the current run finished.")


class ObjectMeta(StatusModel):
    """The parts of metav1.ObjectMeta kubetune reads."""

    # what the apiserver allows; kubetune's own limits are FineTuneJob.rules (the same words as the CRD's)
    name: str = Field(max_length=253, pattern=NAME_PATTERN)
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTuneJob(KModel):
    """A fine-tuning run: kubetune estimates its GPU memory, places it on GPUs that fit, runs the
    trainer, syncs checkpoints to S3 and resumes after preemption."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["FineTuneJob"] = KIND
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    # Root-level rules: the CRD emits them at the top of the schema, where CEL may read metadata.name.
    rules: ClassVar = (
        Rule(
            cel=f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
            message=f"metadata.name must be at most {MAX_NAME_LENGTH} characters: kubetune derives Job, pod and label "
            "values from it, which Kubernetes limits to 63",
            check=lambda j: len(j.metadata.name) <= MAX_NAME_LENGTH,
        ),
        # <name>-r<run> names the headless Service of a multi-node job, and a Service name is a
        # DNS-1035 label (and the Indexed Job's pod host names DNS labels): no dots, a letter first.
        Rule(
            cel="!has(self.spec.resources) || !has(self.spec.resources.nodes) || self.spec.resources.nodes <= 1 "
            f"|| self.metadata.name.matches(r'{DNS1035_LABEL}')",
            message="metadata.name of a multi-node job (resources.nodes > 1) must be lowercase letters, digits and "
            "'-', starting with a letter, without dots: its headless Service is named after it",
            check=lambda j: j.spec.resources.nodes <= 1 or full_match(DNS1035_LABEL, j.metadata.name),
        ),
    )


def check_object(name: str, spec: FineTuneJobSpec) -> list[str]:
    """What the apiserver checks on the whole object (FineTuneJob.rules: metadata.name together with
    the spec), for the operator, which parses only the spec: one message per broken rule, in the
    CRD's words. Empty when the object is valid."""
    job = FineTuneJob.model_construct(metadata=ObjectMeta.model_construct(name=name), spec=spec)
    return [r.message for r in FineTuneJob.rules if not r.check(job)]


# ---------------------------------------------------------------------------------------------
# trainer config: what the operator renders into the trainer's ConfigMap


class JobRef(KModel):
    """Which FineTuneJob and run a trainer belongs to."""

    namespace: str = Field(description="Namespace of the FineTuneJob.")
    name: str = Field(description="Name of the FineTuneJob.")
    uid: str | None = Field(None, description="UID of the FineTuneJob.")
    run: int = Field(1, ge=1, description="Run number.")


class Resolved(KModel):
    """Decisions the operator made for this run (placement, auto batch, strategy)."""

    micro_batch_size: int = Field(ge=1, description="Micro batch per GPU.")
    gradient_accumulation_steps: int = Field(ge=1, description="Micro batches per optimizer step.")
    num_processes: int = Field(1, ge=1, description="Trainer processes over all nodes (GPUs, or 1 on CPU).")
    sharding: Literal["none", "ddp", "fsdp"] = Field("none", description="Strategy across processes.")
    estimate_bytes: int | None = Field(None, ge=0, description="Per-GPU estimate the placement used.")
    ephemeral_storage_bytes: int | None = Field(
        None, ge=0, description="Local disk each trainer pod requests when resources.ephemeralStorage is unset."
    )


class TrainerPaths(KModel):
    """Resolved storage locations of this run."""

    checkpoints_uri: str = Field(description="S3 prefix of this run's checkpoints.")
    output_uri: str = Field(description="S3 prefix for the final adapter/model.")
    progress_uri: str = Field(description="S3 object the trainer overwrites with its live progress JSON.")
    work_dir: str = Field("/tmp/kubetune", description="Local scratch directory.")


class TrainerConfig(KModel):
    """The trainer's input, rendered by the operator into a ConfigMap. It embeds the job's spec
    unchanged, so the trainer and the API cannot drift."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["TrainerConfig"] = "TrainerConfig"
    job: JobRef
    spec: FineTuneJobSpec
    resolved: Resolved
    paths: TrainerPaths
    metrics_port: int = Field(
        9090, ge=0, le=65535, description="Port of the trainer's Prometheus /metrics (0 disables it)."
    )


# ---------------------------------------------------------------------------------------------
# trainer -> operator channel: the progress object in S3 and the pod's termination message


class TrainerProgress(StatusModel):
    """What the trainer overwrites at paths.progressUri every few seconds (and at each checkpoint).
    The operator copies it into status.progress / status.checkpoints."""

    state: TrainerState = Field("training", description="What the trainer is doing.")
    progress: Progress = Field(default_factory=Progress, description="Step, loss, throughput, ETA.")
    checkpoints: CheckpointStatus = Field(default_factory=CheckpointStatus, description="Newest committed checkpoint.")
    resumed_from_step: int | None = Field(None, description="Step this attempt resumed from, if any.")
    # The pod of a preempted trainer is deleted soon after it exits, often before the operator reads
    # its termination message: this copy outlives it.
    message: str | None = Field(None, max_length=3000, description="Why the trainer stopped (state preempted).")
    # A FineTuneJob deleted with deletionPolicy Retain leaves this object where a new one of the same name
    # reads: the UID tells whose it is (the checkpoints' manifests carry it for the same reason).
    job_uid: str | None = Field(None, max_length=128, description="UID of the FineTuneJob whose trainer wrote it.")


TerminationReason = Literal[
    "Completed",
    "EarlyStopped",
    "Preempted",
    "OutOfMemory",
    "BadData",
    "BadConfig",
    "ModelLoadFailed",
    "StorageFailed",
    "Error",
]


class TrainerTermination(StatusModel):
    """The JSON the trainer writes to /dev/termination-log (terminationMessagePath) on exit; the
    operator reads it from the pod status to set reasons and results."""

    reason: TerminationReason = Field(description="Why the trainer exited.")
    message: str = Field("", max_length=3000, description="Human-readable detail (the kubelet keeps 4 KiB).")
    result: ResultStatus | None = Field(None, description="Outputs and metrics when the run completed.")
    step: int | None = Field(None, description="Last optimizer step reached.")
