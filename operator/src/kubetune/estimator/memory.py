"""Per-GPU memory of a training plan: the pure estimate.

``estimate(arch, plan)`` prices a :class:`kubetune.plan.TrainingPlan` on an :class:`Architecture`.
It models the peak of one training step as the largest of four moments, each the sum of what is alive
then (docs/estimator.md derives every term):

- loss:       model states + saved activations (or checkpoints) + the cross-entropy buffers
- backward (top of the stack): model states + checkpoints + one recomputed block + backward transients
- backward (bottom): model states + every gradient + one block
- optimizer:  model states + every gradient

plus what the CUDA caching allocator reserves beyond that (simulated: allocator.py replays the step's
allocation sequence, steptrace.py), the CUDA context and communication buffers. The constants marked
"calibrated" were fitted to shared/calibration (plain HF Trainer + PEFT on an H100); everything else
is bytes-per-element arithmetic from the modelling code. Pure Python, no torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, NamedTuple

from kubetune.api.registry import MethodInfo
from kubetune.api.registry import method as method_info
from kubetune.estimator.allocator import DEFAULT as ALLOC_DEFAULT
from kubetune.estimator.allocator import EXPANDABLE as ALLOC_EXPANDABLE
from kubetune.estimator.arch import ATTN_IN, ATTN_OUT, MLP_IN, MLP_MID, SHARED_MID, Architecture, Block
from kubetune.plan import LIGER_GEGLU_ACTS, LIGER_MODEL_TYPES, LIGER_SWIGLU_ACTS, TrainingPlan

GIB = 1 << 30
MIB = 1 << 20
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
BREAKDOWN_KEYS = ("weights", "gradients", "optimizer", "adapters", "activations", "logits", "overhead", "communication")

# ---- constants -----------------------------------------------------------------------------------
# Measured: device use minus the allocator's reservation on an H100 with torch 2.11 (shared/calibration,
# memory.md "Overhead"); PyTorch issue #86509 reports 0.3-0.7 GiB on older stacks.
CUDA_CONTEXT = int(0.75 * GIB)
# Small allocations every step makes besides the model: cuBLAS/cuDNN workspaces, RoPE tables, token ids,
# labels, masks, loss scalars, the first allocator segments (calibrated: 0.05-0.2 GiB seen in peak_allocated).
MISC = 64 * MIB
# Unfused cross-entropy (transformers ForCausalLMLoss): at the start of the backward, the fp32
# log-softmax output (saved), nll's fp32 grad and log_softmax_backward's fp32 result coexist: 12 bytes per
# logit. Fitted against the vocab pairs of the calibration set (8B vs the same dims with a 32k vocab:
# 12.0 B in peak_allocated). Gemma 2's final-logit soft-capping keeps its tanh output too: +2 (bf16).
UNFUSED_CE_BYTES = 12
SOFTCAP_EXTRA_BYTES = 2
# Liger's fused loss with a trained head allocates the head's gradient (grad_weight, the weight's dtype) in the
# forward and adds each chunk's [V, h] product into it. On compute capability 8.0+ it accumulates in place
# (addmm(out=grad_weight)) when the chunk's gradient is bf16/fp16; otherwise (fp32 compute, GPUs before Ampere,
# CPU) its fallback allocates the product in the compute dtype and an fp32 copy of it per chunk
# (liger_kernel/ops/fused_linear_cross_entropy.py). bf16 jobs are placed on Ampere or newer only
# (kubetune.api.constants.bf16_refused); an fp16 one may get a T4 or V100, so its fallback is priced.
LIGER_HEAD_GRAD_IN_PLACE = frozenset({"bf16"})  # compute dtypes whose head gradient Liger accumulates in place
# Transients of a block's backward beyond its saved activations, per token: the gradient of the MLP
# intermediate and of the residual stream. Calibrated on the liger rows, whose peak is inside the block
# backward (1B and 8B: 0.09 and 0.2 GiB above the saved activations at b4 x 2048). Refitted (2 -> 3 hidden-wide
# tensors) when the adapters' gradients, which had filled that moment, left it: the Trainer's zero_grad sets them
# to None after every step. Both rows' peak_allocated are then within 0.1 %.
BWD_TRANSIENT_MLP = 1.0  # x compute_bytes x intermediate
BWD_TRANSIENT_HIDDEN = 3.0  # x compute_bytes x hidden
# Caching-allocator fragmentation (reserved - allocated at the peak) is no longer fitted: the allocator
# simulator (allocator.py) replays the plan's generated step trace (steptrace.py) and says what it reserves.
# A model load (QLoRA under FSDP) has no step trace: its few large tensors leave one segment's slack.
LOAD_SLACK = 512 * MIB
# Collectives: NCCL allocates its own buffers (outside the caching allocator) per communicator.
NCCL_BUFFERS = int(0.375 * GIB)
DEEPSPEED_BUCKET = 500_000_000  # elements: reduce_bucket_size / allgather_bucket_size defaults
BNB_8BIT_STATE = 2 + 2 * 4 / 256  # two uint8 states + fp32 absmax per 256-block, per parameter
# bitsandbytes 4-bit: 4 bits + absmax. blocksize 64; double quant stores absmax as 8 bits + one fp32
# per 256 blocks (QLoRA paper: 0.127 bit/param overhead) -> 4.127 bits; plain: fp32 absmax per 64 -> 4.5 bits
NF4_BYTES_DQ = 0.5 + 1 / 64 + 4 / (64 * 256)
NF4_BYTES = 0.5 + 4 / 64
INT8_BYTES = 1.0
# The reference forward of a preference objective (no grad) turns each logit into its log-probability: the
# logits in the compute dtype, their fp32 copy and the fp32 log-softmax are alive together, 8 bytes + the compute
# dtype's per logit (over all tokens unfused, over one chunk of the fused head).
REF_LOGIT_FP32_BYTES = 8
# The end-of-run evaluation's token accuracy (kubetune_trainer.evaluation.token_accuracy) turns one test sequence's
# logits to fp32 (the compute-dtype logits die with the statement), then picks the response positions' rows (a
# copy) and cross_entropy takes their fp32 log-softmax: 12 bytes per logit when every position is a response
# token (plain text; chat and alpaca label fewer), more than the 6 of the moment the bf16 and fp32 logits coexist.
EVAL_LOGIT_BYTES = 12
# Safety margin: a plan fits a GPU when its estimate is at most (1 - margin) x the GPU's memory; the
# estimator is calibrated to be at most 5% under the measured device memory.
DEFAULT_MARGIN = 0.05
# Autocast runs matmuls in bf16/fp16 whenever the compute dtype is reduced (HF Trainer bf16=True and
# kubetune's trainer both wrap the forward in torch.autocast).
AUTOCAST_WHEN_REDUCED = True


@dataclass
class Estimate:
    total_bytes: int
    breakdown: dict[str, int]
    total_params: int
    trainable_params: int
    micro_batch_size: int
    seq_len: int
    phase: str = "loss"  # which moment of the step is the peak: loss | backward | optimizer | reference forward
    # what torch.cuda.max_memory_allocated reports (the physics), and what the caching allocator reserves
    # (max_memory_reserved: allocated + the simulated fragmentation); the total adds the CUDA context
    allocated_bytes: int = 0
    reserved_bytes: int = 0
    allocator_setting: str = ALLOC_DEFAULT  # PYTORCH_CUDA_ALLOC_CONF the reserved figure assumes
    plan: TrainingPlan | None = field(default=None, repr=False)
    notes: tuple[str, ...] = ()

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def fits(self, gpu_bytes: int, margin: float = DEFAULT_MARGIN) -> bool:
        return self.total_bytes <= gpu_bytes * (1.0 - margin)

    def to_status(self) -> Any:
        from kubetune.api.v1alpha1 import EstimateStatus, MemoryBreakdown

        # The apiserver rejects integers past int64 (issue #19): architectures are bounded (arch.MAX_PARAMS),
        # and every field saturates anyway, so no plan can make the status patch fail.
        return EstimateStatus(
            per_gpu=format_gib(min(self.total_bytes, INT64_MAX)),
            per_gpu_bytes=_i64(self.total_bytes),
            breakdown=MemoryBreakdown(**{k: _i64(v) for k, v in self.breakdown.items()}),
            total_params=_i64(self.total_params),
            trainable_params=_i64(self.trainable_params),
            micro_batch_size=_i64(self.micro_batch_size),
            seq_length=_i64(self.seq_len),
            allocated_bytes=_i64(self.allocated_bytes),
            reserved_bytes=_i64(self.reserved_bytes),
            allocator_setting=self.allocator_setting,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_gib": round(self.total_bytes / GIB, 3),
            "total_bytes": self.total_bytes,
            "breakdown_gib": {k: round(v / GIB, 3) for k, v in self.breakdown.items()},
            "breakdown_bytes": dict(self.breakdown),
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "micro_batch_size": self.micro_batch_size,
            "seq_len": self.seq_len,
            "peak_phase": self.phase,
            "allocated_gib": round(self.allocated_bytes / GIB, 3),
            "allocated_bytes": self.allocated_bytes,
            "reserved_gib": round(self.reserved_bytes / GIB, 3),
            "reserved_bytes": self.reserved_bytes,
            "allocator_setting": self.allocator_setting,
            "notes": list(self.notes),
        }


INT64_MAX = (1 << 63) - 1


def _i64(n: int) -> int:
    return max(-INT64_MAX, min(int(n), INT64_MAX))


def format_gib(n: int) -> str:
    """Quantity-like string rounded up to 0.1 Gi (an estimate shown must not read lower than it is)."""
    return f"{math.ceil(n / GIB * 10) / 10:.1f}Gi"


# ---- activation model ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ctx:
    w: int  # bytes of base weights / residual stream (embedding output dtype)
    c: int  # compute (autocast) bytes
    a: int  # adapter bytes
    autocast: bool
    trainable: bool  # block weights trained (full, freeze top-k)
    quantized: bool  # block linears are bitsandbytes modules (output in their input dtype)
    adapted: tuple[tuple[str, int], ...]  # group -> number of LoRA-adapted modules in this block
    dropout: bool  # LoRA dropout > 0
    rank: int  # LoRA rank: lora_A's output is saved for lora_B
    kv_factor: float  # prefix tuning: keys/values span s + n_virtual
    mask: bool  # an explicit attention mask (sliding window / prefix): no native GQA in SDPA
    s_kv: int  # keys per query row (eager attention stores scores of this length)
    moe_lora: bool = False  # peft adapts the router and 3D experts: their inputs are saved as if trained
    liger: bool = False  # Liger's RMSNorm replaces transformers' (fusedKernels)
    liger_mlp: bool = False  # and its SwiGLU/GeGLU the MLP's activation (one it computes)


def _group(x: _Ctx, d: int, g: int, saved_already: bool, base: int, n_ad: int) -> int:
    """Bytes per token that a group of linears sharing one input tensor (width d, g bytes/elt) keeps."""
    tot = 0
    shared = False
    if base and x.trainable and not x.quantized:
        if x.autocast and g != x.c:
            tot += base * x.c * d  # each linear autocasts its own copy (only leaf casts are cached)
        else:
            shared = True
    if n_ad:
        tot += n_ad * x.rank * (x.c if x.autocast else x.a)  # lora_A output, saved by lora_B
        if g != x.a:  # peft casts the input to the adapter dtype: a new tensor per module
            if x.dropout:
                tot += n_ad * d  # bool mask
            tot += n_ad * (x.c if (x.autocast and x.a != x.c) else x.a) * d
        elif x.dropout:
            tot += n_ad * d + n_ad * (x.c if (x.autocast and g != x.c) else g) * d
        elif x.autocast and g != x.c:
            tot += n_ad * x.c * d
        else:
            shared = True
    if shared and not saved_already:
        tot += g * d
    return tot


def _counts(blk: Block) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in blk.linears:
        out[m.group] = out.get(m.group, 0) + 1
    return out


class _BlockView(NamedTuple):
    """One block as its saved-activation terms read it."""

    arch: Architecture
    blk: Block
    x: _Ctx
    base: dict[str, int]  # group -> linears of the block
    adapted: dict[str, int]  # group -> LoRA-adapted linears

    def group(
        self, group: str, width: int, dtype_bytes: int, saved_already: bool, more_base: int = 0, more_adapted: int = 0
    ) -> int:
        """_group for the block's linears of ``group`` (plus ``more_*`` modules reading the same input)."""
        return _group(
            self.x,
            width,
            dtype_bytes,
            saved_already,
            self.base.get(group, 0) + more_base,
            self.adapted.get(group, 0) + more_adapted,
        )

    def linear_output(self, input_bytes: int) -> int:
        """Bytes per element of a linear's output."""
        if self.x.quantized:
            return input_bytes  # bitsandbytes casts the result back to the input dtype
        return self.x.c if self.x.autocast else max(input_bytes, self.x.w)

    def layer_norms(self, count: int, shared_input: bool) -> int:
        # LayerNorm: under autocast it runs in fp32 and saves an fp32 copy of its input (one per call: only
        # casts of leaf tensors are cached) plus fp32 mean/rstd; without autocast it saves the input itself.
        hidden, w = self.arch.hidden_size, self.x.w
        if self.x.autocast:
            return count * (4 * hidden + 8)
        return (1 if shared_input else count) * w * hidden + count * 2 * w


