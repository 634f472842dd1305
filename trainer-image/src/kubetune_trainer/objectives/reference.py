"""The reference model of DPO and KTO: what the policy's log-probs are measured against.

- implicit: with an adapter method, the same model with its adapters disabled (peft's disable_adapter):
  no second copy of the weights, one more forward without grad.
- copy: a frozen deep copy of the policy as built (full or freeze fine-tuning): a second model's weights.
- precomputed: the reference log-probs of every example from one pass before training, kept on the
  examples: no reference forward during training, nor a second model.

Each reference runs without grad and in eval mode (no dropout), so the implicit and precomputed ones
give the same numbers. ``logps`` is called before the policy's forward in each micro batch: the
estimator prices the reference's transient logits before the policy's activations exist.
"""
from __future__ import annotations

import contextlib
import copy
import time
from typing import Callable

import torch

from kubetune_trainer.errors import BadConfig
from kubetune_trainer.model import LossHead
from kubetune_trainer.objectives import model_inputs


def sequence_logps(model, head: LossHead, batch: dict) -> torch.Tensor:
    """[rows] summed log-prob of each row's labelled (response) tokens; with grad when grad is on."""
    with head.computing_sequence_nll(batch["labels"]):
        return -head.loss_from(model(**model_inputs(batch)))


@contextlib.contextmanager
def evaluating(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        if was:
            model.train()


def unwrap(model, accelerator=None):
    """The module inside accelerate's wrappers (DDP, FSDP, torch.compile)."""
    if accelerator is not None:
        return accelerator.unwrap_model(model, keep_torch_compile=False)
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel) or type(model).__name__ == "FullyShardedDataParallel":
            model = model.module
        else:
            return model


def _is_fsdp(accelerator) -> bool:
    return accelerator is not None and accelerator.distributed_type.value == "FSDP"


class Reference:
    mode = ""

    def logps(self, model, head: LossHead, batch: dict) -> torch.Tensor:
        """[rows] reference log-probs of the batch's sequences, without grad."""
        raise NotImplementedError


class Implicit(Reference):
    """The policy with its adapters disabled."""

    mode = "implicit"

    def __init__(self, model, accelerator=None):
        from peft import PeftModel

        self.peft = unwrap(model, accelerator)
        if not isinstance(self.peft, PeftModel):
            raise BadConfig("objective.reference implicit is the base model with the adapters disabled, so it needs "
                            "an adapter method (lora, qlora, prompt-tuning, prefix-tuning); with this method use "
                            "objective.reference copy or precomputed")

    def logps(self, model, head, batch):
        # through the wrapper (FSDP gathers the weights there); disable_adapter acts on the PeftModel inside
        with torch.no_grad(), evaluating(model), self.peft.disable_adapter():
            return sequence_logps(model, head, batch)


class Policy(Reference):
    """The policy as it is now: the reference before any step (precomputed with full fine-tuning)."""

    mode = "policy"

    def logps(self, model, head, batch):
        with torch.no_grad(), evaluating(model):
            return sequence_logps(model, head, batch)


class Copy(Reference):
    """A frozen deep copy of the policy, made before training (and before a checkpoint loads)."""

    mode = "copy"

    def __init__(self, model, head: LossHead, accelerator=None):
        if _is_fsdp(accelerator) and unwrap(model, accelerator) is not model:
            # FSDP's flat shards cannot be deep-copied into a model; the copy is wrapped on its own below
            raise RuntimeError("objective.prepare must run before accelerator.prepare(model) for a copied reference")
        plain = unwrap(model, accelerator)
        with head.unpatched():  # the copy gets its own LossHead, not a hook into the policy's
            ref = copy.deepcopy(plain)
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        base = ref.get_base_model() if hasattr(ref, "get_base_model") else ref
        device = next(ref.parameters()).device
        self.head = LossHead(ref, base, fused=head.mode == "fused", device=device,
                             impl=head.impl if head.mode == "fused" else None)
        if accelerator is not None:
            # the policy's autocast and device; under FSDP sharded like it (rank 0's values broadcast as
            # for it), which accelerate does only outside evaluation mode (no DDP wrap: nothing trains)
            ref = accelerator.prepare_model(ref, evaluation_mode=not _is_fsdp(accelerator))
        self.model = ref

    def logps(self, model, head, batch):
        with torch.no_grad():
            return sequence_logps(self.model, self.head, batch)


class Precomputed(Reference):
    """Log-probs computed once by ``inner`` and carried by the examples (batch["ref_logps"])."""

    mode = "precomputed"

    def __init__(self, inner: Reference):
        self.inner = inner

    def compute(self, model, head, accelerator, examples: list, micro_batch: int, collate: Callable, pad_id: int,
                log: Callable[[str], None] = print) -> None:
        """One pass without grad over ``examples``, storing ref_logps on each. Every rank computes every
        example it is given, so all ranks run the same forwards (FSDP's collectives need that)."""
        device = accelerator.device if accelerator is not None else next(model.parameters()).device
        t0 = time.perf_counter()
        for i in range(0, len(examples), micro_batch):
            chunk = examples[i:i + micro_batch]
            for e in chunk:
                e.ref_logps = None  # the collated batch must not carry stale values into the forward
            b = _to(collate(chunk, pad_id), device)
            values = self.inner.logps(model, head, b).float().cpu().view(-1, len(chunk))  # [sequence j, example]
            for n, e in enumerate(chunk):
                e.ref_logps = tuple(float(v) for v in values[:, n])
        log(f"reference log-probs of {len(examples)} examples precomputed in {time.perf_counter() - t0:.1f}s")

    def logps(self, model, head, batch):
        if "ref_logps" not in batch:
            raise RuntimeError("objective.reference precomputed: this batch's examples have no reference log-probs; "
                               "the recipe must call objective.precompute_reference on them before training")
        return batch["ref_logps"]


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def build(mode: str, model, head: LossHead, accelerator, adapter: bool) -> Reference:
    if mode == "implicit":
        return Implicit(model, accelerator)
    if mode == "copy":
        return Copy(model, head, accelerator)
    if mode == "precomputed":
        return Precomputed(Implicit(model, accelerator) if adapter else Policy())
    raise BadConfig(f"unknown objective.reference {mode!r}: one of implicit, copy, precomputed")

