"""What kubetune's trainer will actually do with a FineTuneJob spec.

This is the contract between the estimator and the trainer: the trainer builds its model,
optimizer and loss from a TrainingPlan, and the estimator prices the same TrainingPlan. When a
trainer default changes, it changes here, and both follow. Pure Python: no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from kubetune.api import registry
from kubetune.api.v1alpha1 import Evaluation, FineTuneJobSpec

Dtype = Literal["bf16", "fp16", "fp32"]

# Trainer defaults that are not in the API. Each one changes memory, so the estimator reads them.
ADAPTER_DTYPE: Dtype = "fp32"  # peft's autocast_adapter_dtype=True keeps LoRA weights in fp32
ATTENTION = "sdpa"  # no s^2 attention matrix is stored (flash / memory-efficient kernels)
FUSED_CE_IMPL = "liger"  # liger-kernel's fused linear cross-entropy on CUDA; chunked torch fallback on CPU
# The estimator's model_types whose RMSNorm, RoPE and gated MLP liger-kernel patches on a model instance
# (liger_kernel.transformers.monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN; a trainer test checks this list
# against it). fusedKernels changes the saved activations of these alone.
LIGER_MODEL_TYPES = frozenset(
    {
        "gemma",
        "gemma2",
        "gemma3",
        "gemma3_text",
        "granite",
        "llama",
        "mistral",
        "mixtral",
        "olmo2",
        "phi3",
        "qwen2",
        "qwen3",
        "qwen3_moe",
    }
)
# Gated-MLP activations Liger's kernels compute (SwiGLU: silu(gate) * up; GeGLU: tanh-approximated gelu).
# Another activation keeps transformers' MLP, in the trainer and in the estimate alike.
LIGER_SWIGLU_ACTS = ("silu", "swish")
LIGER_GEGLU_ACTS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
OPTIMIZER_IMPL = {"adamw": "adamw_torch_fused", "adamw-8bit": "adamw_bnb_8bit", "paged-adamw-8bit": "paged_adamw_8bit"}


@dataclass(frozen=True)
class TrainingPlan:
    method: str
    weight_dtype: Dtype  # dtype the (frozen or trained) base weights are held in
    trainable_dtype: Dtype  # dtype of trainable parameters, hence of their grads and AdamW states
    compute_dtype: Dtype  # autocast dtype of matmuls
    optimizer: str  # adamw | adamw-8bit | paged-adamw-8bit
    gradient_checkpointing: bool
    fused_cross_entropy: bool
    micro_batch_size: int
    seq_len: int
    gradient_accumulation_steps: int = 1
    num_processes: int = 1
    sharding: Literal["none", "ddp", "fsdp", "zero2", "zero3"] = "none"  # zero*: estimator flag form only
    packing: bool = False
    quant_bits: int | None = None
    quant_type: str | None = None
    double_quant: bool = False
    lora_rank: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = field(default_factory=tuple)
    trainable_layers: int | None = None  # freeze: top-k blocks trained
    train_embeddings: bool = False
    virtual_tokens: int | None = None
    adapter_dtype: Dtype = ADAPTER_DTYPE
    fused_kernels: bool = False  # Liger RMSNorm / RoPE / gated-MLP kernels (model types in LIGER_MODEL_TYPES)
    # 8-bit AdamW: the HF Trainer keeps nn.Embedding states in 32-bit (create_optimizer's bitsandbytes override);
    # kubetune's trainer builds plain bnb AdamW8bit, which does not. plan_from_spec (kubetune's trainer) sets False.
    embedding_states_32bit: bool = True
    # The training objective (a registry name). A paired objective puts chosen and rejected through one forward:
    # sequences_per_example of them per example, so a micro batch of b examples is b x sequences_per_example
    # sequences. reference: implicit (the base with adapters off) and copy (a frozen second model) run a no-grad
    # reference forward before each micro batch's policy forward; precomputed reads log-probs from a pass before
    # training; none: the objective has no reference (sft, orpo, simpo).
    objective: str = "sft"
    sequences_per_example: int = 1
    reference: Literal["none", "implicit", "copy", "precomputed"] = "none"
    # The end-of-run evaluation (kubetune_trainer.evaluation), run once after the last step with the weights and
    # optimizer states alive: a no-grad forward over each test sequence (test data: dataset.testSplit/testUri),
    # and greedy answers of up to evaluation_new_tokens tokens (0: no prompts to answer).
    evaluation_test_data: bool = False
    evaluation_new_tokens: int = 0

    def with_(self, **changes) -> "TrainingPlan":
        return replace(self, **changes)


def resolve_sharding(spec: FineTuneJobSpec, num_processes: int) -> Literal["none", "ddp", "fsdp"]:
    if num_processes <= 1:
        return "none"
    if spec.training.sharding != "auto":
        return spec.training.sharding
    # Full and freeze fine-tuning hold whole model states per GPU under DDP; sharding them is what
    # makes multi-GPU worth it. Adapters are small, so DDP's simplicity wins.
    return "fsdp" if registry.method(spec.method.type).shard_by_default else "ddp"


# `auto` picks at most this micro batch: past it a GPU is saturated and throughput stops improving,
# while activation memory keeps growing.
AUTO_BATCH_MAX = 64


def auto_micro_batch_cap(spec: FineTuneJobSpec) -> int:
    """The largest micro batch `auto` may pick: the effective batch per GPU (beyond it the optimizer
    step would take more examples than asked for), and at most AUTO_BATCH_MAX."""
    t = spec.training
    if t.effective_batch_size:
        return max(1, min(AUTO_BATCH_MAX, t.effective_batch_size // max(1, spec.resources.total_gpus)))
    return AUTO_BATCH_MAX


def accumulation_steps(spec: FineTuneJobSpec, micro_batch_size: int, num_processes: int) -> int:
    """Gradient accumulation: enough micro batches for training.effectiveBatchSize when it is set."""
    t = spec.training
    if t.effective_batch_size:
        return max(1, math.ceil(t.effective_batch_size / (micro_batch_size * num_processes)))
    return t.gradient_accumulation_steps


def plan_from_spec(
    spec: FineTuneJobSpec,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    num_processes: int | None = None,
) -> TrainingPlan:
    """The plan for a spec. ``micro_batch_size`` must be given when the spec says auto."""
    t, m = spec.training, spec.method
    info = registry.method(m.type)
    mbs = micro_batch_size if micro_batch_size is not None else t.micro_batch_size
    if mbs == "auto":
        raise ValueError("micro batch is 'auto': resolve it (estimator.max_micro_batch) before planning")
    nproc = num_processes if num_processes is not None else max(1, spec.resources.total_gpus)

    weight: Dtype
    trainable: Dtype
    compute: Dtype
    if t.precision == "fp32":
        weight = trainable = compute = "fp32"
    elif t.precision == "bf16":
        weight = trainable = compute = "bf16"
    else:  # bf16-mixed / fp16: fp32 master copy of what trains, reduced-precision compute
        compute = "bf16" if t.precision == "bf16-mixed" else "fp16"
        trainable = "fp32"
        weight = "fp32" if info.master_weights else compute

    kw: dict = {}
    if info.settings == "lora":
        lo = m.effective_lora
        kw.update(
            lora_rank=lo.rank, lora_alpha=lo.alpha, lora_dropout=lo.dropout, lora_targets=tuple(lo.target_modules)
        )
    if info.quantized:
        q = m.effective_quantization
        kw.update(
            quant_bits=q.bits,
            quant_type=q.quant_type if q.bits == 4 else None,
            double_quant=q.double_quant and q.bits == 4,
        )
        weight = "bf16" if compute == "fp32" else compute  # non-quantized parts (embeddings, norms)
    if info.settings == "virtualTokens":
        kw.update(virtual_tokens=m.effective_virtual_tokens)
    if info.adapter:
        trainable = ADAPTER_DTYPE
    if info.settings == "freeze":
        assert m.freeze is not None
        kw.update(trainable_layers=m.freeze.trainable_layers, train_embeddings=m.freeze.train_embeddings)

    obj = spec.effective_objective
    return TrainingPlan(
        adapter_dtype=ADAPTER_DTYPE,  # read at call time, so a changed default reaches every plan
        method=m.type,
        weight_dtype=weight,
        trainable_dtype=trainable,
        compute_dtype=compute,
        optimizer=t.optimizer,
        # peft's prefix tuning feeds its virtual tokens as a KV cache, which recomputation would append
        # twice: the trainer cannot checkpoint activations there, so neither may the estimate assume it.
        gradient_checkpointing=t.gradient_checkpointing and info.checkpointing,
        fused_cross_entropy=t.fused_cross_entropy,
        fused_kernels=t.fused_kernels,
        micro_batch_size=int(mbs),
        seq_len=spec.dataset.max_seq_length,
        gradient_accumulation_steps=gradient_accumulation_steps or t.gradient_accumulation_steps,
        num_processes=nproc,
        sharding=resolve_sharding(spec, nproc),
        packing=spec.dataset.packing,
        embedding_states_32bit=False,
        objective=obj.type,
        sequences_per_example=obj.info.sequences_per_example,
        reference=obj.effective_reference(m.type),
        **evaluation_fields(spec),
        **kw,
    )


def evaluation_fields(spec: FineTuneJobSpec) -> dict:
    """The plan's evaluation fields: test data is scored token by token, and the prompts (written ones, and the
    test examples' own) are answered with up to evaluation.maxNewTokens tokens."""
    ev, d = spec.evaluation, spec.dataset
    test = bool(d.test_split or d.test_uri)
    prompts = test or bool(ev and (ev.prompts or ev.prompts_uri))
    new_tokens = (ev or Evaluation()).max_new_tokens if prompts else 0
    return {"evaluation_test_data": test, "evaluation_new_tokens": new_tokens}