def _block_bytes(arch: Architecture, blk: Block, x: _Ctx) -> int:
    """Saved activations of one block, bytes per token (sequence position)."""
    view = _BlockView(arch, blk, x, _counts(blk), dict(x.adapted))
    terms = _FAMILY_TERMS[arch.family](view)
    # summed in the order the terms come: a prefix's kv_factor makes some of them floats, and the int() at the
    # end must see the same float sum whatever the code's shape
    return int(sum(terms))


def _decoder_terms(v: _BlockView) -> list[float]:
    """llama and phi3: pre-norm RMSNorm blocks, SDPA (or Gemma 2's eager) attention, a gated MLP or MoE."""
    arch, x = v.arch, v.x
    hidden, weight_trains = arch.hidden_size, x.trainable
    # RMSNorm saves an fp32 copy of its input (pow/mul) and the fp32 rsqrt; the weight product's input if
    # the weight trains (Gemma: the fp32 normalized tensor).
    per_norm = 4 * hidden + 4 + ((4 * hidden if arch.norm == "gemma" else x.w * hidden) if weight_trains else 0)
    if x.liger:  # Liger's RMSNorm keeps its input (a view) and the fp32 rstd, and derives dW from them
        per_norm = x.w * hidden + 4
    norm_out = x.w  # norm output: weight(w) * x.to(w)
    terms: list[float] = [arch.norms_per_block * per_norm, v.group(ATTN_IN, hidden, norm_out, False)]
    terms += _decoder_attention_terms(v, v.linear_output(norm_out))
    # the MoE router reads the norm output too
    terms.append(
        v.group(MLP_IN, hidden, norm_out, False, 1 if v.blk.moe else 0, 1 if x.moe_lora and v.blk.param_targets else 0)
    )
    if v.blk.moe is None:
        mlp_out = v.linear_output(norm_out)
        # act input, act output, up output; Liger's SwiGLU/GeGLU keeps gate and up and recomputes the act
        terms.append((2 if x.liger_mlp else 3) * mlp_out * arch.intermediate_size)
        terms.append(v.group(MLP_MID, arch.intermediate_size, mlp_out, False))
    else:
        terms += _moe_terms(v, norm_out)
    return terms


