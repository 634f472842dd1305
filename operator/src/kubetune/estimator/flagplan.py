"""Training plans for the flag form of ``kubetune estimate``: the plain HF Trainer + PEFT stack.

``kubetune estimate -f job.yaml`` prices what kubetune's trainer does (``plan_from_spec``). The flag form
instead describes a run of the stack most tutorials use, the one shared/calibration measured:

- ``--precision bf16``: the model is loaded in bf16 and trained with ``bf16=True``: bf16 weights, bf16
  gradients and bf16 AdamW states (8 bytes a parameter for full fine-tuning), bf16 autocast.
- ``--precision fp32-mixed``: fp32 weights (the master copy), fp32 gradients and AdamW states, bf16
  autocast. ``--precision fp32``: no reduced precision at all.
- LoRA adapters as peft creates them: fp32 (``autocast_adapter_dtype=True``), so their gradients and
  AdamW states are fp32 too. Prompt/prefix embeddings are fp32 as well.
- QLoRA: bitsandbytes 4-bit (nf4, double quant) or 8-bit linears; ``prepare_model_for_kbit_training``
  upcasts every other parameter (embeddings, norms, output head) to fp32, which the plan expresses as
  ``weight_dtype="fp32"`` (the dtype of the non-quantized parts).
- cross-entropy unfused (transformers' ``ForCausalLMLoss``) unless ``fused_cross_entropy`` is asked for
  (liger-kernel's fused linear cross-entropy); gradient checkpointing off unless asked for.
- ``objective`` (sft by default) and its ``reference``, as kubetune's trainer runs them (docs/estimator.md
  "Objectives"): the flag form and ``-f`` price a preference objective alike; the defaults are the API's
  (``TrainingObjective.effective_reference``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from kubetune.api import registry
from kubetune.plan import TrainingPlan

if TYPE_CHECKING:
    from kubetune.api.v1alpha1 import ReferenceMode

METHODS = registry.METHOD_NAMES
PRECISIONS = ("bf16", "fp32-mixed", "fp32")
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit")
SHARDINGS = ("ddp", "fsdp", "zero2", "zero3")
LLAMA_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def plan_from_flags(
    *,
    method: str,
    micro_batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool = False,
    fused_cross_entropy: bool = False,
    fused_kernels: bool = False,
    packing: bool = False,
    precision: str = "bf16",
    optimizer: str = "adamw",
    lora_rank: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_targets: tuple[str, ...] = ("all-linear",),
    quant_bits: int = 4,
    double_quant: bool = True,
    trainable_layers: int = 2,
    train_embeddings: bool = False,
    virtual_tokens: int = 20,
    gpus: int = 1,
    sharding: str | None = None,
    gradient_accumulation_steps: int = 1,
    objective: str = "sft",
    reference: str | None = None,
    evaluation_test_data: bool = False,
    evaluation_new_tokens: int = 0,
) -> TrainingPlan:
    """The plan of a plain HF Trainer + PEFT run with these settings (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}")
    info = registry.method(method)
    obj = _objective(method, objective, reference, packing)
    weight, trainable, compute = _dtypes(precision)
    if info.adapter:
        trainable = "fp32"  # peft creates adapters and virtual tokens in fp32
    if info.quantized:
        weight = "fp32"  # prepare_model_for_kbit_training upcasts the non-quantized parameters
    settings = dict(lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets,
                    quant_bits=quant_bits, double_quant=double_quant, trainable_layers=trainable_layers,
                    train_embeddings=train_embeddings, virtual_tokens=virtual_tokens)  # fmt: skip
    kw = _method_fields(info, **settings)
    nproc = max(1, gpus)
    return TrainingPlan(
        method=method,
        weight_dtype=weight,  # type: ignore[arg-type]
        trainable_dtype=trainable,  # type: ignore[arg-type]
        compute_dtype=compute,  # type: ignore[arg-type]
        optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing,
        fused_cross_entropy=fused_cross_entropy,
        fused_kernels=fused_kernels,
        packing=packing,
        micro_batch_size=micro_batch_size,
        seq_len=seq_len,
        gradient_accumulation_steps=gradient_accumulation_steps,
        num_processes=nproc,
        # zero2 / zero3 are estimator-only strategies
        sharding=_sharding(info, nproc, sharding),  # type: ignore[arg-type]
        adapter_dtype="fp32",
        objective=objective,
        sequences_per_example=registry.objective(objective).sequences_per_example,
        reference=obj.effective_reference(method),
        evaluation_test_data=evaluation_test_data,
        evaluation_new_tokens=evaluation_new_tokens,
        **kw,
    )


def _method_fields(info: registry.MethodInfo, **f) -> dict:
    """The plan fields of the method's own settings (lora, quantization, freeze, virtual tokens)."""
    kw: dict = {}
    if info.settings == "lora":
        kw.update(lora_rank=f["lora_rank"], lora_alpha=f["lora_alpha"], lora_dropout=f["lora_dropout"],
                  lora_targets=tuple(f["lora_targets"]))  # fmt: skip
    if info.quantized:
        bits = f["quant_bits"]
        kw.update(
            quant_bits=bits, quant_type="nf4" if bits == 4 else None, double_quant=f["double_quant"] and bits == 4
        )
    if info.settings == "virtualTokens":
        kw.update(virtual_tokens=f["virtual_tokens"])
    if info.settings == "freeze":
        kw.update(trainable_layers=f["trainable_layers"], train_embeddings=f["train_embeddings"])
    return kw


def _dtypes(precision: str) -> tuple[str, str, str]:
    """(weights, trainable, compute) of a --precision."""
    if precision == "bf16":
        return "bf16", "bf16", "bf16"
    if precision == "fp32-mixed":
        return "fp32", "fp32", "bf16"
    if precision == "fp32":
        return "fp32", "fp32", "fp32"
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")


def _sharding(info: registry.MethodInfo, nproc: int, sharding: str | None) -> str:
    if nproc <= 1:
        return "none"
    if sharding is None:
        return "fsdp" if info.shard_by_default else "ddp"
    return sharding


def _objective(method: str, objective: str, reference: str | None, packing: bool):
    """The objective as the API would take it (the same rules, the same defaults)."""
    from kubetune.api.base import one_of
    from kubetune.api.v1alpha1 import TrainingObjective

    if objective not in registry.OBJECTIVE_NAMES:
        raise ValueError(f"objective must be one of {', '.join(registry.OBJECTIVE_NAMES)}")
    info = registry.objective(objective)
    if reference is not None:
        if reference not in registry.REFERENCE_MODES:
            raise ValueError(f"reference must be one of {', '.join(registry.REFERENCE_MODES)}")
        if not info.reference:
            raise ValueError(
                f"reference: only valid with objective {one_of(registry.objective_names(reference=True))} "
                f"({one_of(registry.objective_names(reference=False), 'and')} use no reference model)"
            )
        if reference == "implicit" and not registry.method(method).adapter:
            raise ValueError(
                f"reference implicit needs an adapter method "
                f"({one_of(registry.method_names(adapter=True))}): it disables the adapters to get the "
                "base model"
            )
    if packing and info.data != "sft":
        raise ValueError(f"packing: only valid with objective {one_of(registry.objective_names(data='sft'))}")
    # model_construct does not validate: reference was checked against registry.REFERENCE_MODES above
    return TrainingObjective.model_construct(type=objective, reference=cast("ReferenceMode | None", reference))