def _decoder_attention_terms(v: _BlockView, qkv_out: int) -> list[float]:
    """q/k norms, what SDPA (or eager attention) saves, and o_proj's input; ``qkv_out``: the projections' bytes."""
    arch, x = v.arch, v.x
    q_dim, kv_dim, heads, kv_factor = arch.q_dim, arch.kv_dim, arch.num_heads, x.kv_factor
    attn = x.c if x.autocast else max(qkv_out, x.w)  # bytes of the attention's tensors
    terms: list[float] = []
    if arch.qk_norm:  # per-head RMSNorm on q and k
        terms.append(4 * (q_dim + kv_dim) + 4 * (heads + arch.num_kv_heads))
        if x.trainable:
            terms.append((4 if arch.norm == "gemma" else x.w) * (q_dim + kv_dim))
    if arch.eager_attention:
        # eager: q and head-repeated k, v saved by the matmuls; per score: the soft-cap tanh output,
        # the fp32 softmax and its compute-dtype cast; the output is re-laid out for o_proj (a copy)
        terms.append(
            attn * 3 * q_dim * kv_factor + heads * x.s_kv * (attn + 4 + (attn if arch.attn_softcapping else 0))
        )
        terms.append(v.group(ATTN_OUT, q_dim, attn, False))
        return terms
    repeated = x.mask and arch.num_kv_heads != heads
    if x.mask:  # SDPA turns the bool mask into an additive one in the compute dtype, per call, kept for backward
        terms.append(attn * x.s_kv)
    kv_saved = q_dim if repeated else kv_dim  # repeat_kv when a mask is given
    terms.append(attn * (2 * q_dim + 2 * kv_saved * kv_factor) + 4 * heads)  # q, k, v, out (+ fp32 logsumexp)
    if arch.family == "phi3" and not repeated and kv_factor == 1:
        # v is a view of the fused qkv_proj output, so SDPA keeps all of it alive (the trainer runs
        # without a KV cache, whose concatenation would have copied v out)
        terms.append(attn * (q_dim + kv_dim))
    terms.append(v.group(ATTN_OUT, q_dim, attn, True))
    return terms


def _moe_terms(v: _BlockView, norm_out: int) -> list[float]:
    """A sparse block's MLP: routed experts (3D tensors) and the optional shared expert."""
    arch, x, moe = v.arch, v.x, v.blk.moe
    assert moe is not None
    hidden = arch.hidden_size
    expert_out = x.c if x.autocast else x.w  # experts are 3D tensors: plain autocast matmuls, never quantized
    gathered_input = (x.c if (x.autocast and norm_out != x.c) else norm_out) * hidden
    # per routed (token, expert): gathered input (if trained), gate_up output, act output, product
    # (if trained), down output (kept for the routing-weight product), routing weight and indices
    experts_train = x.trainable or (x.moe_lora and bool(v.blk.param_targets))  # expert weights require grad
    per_route = (
        3 * expert_out * moe.intermediate
        + expert_out * hidden
        + 28
        + ((gathered_input + expert_out * moe.intermediate) if experts_train else 0)
    )
    terms: list[float] = [moe.top_k * per_route + 4 * moe.experts + 12 * moe.top_k + 4]  # router probs, top-k
    if moe.shared_intermediate:
        shared_out = v.linear_output(norm_out)
        terms.append(3 * shared_out * moe.shared_intermediate + shared_out * hidden + 8)  # + shared-expert gate
        terms.append(v.group(SHARED_MID, moe.shared_intermediate, shared_out, False))
    return terms


class _LayerNormBlock(NamedTuple):
    """The bytes per element gpt_neox, gpt2 and bert blocks share."""

    hidden: int
    inter: int
    norm_out: int  # a LayerNorm's output (BERT: the block input): fp32 under autocast
    linear_out: int  # a linear's output reading it
    attn: int  # the attention's tensors


def _layer_norm_block(v: _BlockView) -> _LayerNormBlock:
    x = v.x
    norm_out = 4 if x.autocast else x.w
    linear_out = v.linear_output(norm_out)
    return _LayerNormBlock(
        v.arch.hidden_size, v.arch.intermediate_size, norm_out, linear_out, x.c if x.autocast else linear_out
    )


def _gpt_neox_terms(v: _BlockView) -> list[float]:
    arch = v.arch
    d = _layer_norm_block(v)
    terms: list[float] = [
        v.layer_norms(2, arch.parallel_residual),
        v.group(ATTN_IN, d.hidden, d.norm_out, False),
        d.attn * 4 * d.hidden + 4 * arch.num_heads,
    ]  # q and k (rotary makes new tensors), v, out
    if v.x.kv_factor == 1:  # v is a view of the fused query_key_value output: all of it stays alive (as phi3)
        terms.append(d.attn * 2 * d.hidden)
    terms += [
        v.group(ATTN_OUT, d.hidden, d.attn, True),
        v.group(MLP_IN, d.hidden, d.norm_out, False),
        d.linear_out * d.inter,  # gelu input
        v.group(MLP_MID, d.inter, d.linear_out, False),
    ]
    return terms


def _gpt2_terms(v: _BlockView) -> list[float]:
    arch = v.arch
    d = _layer_norm_block(v)
    return [
        v.layer_norms(2, False),
        v.group(ATTN_IN, d.hidden, d.norm_out, False),
        # q, k, v are views of c_attn's output; out
        d.linear_out * 3 * d.hidden + d.attn * d.hidden + 4 * arch.num_heads,
        v.group(ATTN_OUT, d.hidden, d.attn, True),
        v.group(MLP_IN, d.hidden, d.norm_out, False),
        (4 if arch.act == "gelu_new" else 1) * d.linear_out * d.inter,  # python gelu_new: 4 saves
        v.group(MLP_MID, d.inter, d.linear_out, False),
        _dropout_masks(arch),
    ]


def _bert_terms(v: _BlockView) -> list[float]:
    """Post-LN: the block input is the previous LayerNorm's output."""
    d = _layer_norm_block(v)
    return [
        v.group(ATTN_IN, d.hidden, d.norm_out, False),
        d.attn * 4 * d.hidden + 4 * v.arch.num_heads,  # q, k, v, out
        v.group(ATTN_OUT, d.hidden, d.attn, True),
        v.layer_norms(2, False),
        v.group(MLP_IN, d.hidden, d.norm_out, False),
        d.linear_out * d.inter,
        v.group(MLP_MID, d.inter, d.linear_out, False),
        _dropout_masks(v.arch),
    ]


def _dropout_masks(arch: Architecture) -> int:
    """Hidden dropout's bool masks (attention output and MLP output), per token."""
    return (2 if arch.hidden_dropout else 0) * arch.hidden_size


_FAMILY_TERMS = {
    "llama": _decoder_terms,
    "phi3": _decoder_terms,
    "gpt_neox": _gpt_neox_terms,
    "gpt2": _gpt2_terms,
    "bert": _bert_terms,
}


def _ckpt_bytes(arch: Architecture, x: _Ctx) -> int:
    """Gradient checkpointing keeps each block's input: the residual stream, per token."""
    if arch.family == "bert":
        return (4 if x.autocast else x.w) * arch.hidden_size
    return x.w * arch.hidden_size


def _head_bytes(arch: Architecture, x: _Ctx, head_trainable: bool) -> int:
    """Final norm (and BERT's LM-head transform) before the output projection, per token."""
    h = arch.hidden_size
    tot = 4 * h + (x.w * h if head_trainable else 0)
    if arch.head_linears:  # BERT: dense -> gelu -> LayerNorm
        tot += (x.c if x.autocast else x.w) * h * 2 + 4 * h
    if head_trainable:
        tot += (x.c if x.autocast else x.w) * h  # lm_head input, saved for its weight gradient
    return tot


# ---- the estimate ---------------------------------------------------------------------------------


def _method_info(arch: Architecture, plan: TrainingPlan) -> tuple[int, int, int, int]:
    """(trainable params reported, trainable params that get gradients, adapter params, params of the
    blocks that train)."""
    info = method_info(plan.method)
    if info.trains_all:
        used = arch.total_params - arch.extra_frozen_params
        return arch.total_params, used, 0, arch.block_params
    if info.settings == "lora":
        n = arch.lora_params(tuple(plan.lora_targets) or ("all-linear",), int(plan.lora_rank or 16))
        return n, n, n, 0
    if info.settings == "freeze":
        k = min(int(plan.trainable_layers or 1), arch.num_layers)
        blk = arch.blocks[0][1]
        n = k * blk.params
        if plan.train_embeddings:
            n += arch.head_params
        return n, n, 0, k * blk.params
    if info.virtual_tokens_in == "input":  # one embedding per virtual token
        n = int(plan.virtual_tokens or 20) * arch.hidden_size
        return n, n, n, 0
    if info.virtual_tokens_in == "kv":  # a key and a value per virtual token in every block
        n = int(plan.virtual_tokens or 20) * arch.num_layers * 2 * arch.kv_dim
        return n, n, n, 0
    raise ValueError(f"method {plan.method!r}: the estimator has no parameter count for it")


def _virtual_tokens(plan: TrainingPlan, where: str) -> int:
    """Virtual tokens the method puts ``where`` ("input": the sequence, "kv": every block's keys/values)."""
    return int(plan.virtual_tokens or 20) if method_info(plan.method).virtual_tokens_in == where else 0


def _ctx_for(arch: Architecture, plan: TrainingPlan, blk: Block, trainable: bool, autocast: bool) -> _Ctx:
    c = BYTES[plan.compute_dtype]
    info = method_info(plan.method)
    lora = info.settings == "lora"
    adapted: tuple[tuple[str, int], ...] = ()
    if lora:
        ids = {id(m) for _, m in arch.lora_modules(tuple(plan.lora_targets) or ("all-linear",))}
        counts: dict[str, int] = {}
        for m in blk.linears:
            if id(m) in ids:
                counts[m.group] = counts.get(m.group, 0) + 1
        adapted = tuple(sorted(counts.items()))
    nv = _virtual_tokens(plan, "kv")
    s = max(1, plan.seq_len)
    # Under checkpointing the two measured Liger rows (shared/calibration, 1B and 8B) peak where
    # transformers' saved set of the recomputed block puts them (within 0.2%), not lower as Liger's
    # smaller set would: why is unexplained, so the estimate keeps what was measured there.
    liger = (
        plan.fused_kernels
        and not plan.gradient_checkpointing
        and arch.model_type in LIGER_MODEL_TYPES
        and arch.family in ("llama", "phi3")
    )
    return _Ctx(
        w=BYTES[plan.weight_dtype],
        c=c,
        # adapters live in the trainable dtype (plan_from_spec sets it from kubetune.plan.ADAPTER_DTYPE)
        a=BYTES[plan.trainable_dtype if info.adapter else plan.adapter_dtype],
        autocast=autocast,
        trainable=trainable,
        quantized=info.quantized,
        adapted=adapted,
        dropout=lora and plan.lora_dropout > 0,
        rank=int(plan.lora_rank or 16) if lora else 0,
        kv_factor=(s + nv) / s,
        mask=_explicit_mask(arch, plan),
        s_kv=s + nv + _virtual_tokens(plan, "input"),
        moe_lora=lora and arch.targets_moe_params(tuple(plan.lora_targets) or ("all-linear",)),
        liger=liger,
        # Liger's Gemma types take GeGLU, the rest SwiGLU: with another activation the MLP stays transformers'
        liger_mlp=liger and arch.act_fn in (LIGER_GEGLU_ACTS if arch.norm == "gemma" else LIGER_SWIGLU_ACTS),
    )


_PLAN_KEY_FIELDS = tuple(f.name for f in dataclasses.fields(TrainingPlan) if f.name != "micro_batch_size")
# The fields the generated step trace (steptrace.build_trace, _ctx_for, _block_bytes) does not read: the
# simulation is keyed without them, so the plans a batch search or fit_advice tries (accumulation steps,
# GPU counts, sharding) share one simulation. steptrace's test checks the trace is the same across them.
# (the objective's sequences per example are in the trace's tokens, which are passed apart)
_TRACE_FREE_FIELDS = (
    "micro_batch_size",
    "gradient_accumulation_steps",
    "num_processes",
    "sharding",
    "lora_alpha",
    "quant_type",
    "embedding_states_32bit",
    "objective",
    "sequences_per_example",
    "evaluation_test_data",  # the end-of-run evaluation is a moment of its own, not part of the step
    "evaluation_new_tokens",
)
_TRACE_KEY_FIELDS = tuple(f for f in _PLAN_KEY_FIELDS if f not in _TRACE_FREE_FIELDS)
# attrgetter builds the keys in C: a list of getattr calls was a tenth of a cold estimate
_plan_key = attrgetter(*_PLAN_KEY_FIELDS)
_trace_key = attrgetter(*_TRACE_KEY_FIELDS)


def _explicit_mask(arch: Architecture, plan: TrainingPlan) -> bool:
    """Whether SDPA gets a materialized attention mask, which also turns off its native GQA (k/v are
    repeated per head): prefix tokens, a sliding window shorter than the sequence, or packing (the
    trainer passes position_ids and transformers builds a block-diagonal mask from them)."""
    sliding = arch.sliding_window is not None and plan.seq_len > arch.sliding_window
    return method_info(plan.method).virtual_tokens_in == "kv" or sliding or plan.packing


def estimate(
    arch: Architecture, plan: TrainingPlan, *, autocast: bool | None = None, allocator: str = ALLOC_DEFAULT
) -> Estimate:
    """Per-GPU device memory (CUDA context included) of training ``arch`` as ``plan`` says.

    ``autocast`` defaults to on whenever the compute dtype is bf16/fp16 (what both the HF Trainer with
    bf16=True and kubetune's trainer do); tests turn it off to compare with uncast CPU runs.
    ``allocator``: the PYTORCH_CUDA_ALLOC_CONF the reserved figure assumes, allocator.DEFAULT (torch's
    default, ``expandable_segments:False``: the plain HF Trainer stack; the safe default, since it
    reserves at least what expandable segments do on these traces) or allocator.EXPANDABLE (kubetune's
    trainer sets it unless the pod's env overrides it).
    """
    if allocator not in (ALLOC_DEFAULT, ALLOC_EXPANDABLE):
        raise ValueError(f"allocator must be {ALLOC_DEFAULT!r} or {ALLOC_EXPANDABLE!r}, got {allocator!r}")
    if autocast is None:
        autocast = AUTOCAST_WHEN_REDUCED and plan.compute_dtype != "fp32"
    # Every plan field but the micro batch: a hand-picked key once left packing out, and a cached
    # estimate without packing came back for a packed plan.
    key = (_plan_key(plan), autocast)
    cache = arch._cache
    per = cache.get(key)
    if per is None:
        per = _prepare(arch, plan, autocast)
        if len(cache) > 4096:
            cache.clear()
        cache[key] = per
    return _finish(arch, plan, per, autocast, allocator)


def _reserved_gap(arch: Architecture, plan: TrainingPlan, autocast: bool, b: int, s: int, allocator: str) -> int:
    """The simulator's reserved - allocated for the plan's step trace, cached per (plan, micro batch, setting).

    Simulated at micro batches that are powers of two (exact there); in between, the larger of the two
    neighbours' figures: a placement's batch search then costs at most one simulation per power of two."""
    from kubetune.estimator.steptrace import reserved_gap

    key = ("gap", _plan_key(plan), autocast, b, allocator)
    cache = arch._cache
    gap = cache.get(key)
    if gap is None:
        hi = 1 << (b - 1).bit_length()
        anchors = (b,) if hi == b else (hi >> 1, hi)
        pkey = _trace_key(plan)  # what the trace reads, but the tokens
        gap = max(
            reserved_gap(
                arch, plan, autocast=autocast, tokens=a * s, expandable=allocator == ALLOC_EXPANDABLE, plan_key=pkey
            )
            for a in anchors
        )
        if len(cache) > 4096:
            cache.clear()
        cache[key] = gap
    return gap


@dataclass(frozen=True)
class _Prepared:
    """Everything that does not scale with the micro batch: computed once per (arch, plan-without-batch)."""

    weights: int
    adapters: int
    grads: int  # all gradients (optimizer moment)
    grads_head: int  # gradients alive right after the output head's backward
    grads_bottom: int  # gradients alive at the last block's backward
    grads_early: int  # gradients alive during the forward (accumulation, adapters)
    optimizer: int
    tied_accum: int  # tied embeddings: the embedding's gradient and its sum with the head's, at the end of the backward
    comm_static: int  # DDP buckets, ZeRO buckets (persistent)
    comm_transient: int  # FSDP unsharded units (forward / backward)
    nccl: int
    copies_loss: int  # autocast weight copies alive at the loss
    copies_block: int  # autocast copies of one block's weights in its backward
    # per token bytes
    act_all: int  # saved activations of every block that keeps them (no GC) / checkpoints (GC)
    act_block: int  # one block's saved activations (the recomputed one under GC)
    ckpt_one: int
    head: int
    bwd_transient: int
    fwd_transient: int
    logits_per_token: int  # unfused: k*V; fused: the grad of the hidden state
    fused: bool
    extra_tokens: int  # prompt tuning: virtual tokens join the sequence
    mask_per_s2: int  # explicit attention mask bytes per (b * s * s_kv)
    trainable_params: int
    fused_head_grad: int  # Liger's head gradient, alive from the fused loss on (0: no trained head, or unfused)
    fused_head_transient: int  # its fallback's [V, h] product and fp32 copy, per chunk (0: in place)
    notes: tuple[str, ...]
    # QLoRA under FSDP: what a GPU holds while loading, before FSDP shards the model (0: no such peak)
    load_weights: int = 0
    load_adapters: int = 0
    load_unit: int = 0
    # the objective (docs/estimator.md "Objectives"): sequences each example puts through the forward (chosen and
    # rejected: 2), a frozen reference copy of the weights, and the no-grad reference forward before the policy's
    seqs: int = 1
    ref_weights: int = 0
    ref_forward: bool = False
    resid: int = 0  # the residual stream, per token: a block's input and output in the reference forward
    ref_block: int = 0  # one frozen block's activations, per token (the reference forward holds one at a time)
    ref_logit_bytes: int = 0  # bytes per logit while the reference's log-probs are taken
    evaluation: "_Evaluation | None" = None  # the end-of-run evaluation (None: the plan has none)


class _Setup(NamedTuple):
    """What every section of _prepare reads: bytes per element, the method, how the model states are sharded."""

    weight: int  # bytes of a base weight
    trainable: int  # bytes of a trainable parameter, hence of its gradient (and AdamW's states but 8-bit)
    compute: int  # bytes of the autocast compute dtype
    info: MethodInfo
    full: bool  # every weight trains
    freeze: bool  # the top blocks train
    lora: bool
    head_trained: bool  # the output head (and the embedding) train
    gpus: int
    sharding: str  # "none" on one GPU
    shard: int  # what fsdp and zero3 divide the weights by (1 otherwise)
    autocast: bool
    reported: int  # trainable params, as the status reports them
    used_trainable: int  # trainable params that get gradients
    adapter_params: int
    trained_block_params: int  # params of the blocks that train


def _setup(arch: Architecture, plan: TrainingPlan, autocast: bool) -> _Setup:
    weight, trainable, compute = BYTES[plan.weight_dtype], BYTES[plan.trainable_dtype], BYTES[plan.compute_dtype]
    info = method_info(plan.method)
    full, freeze = info.trains_all, info.settings == "freeze"
    gpus = max(1, plan.num_processes)
    sharding = plan.sharding if gpus > 1 else "none"
    reported, used_trainable, adapter_params, trained_block_params = _method_info(arch, plan)
    return _Setup(
        weight=weight,
        trainable=trainable,
        compute=compute,
        info=info,
        full=full,
        freeze=freeze,
        lora=info.settings == "lora",
        head_trained=full or (freeze and plan.train_embeddings),
        gpus=gpus,
        sharding=sharding,
        shard=gpus if sharding in ("fsdp", "zero3") else 1,
        autocast=autocast,
        reported=reported,
        used_trainable=used_trainable,
        adapter_params=adapter_params,
        trained_block_params=trained_block_params,
    )


class _Weights(NamedTuple):
    per_gpu: int
    whole: float  # every GPU's share before sharding (QLoRA under FSDP loads all of it)


def weight_bytes(arch: Architecture, plan: TrainingPlan, s: _Setup) -> _Weights:
    """The base weights: quantized linears at their bits (biases stay in the weight dtype), the rest in it."""
    total = arch.total_params
    if s.info.quantized:
        bits = plan.quant_bits or 4
        q_lin = arch.linear_params  # quantized nn.Linear params (head linears too)
        bias = sum(cnt * m.d_out for cnt, b in arch.blocks for m in b.linears if m.bias)
        bias += sum(m.d_out for m in arch.head_linears if m.bias)
        per_q = INT8_BYTES if bits == 8 else (NF4_BYTES_DQ if plan.double_quant else NF4_BYTES)
        weights = (q_lin - bias) * per_q + (total - q_lin + bias) * s.weight
    else:
        weights = total * s.weight
    return _Weights(int(weights / s.shard), weights)


class _States(NamedTuple):
    adapters: int
    grads: int  # every gradient (the optimizer moment)
    optimizer: float  # AdamW's states


def trainable_state_bytes(arch: Architecture, plan: TrainingPlan, s: _Setup) -> _States:
    """Adapters, gradients and optimizer states per GPU (sharded as the plan says)."""
    t, n = s.trainable, s.gpus
    eight_bit = plan.optimizer in ("adamw-8bit", "paged-adamw-8bit")
    opt_per = BNB_8BIT_STATE if eight_bit else 2 * t  # exp_avg, exp_avg_sq in the trainable dtype
    adapters = s.adapter_params * t
    grads = s.used_trainable * t
    optimizer = s.used_trainable * opt_per
    if eight_bit and s.head_trained and plan.embedding_states_32bit:
        # the HF Trainer overrides every nn.Embedding to 32-bit bitsandbytes states (Trainer.create_optimizer:
        # register_module_override(..., {"optim_bits": 32})): 8 B/param there, found with the trace
        # (1B tied full fine-tune, 8-bit AdamW: 8% under without it). kubetune's trainer has no override.
        optimizer += arch.embed_params * (2 * 4 - opt_per)
    if s.sharding in ("fsdp", "zero3"):
        adapters, grads, optimizer = adapters // n, grads // n, int(optimizer / n)
    elif s.sharding == "zero2":
        grads, optimizer = grads // n, int(optimizer / n)
    return _States(adapters, grads, optimizer)


class _GradientTimeline(NamedTuple):
    early: int  # alive during the forward (accumulation, adapters)
    head: int  # right after the output head's backward
    bottom: int  # at the last block's backward
    tied_accum: int  # tied embeddings: the embedding's gradient and its sum with the head's, at the very end


def gradient_timeline(arch: Architecture, plan: TrainingPlan, s: _Setup, grads: int) -> _GradientTimeline:
    """Which of the gradients exist at each moment before the optimizer's."""
    t, shard = s.trainable, s.shard
    head_grad = (arch.lm_head_params or arch.embed_params) * t // shard if s.head_trained else 0
    accumulating = plan.gradient_accumulation_steps > 1
    # both stacks zero_grad(set_to_none) after every optimizer step: without accumulation no gradient exists
    # before the backward, adapters' neither (the calibration's LoRA rows: +0.3 to +0.8 % allocated when
    # they were counted, -0.0 % since; r64 in the sweep of benchmarks/alloc_trace.py: +2.0 to +3.0 %)
    early = grads if accumulating else 0
    emb_grad = arch.embed_params * t // shard if s.full else 0
    bottom = grads if accumulating else max(early, grads - emb_grad)
    # Tied embeddings: the output head's gradient already holds the shared weight's; the embedding's backward
    # makes a second one, and AccumulateGrad adds the two out of place: all gradients plus two [V, h] tensors
    # at the very end of the backward (what the trace of a tied 3B full fine-tune has alive at its peak)
    tied = 2 * arch.embed_params * t // shard if (s.head_trained and arch.tie_word_embeddings) else 0
    return _GradientTimeline(early, max(early, head_grad), bottom, tied)


class _Communication(NamedTuple):
    static: int  # DDP buckets, ZeRO buckets (persistent)
    transient: int  # FSDP unsharded units (forward / backward)
    nccl: int


def communication_bytes(arch: Architecture, s: _Setup) -> _Communication:
    static = transient = 0
    nccl = NCCL_BUFFERS if s.gpus > 1 else 0
    if s.sharding == "ddp":
        static = s.used_trainable * s.trainable  # DDP's flat gradient buckets (gradient_as_bucket_view=False)
    elif s.sharding == "zero2":
        static = 2 * min(s.used_trainable, DEEPSPEED_BUCKET) * s.compute
    elif s.sharding in ("fsdp", "zero3"):
        unsharded = s.compute if (s.autocast and s.weight != s.compute) else s.weight
        unit = arch.largest_block_params
        if s.info.quantized:
            unit = int(unit * 0.55)
        # a block's unsharded gradient: whole blocks train under full/freeze; the trainer wraps adapters
        # as units of their own (kubetune_trainer.loop.fsdp_wrap_policy), so frozen blocks have none
        unit_grad = unit * s.trainable if not s.info.adapter else 0
        transient = arch.head_params * unsharded + 2 * unit * unsharded + unit_grad
    return _Communication(static, transient, nccl)


class _ModelLoad(NamedTuple):
    weights: int
    adapters: int
    unit: int


def model_load_bytes(arch: Architecture, plan: TrainingPlan, s: _Setup, weights_whole: float) -> _ModelLoad:
    """What a GPU holds while loading, when that can be the peak (0s: it cannot)."""
    if not (s.info.quantized and s.sharding == "fsdp"):
        return _ModelLoad(0, 0, 0)
    # bitsandbytes quantizes while loading onto the GPU, so every rank holds the whole 4-bit model
    # until FSDP wraps it (kubetune_trainer.model.loading_place), plus the flat copy of the unit
    # being wrapped; other methods load in host memory and reach the GPU a unit at a time
    weights = int(weights_whole)
    if plan.reference == "copy":  # the reference copy is loaded the same way
        weights *= 2
    return _ModelLoad(weights, s.adapter_params * s.trainable, int(arch.largest_block_params * 0.55) * s.weight)


class _Copies(NamedTuple):
    loss: int  # weight copies alive at the loss
    block: int  # copies of one block's weights in its backward


def weight_copy_bytes(arch: Architecture, plan: TrainingPlan, s: _Setup) -> _Copies:
    """Weight copies the step makes: autocast's (fp32 weights or fp32 adapters, bf16 compute) and peft's merged MoE
    experts."""
    loss, block = _autocast_copies(arch, plan, s) if (s.autocast and s.weight != s.compute) else (0, 0)
    if s.lora and s.autocast and s.trainable != s.compute:
        # autocast's compute-dtype copies of the fp32 adapters, saved by their matmuls for the backward: every
        # block's through the forward without checkpointing, one block's with it (a recorded kubetune LoRA step
        # with Liger's kernels, no checkpointing: 568 B a token short per block without them, 2.9 %)
        per_block = s.adapter_params // max(1, arch.num_layers) * s.compute
        block += per_block
        if not plan.gradient_checkpointing:
            loss += s.adapter_params * s.compute
    if s.lora and arch.targets_moe_params(tuple(plan.lora_targets) or ("all-linear",)):
        # peft's ParamWrapper adds B@A to the whole expert tensor every forward: the merged expert weights
        # are saved for the backward (and their gradient materialized there): a per-block constant
        merged = max(b.expert_params for _, b in arch.blocks) * (s.compute if s.autocast else s.weight)
        sparse = sum(n for n, b in arch.blocks if b.param_targets)
        block += 2 * merged
        if not plan.gradient_checkpointing:
            loss += sparse * merged
    return _Copies(loss, block)


def _autocast_copies(arch: Architecture, plan: TrainingPlan, s: _Setup) -> tuple[int, int]:
    c, full, gc = s.compute, s.full, plan.gradient_checkpointing
    loss = 0
    lin_all = arch.linear_params
    head_lin = arch.lm_head_params or arch.embed_params
    if not s.info.adapter:
        trained_lin = lin_all if full else int(lin_all * s.trained_block_params / max(1, arch.block_params))
        # trainable leaves: autocast caches their bf16 copies for the whole forward; under checkpointing the
        # blocks' copies die with each block's forward and only the head's stays (the trace of a 1B
        # fp32-master full fine-tune with checkpointing: 6.7% over when they were counted)
        loss += (0 if gc else trained_lin * c) + (head_lin * c if full else 0)
    if not s.info.quantized:
        frozen_lin = lin_all - (lin_all if full else 0)
        if not gc and s.info.adapter:
            loss += frozen_lin * c  # saved by each frozen linear for its input gradient
    if not full:
        loss += head_lin * c  # the frozen output head's copy, saved for the hidden-state grad
    block = max(b.linear_params for _, b in arch.blocks) * c if not s.info.quantized else 0
    if s.shard > 1:
        loss //= s.shard
    return loss, block


class _Activations(NamedTuple):
    """Per token bytes."""

    all_blocks: int  # saved activations of every block that keeps them (no GC) / checkpoints (GC)
    one_block: int  # one block's saved activations (the recomputed one under GC)
    checkpoint: int  # one block's checkpoint (0 without checkpointing)
    head: int
    backward_transient: int
    forward_transient: int  # the last block's forward beyond the saved sets, without checkpointing
    logits: int  # unfused: k*V; fused: the grad of the hidden state
    extra_tokens: int  # prompt tuning: virtual tokens join the sequence
    mask_per_s2: int  # explicit attention mask bytes per (b * s * s_kv)


def activation_bytes(arch: Architecture, plan: TrainingPlan, s: _Setup) -> _Activations:
    all_blocks, one_block, ckpt = _saved_block_bytes(arch, plan, s)
    head = _head_bytes(arch, _ctx_for(arch, plan, arch.blocks[0][1], s.full, s.autocast), s.head_trained)
    if arch.family in ("gpt2", "bert") and arch.hidden_dropout:
        head += arch.hidden_size  # embedding dropout mask
    if plan.gradient_checkpointing and _virtual_tokens(plan, "input"):
        # checkpointing makes the embeddings' output a leaf that requires grad (enable_input_require_grads); peft
        # prepends the virtual tokens to it with a cat, and the graph keeps the leaf alive beside the cat's output
        # (a recorded 1B prompt-tuning step, b4 x 2048: -0.2 % without it; benchmarks/alloc_trace.py sweep)
        head += s.weight * arch.hidden_size
    inter = arch.intermediate_size
    moe = arch.blocks[0][1].moe
    if moe:
        inter = max(moe.top_k * moe.intermediate, moe.shared_intermediate)
    bwd = int(BWD_TRANSIENT_MLP * s.compute * inter + BWD_TRANSIENT_HIDDEN * s.compute * arch.hidden_size)
    if plan.fused_cross_entropy:
        logits = s.compute * arch.hidden_size + 4  # liger: grad of the hidden state + loss per token (+ chunks)
    else:
        logits = (UNFUSED_CE_BYTES + (SOFTCAP_EXTRA_BYTES if arch.final_logit_softcapping else 0)) * arch.vocab_size
    return _Activations(
        all_blocks=all_blocks,
        one_block=one_block,
        checkpoint=ckpt if plan.gradient_checkpointing else 0,
        head=head,
        backward_transient=bwd,
        forward_transient=0 if plan.gradient_checkpointing else _forward_transient(arch, plan, s),
        logits=logits,
        extra_tokens=_virtual_tokens(plan, "input"),
        mask_per_s2=1 if _explicit_mask(arch, plan) else 0,  # bool: one byte per (query, key) pair
    )


def _forward_transient(arch: Architecture, plan: TrainingPlan, s: _Setup) -> int:
    """Per token: what the last block's forward holds beyond every block's saved set, at its largest. LoRA on
    the MLP's down projection under autocast: peft casts its input (the MLP product, intermediate wide) to the
    adapters' fp32 before lora_A's autocast copy (the saved one), while the product and the MLP's input (the
    norm output) are alive too; the frozen base saves none of them. Where the loss is small (fused, or no
    checkpointing with few tokens' logits) that is the step's peak: kubetune's step with Liger's kernels and
    loss, no checkpointing, traced at small dims (tests/trainer/test_alloc_trace_kubetune.py), peaked there,
    2.2 % above the loss moments."""
    blk = arch.blocks[-1][1]
    if blk.moe is not None:
        return 0
    x = _ctx_for(arch, plan, blk, s.full, s.autocast)
    if x.trainable or not dict(x.adapted).get(MLP_MID) or not x.autocast or x.a == x.c:
        return 0
    # h-wide beside them: the norm output (the MLP's argument, alive until it returns), the base output, lora_B's
    # output and its scaled copy (the recorded step's peak: 2 of the 4 counted, -1.0 % before)
    return (x.a + x.c) * arch.intermediate_size + 4 * x.c * arch.hidden_size


def _saved_block_bytes(arch: Architecture, plan: TrainingPlan, s: _Setup) -> tuple[int, int, int]:
    """(what every block keeps, the largest block's saved set, a checkpoint), per token."""
    gc = plan.gradient_checkpointing
    if s.freeze:
        k = min(int(plan.trainable_layers or 1), arch.num_layers)
        blk = arch.blocks[0][1]
        trained = _block_bytes(arch, blk, _ctx_for(arch, plan, blk, True, s.autocast))
        # the frozen blocks below are on the gradient path when the embeddings train, and whenever
        # checkpointing is on: transformers' gradient_checkpointing_enable makes the embeddings' output
        # require grad (enable_input_require_grads), so every block keeps its checkpoint and is recomputed
        # (a recorded 1B freeze-top-4 step, b4 x 2048: -2.4 % without this; benchmarks/alloc_trace.py sweep)
        on_path = plan.train_embeddings or gc
        frozen = _block_bytes(arch, blk, _ctx_for(arch, plan, blk, False, s.autocast)) if on_path else 0
        n_frozen = arch.num_layers - k
        if gc:
            ckpt = _ckpt_bytes(arch, _ctx_for(arch, plan, blk, True, s.autocast))
            return ckpt * (k + n_frozen), max(trained, frozen), ckpt
        return trained * k + frozen * n_frozen, max(trained, frozen), 0
    all_blocks = one_block = ckpt = 0
    for cnt, blk in arch.blocks:
        x = _ctx_for(arch, plan, blk, s.full, s.autocast)
        saved = _block_bytes(arch, blk, x)
        one_block = max(one_block, saved)
        ckpt = _ckpt_bytes(arch, x)
        all_blocks += cnt * (ckpt if gc else saved)
    return all_blocks, one_block, ckpt


class _Reference(NamedTuple):
    weights: int  # a frozen copy of the weights (copy)
    forward: bool  # a no-grad forward before the policy's (implicit, copy)
    resid: int  # the residual stream, per token: a block's input and output in the reference forward
    block: int  # one frozen block's activations, per token (the reference forward holds one at a time)
    logit_bytes: int  # bytes per logit while the reference's log-probs are taken


def reference_bytes(arch: Architecture, plan: TrainingPlan, s: _Setup, weights: int) -> _Reference:
    """The reference model (dpo, kto): a frozen copy of the weights (copy) and/or a no-grad forward (implicit,
    copy) over the same sequences before the policy's; precomputed has neither in the step."""
    ref_weights = weights if plan.reference == "copy" else 0  # the same dtype, quantization and sharding
    if plan.reference not in ("implicit", "copy"):
        return _Reference(ref_weights, False, 0, 0, 0)
    resid = _ckpt_bytes(arch, _ctx_for(arch, plan, arch.blocks[0][1], s.full, s.autocast))
    block = 0
    for _, blk in arch.blocks:  # frozen, adapters off (implicit) or none (copy)
        x = dataclasses.replace(
            _ctx_for(arch, plan, blk, False, s.autocast), adapted=(), dropout=False, rank=0, moe_lora=False
        )
        block = max(block, _block_bytes(arch, blk, x))
    logit = s.compute + REF_LOGIT_FP32_BYTES + (SOFTCAP_EXTRA_BYTES if arch.final_logit_softcapping else 0)
    return _Reference(ref_weights, True, resid, block, logit)


class _Evaluation(NamedTuple):
    """The end-of-run evaluation's per-token bytes (kubetune_trainer.evaluation), batch 1."""

    test_data: bool  # a no-grad forward over each test sequence, its logits to fp32 (token accuracy)
    new_tokens: int  # greedy answers of up to this many tokens (0: none)
    layer: int  # a block's input and output and one block's no-grad tensors, per token
    kv_cache: int  # the generation's KV cache, per cached token: keys and values of every layer
    copies: int  # autocast's cached casts of the trainable weights, alive for the whole evaluation


def evaluation_bytes(arch: Architecture, plan: TrainingPlan, s: _Setup) -> _Evaluation | None:
    """What the evaluation's forwards hold per token. Under FSDP the trainer skips the answers (generate would
    need every weight gathered on every rank): the test set's forward alone."""
    new_tokens = 0 if s.sharding == "fsdp" else plan.evaluation_new_tokens
    if not (plan.evaluation_test_data or new_tokens):
        return None
    x = _ctx_for(arch, plan, arch.blocks[0][1], s.full, s.autocast)
    layer = 0
    for _, blk in arch.blocks:  # frozen in eval mode (no dropout), adapters on: the tuned model
        bx = dataclasses.replace(_ctx_for(arch, plan, blk, False, s.autocast), dropout=False)
        layer = max(layer, _block_bytes(arch, blk, bx))
    # keys and values come out of the projections (and RoPE) in the compute dtype under autocast
    kv = 2 * arch.num_layers * arch.kv_dim * (s.compute if s.autocast else s.weight)
    return _Evaluation(
        plan.evaluation_test_data, new_tokens, 2 * _ckpt_bytes(arch, x) + layer, kv, _cached_casts(arch, s)
    )


def _cached_casts(arch: Architecture, s: _Setup) -> int:
    """Autocast caches its cast of every fp32 leaf that requires grad until its region ends, grad mode or not, and
    one region spans the whole evaluation: a compute-dtype copy of each trainable linear weight (LoRA's, or the
    trained blocks' and head's), not per forward as in a training step (a CPU trace of the trainer's evaluation
    with fp32 LoRA weights has them alive at its peak)."""
    if not s.autocast or s.trainable == s.compute:
        return 0
    if s.info.adapter:
        return s.adapter_params * s.compute // s.shard if s.lora else 0  # prompt/prefix: embeddings, never cast
    trained = (
        arch.linear_params if s.full else int(arch.linear_params * s.trained_block_params / max(1, arch.block_params))
    )
    head = (arch.lm_head_params or arch.embed_params) if s.head_trained else 0
    return (trained + head) * s.compute // s.shard


def evaluation_moment(arch: Architecture, plan: TrainingPlan, ev: _Evaluation, extra_tokens: int) -> _Moment:
    """The end-of-run evaluation after the last step: weights and optimizer states alive, no gradients (zero_grad
    set them to None), batch 1 at up to maxSeqLength tokens; its larger part of the two. Token accuracy: one
    block's tensors at a time, then the logits (the plain head: all positions). Answers: the prompt's prefill
    with its KV cache (generate asks for the last position's logits only: logits_to_keep=1), then the cache
    growing by a token per step to maxSeqLength + maxNewTokens."""
    t = plan.seq_len + extra_tokens
    kv_tokens = t + _virtual_tokens(plan, "kv")
    logits = EVAL_LOGIT_BYTES * arch.vocab_size * t if ev.test_data else 0
    scoring = max(logits, ev.layer * t) if ev.test_data else 0
    answering = 0
    if ev.new_tokens:
        answering = max(ev.kv_cache * kv_tokens + ev.layer * t, ev.kv_cache * (kv_tokens + ev.new_tokens))
    if scoring >= answering:
        return _Moment("evaluation", 0, scoring, ev.copies, logits if logits >= ev.layer * t else 0)
    return _Moment("evaluation", 0, answering, ev.copies, 0)


def _notes(arch: Architecture, plan: TrainingPlan, ref: _Reference) -> tuple[str, ...]:
    notes: list[str] = []
    if arch.approximate:
        notes.append(f"model_type {arch.model_type!r} is not modelled exactly: priced as a llama-style decoder")
    seqs = max(1, plan.sequences_per_example)
    if seqs > 1:
        notes.append(
            f"objective {plan.objective}: each example puts {seqs} sequences (chosen and rejected) through "
            f"one forward, so a micro batch of b examples is {seqs}b sequences"
        )
    if ref.weights:
        notes.append(f"reference copy: a frozen second copy of the model weights ({ref.weights / GIB:.1f} GiB per GPU)")
    return tuple(notes)


class _FusedHead(NamedTuple):
    grad: int
    transient: int


def fused_head_bytes(arch: Architecture, plan: TrainingPlan, s: _Setup) -> _FusedHead:
    """A trained head under Liger's fused loss (see LIGER_HEAD_GRAD_IN_PLACE): its gradient, made in the forward
    (the weight's dtype, the whole unsharded head), and the fallback's product plus its fp32 copy."""
    if not (plan.fused_cross_entropy and s.head_trained):
        return _FusedHead(0, 0)
    head = arch.lm_head_params or arch.embed_params
    return _FusedHead(head * s.trainable, head * sum(liger_head_fallback(plan)))


def liger_head_fallback(plan: TrainingPlan) -> tuple[int, ...]:
    """Bytes per head element of what Liger's fallback makes per chunk, in order: the [V, h] product in the
    compute dtype, then its fp32 copy (none when the product is fp32 already); () where it adds in place."""
    if plan.compute_dtype in LIGER_HEAD_GRAD_IN_PLACE:
        return ()
    c = BYTES[plan.compute_dtype]
    return (c, 4) if c != 4 else (c,)


def _prepare(arch: Architecture, plan: TrainingPlan, autocast: bool) -> _Prepared:
    s = _setup(arch, plan, autocast)
    weights = weight_bytes(arch, plan, s)
    states = trainable_state_bytes(arch, plan, s)
    grads = gradient_timeline(arch, plan, s, states.grads)
    comm = communication_bytes(arch, s)
    load = model_load_bytes(arch, plan, s, weights.whole)
    copies = weight_copy_bytes(arch, plan, s)
    acts = activation_bytes(arch, plan, s)
    ref = reference_bytes(arch, plan, s, weights.per_gpu)
    fused_head = fused_head_bytes(arch, plan, s)
    return _Prepared(
        weights=weights.per_gpu,
        adapters=states.adapters,
        grads=states.grads,
        grads_head=grads.head,
        grads_bottom=grads.bottom,
        grads_early=grads.early,
        optimizer=int(states.optimizer),
        tied_accum=grads.tied_accum,
        comm_static=comm.static,
        comm_transient=comm.transient,
        nccl=comm.nccl,
        copies_loss=copies.loss,
        copies_block=copies.block,
        act_all=acts.all_blocks,
        act_block=acts.one_block,
        ckpt_one=acts.checkpoint,
        head=acts.head,
        bwd_transient=acts.backward_transient,
        fwd_transient=acts.forward_transient,
        logits_per_token=acts.logits,
        fused=plan.fused_cross_entropy,
        extra_tokens=acts.extra_tokens,
        mask_per_s2=acts.mask_per_s2,
        trainable_params=s.reported,
        fused_head_grad=fused_head.grad,
        fused_head_transient=fused_head.transient,
        notes=_notes(arch, plan, ref),
        load_weights=load.weights,
        load_adapters=load.adapters,
        load_unit=load.unit,
        seqs=max(1, plan.sequences_per_example),
        ref_weights=ref.weights,
        ref_forward=ref.forward,
        resid=ref.resid,
        ref_block=ref.block,
        ref_logit_bytes=ref.logit_bytes,
        evaluation=evaluation_bytes(arch, plan, s),
    )


class _Moment(NamedTuple):
    """What is alive at one moment of the step."""

    name: str
    grads: int
    activations: int  # the logits' buffers included
    copies: int
    logits: int  # the logits' part of ``activations``


def _finish(arch: Architecture, plan: TrainingPlan, p: _Prepared, autocast: bool, allocator: str) -> Estimate:
    b = max(1, plan.micro_batch_size)
    s = plan.seq_len + p.extra_tokens
    moment = _peak(_moments(arch, plan, p, b, s), p.comm_transient)
    # allocator fragmentation: what the caching-allocator simulator reserves beyond the allocated peak when it
    # replays this plan's step
    frag = _reserved_gap(arch, plan, autocast, b, s * p.seqs, allocator)
    overhead = int(CUDA_CONTEXT + MISC + frag)
    breakdown = {
        "weights": int(p.weights + p.ref_weights),
        "gradients": int(moment.grads),
        "optimizer": int(p.optimizer),
        "adapters": int(p.adapters),
        "activations": int(moment.activations - moment.logits + moment.copies),
        "logits": int(moment.logits),
        "overhead": overhead,
        "communication": int(p.comm_static + (p.comm_transient if moment.name != "optimizer" else 0) + p.nccl),
    }
    total, phase, notes = sum(breakdown.values()), moment.name, p.notes
    load = _model_load(p)
    if load is not None and sum(load.values()) > total:
        breakdown, total, phase, frag = load, sum(load.values()), "model load", LOAD_SLACK
        notes += (
            f"QLoRA under FSDP: every GPU holds the whole 4-bit model ({p.load_weights / GIB:.1f} GiB) while "
            "loading, before FSDP shards it, and that sets the peak; give it GPUs that hold it, or use "
            "LoRA with FSDP (its ranks load in host memory and never hold the whole model)",
        )
    return Estimate(
        total_bytes=total,
        breakdown=breakdown,
        total_params=arch.total_params,
        trainable_params=p.trainable_params,
        micro_batch_size=b,
        seq_len=plan.seq_len,
        phase=phase,
        plan=plan,
        notes=notes,
        allocated_bytes=int(total - CUDA_CONTEXT - frag),
        reserved_bytes=int(total - CUDA_CONTEXT),
        allocator_setting=allocator,
    )


def _moments(arch: Architecture, plan: TrainingPlan, p: _Prepared, b: int, s: int) -> list[_Moment]:
    """The moments of the step whose largest is the peak, for a micro batch of ``b`` and ``s`` tokens a sequence."""
    seqs = b * p.seqs  # sequences in one forward: chosen and rejected of every example for a paired objective
    tok = seqs * s
    gc = plan.gradient_checkpointing
    mask = p.mask_per_s2 * seqs * s * (s + _virtual_tokens(plan, "kv"))
    # cross-entropy buffers at the loss
    chunk = _logit_chunk(arch, tok)
    ce = p.logits_per_token * tok
    if p.fused:
        ce += 2 * chunk * arch.vocab_size * BYTES[plan.compute_dtype] + p.fused_head_transient
    acts_all = p.act_all * tok + p.head * tok + mask
    block = p.act_block * tok
    bwd = p.bwd_transient * tok
    moments = [
        # the loss: every saved activation (or checkpoint) plus the cross-entropy buffers
        _Moment("loss", p.grads_early + p.fused_head_grad, acts_all + ce, p.copies_loss, ce),
        # top of the backward: checkpoints, one recomputed block, its transients
        _Moment(
            "backward",
            p.grads_head,
            (acts_all + block if gc else acts_all) + bwd,
            p.copies_loss if not gc else p.copies_block,
            0,
        ),
        # bottom of the backward: (nearly) every gradient, one block
        _Moment(
            "backward", p.grads_bottom, (p.ckpt_one * tok + block if gc else block) + bwd + mask, p.copies_block, 0
        ),
        _Moment("optimizer", p.grads, 0, 0, 0),
        # end of the backward with tied embeddings (see tied_accum)
        _Moment("backward", p.grads + p.tied_accum, 0, 0, 0),
    ]
    if p.fwd_transient:
        # the last block's forward (no checkpointing): every block's saved set and its own transients
        moments.append(
            _Moment("forward", p.grads_early, p.act_all * tok + mask + p.fwd_transient * tok, p.copies_loss, 0)
        )
    if p.ref_forward:
        # the no-grad reference forward before the policy's: a block's input and output and one block's activations
        # at a time, then the log-probs of the logits (all of them unfused, a chunk of them fused); all freed before
        # the policy forward, which then starts from the same memory as without it
        ref_logits = p.ref_logit_bytes * arch.vocab_size * (chunk if p.fused else tok)
        ref_acts = (2 * p.resid + p.ref_block) * tok + mask + ref_logits
        moments.append(_Moment("reference forward", p.grads_early, ref_acts, 0, ref_logits))
    if p.evaluation is not None:
        moments.append(evaluation_moment(arch, plan, p.evaluation, p.extra_tokens))
    return moments


def _logit_chunk(arch: Architecture, tokens: int) -> int:
    """Tokens per chunk of the fused cross-entropy (Liger's: the power of two near tokens / ceil(V / h))."""
    inc = -(-arch.vocab_size // arch.hidden_size)
    return min(tokens, 1 << max(0, (-(-tokens // inc) - 1).bit_length()))


def _peak(moments: list[_Moment], comm_transient: int) -> _Moment:
    """The first of the largest moments (FSDP's unsharded units are alive in all but the optimizer's)."""
    best, best_total = moments[0], None
    for m in moments:
        total = m.grads + m.activations + m.copies + (comm_transient if m.name != "optimizer" else 0)
        if best_total is None or total > best_total:
            best, best_total = m, total
    return best


def _model_load(p: _Prepared) -> dict[str, int] | None:
    """The breakdown while a QLoRA model loads under FSDP (None: no such moment)."""
    if not p.load_weights:
        return None
    return {
        "weights": p.load_weights,
        "gradients": 0,
        "optimizer": 0,
        "adapters": p.load_adapters,
        "activations": 0,
        "logits": 0,
        "overhead": int(CUDA_CONTEXT + MISC + LOAD_SLACK),
        "communication": p.load_unit + p.nccl,
    }
