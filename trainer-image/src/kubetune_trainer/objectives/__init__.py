"""Training objectives, the trainer's half of the registry (kubetune.api.registry holds the facts).

An objective owns what differs between SFT and preference tuning: how records become examples, how a
micro batch is collated, what extra model it needs (a reference), its loss and its metrics. The recipe
calls these and nothing else, so adding an objective is one module here plus its ObjectiveInfo line.

The loss contract: ``loss`` returns the loss SUMMED over the batch's ``count`` units (label tokens for
SFT, examples for preference objectives) and metric SUMS over the same units. The recipe adds the
counts of every micro batch on every rank, scales each backward by processes / global count, and
divides the summed metrics by it, so gradient accumulation and data parallelism give the mean.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from kubetune.api import registry as api_registry

if TYPE_CHECKING:  # the trainer's modules import torch; the type names only
    import torch

_OBJECTIVES: dict[str, type["Objective"]] = {}


class Objective:
    """Base class. Subclasses set ``name`` (an api registry name) and override what differs."""

    name: str = ""
    packing: bool = False  # its examples may be packed several to a sequence (data.pack): SFT's are

    def __init__(self, spec, plan, log: Callable[[str], None] = print):
        self.spec, self.plan, self.log = spec, plan, log
        self.info = api_registry.objective(self.name)

    # --- data -----------------------------------------------------------------------------------
    def formats(self) -> tuple[str, ...]:
        """dataset.format values this objective reads (auto detects among them)."""
        raise NotImplementedError

    def examples(self, records: list[dict], fmt: str, tokenizer, max_len: int, stats) -> list:
        """Tokenized examples, in record order (the split and the schedule index them)."""
        raise NotImplementedError

    def collate(self, batch: list, pad_id: int, pad_to: int | None = None) -> dict:
        """Tensors for one micro batch plus ``count`` (units the loss is summed over) and ``num_tokens``."""
        raise NotImplementedError

    # --- model ----------------------------------------------------------------------------------
    def prepare(self, model, head, accelerator) -> None:
        """Once the model is built, before accelerator.prepare wraps it: a reference model (none for SFT)."""

    def precompute_reference(self, model, head, accelerator, pad_id: int, *example_lists: list) -> None:
        """After the model is wrapped, before a checkpoint loads (so from the base weights): reference
        log-probs computed once over each list of examples (train, validation). None for SFT."""

    # --- loss and metrics ------------------------------------------------------------------------
    def loss(self, model, head, batch: dict) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
        raise NotImplementedError

    def metric_names(self) -> tuple[str, ...]:
        return self.info.metrics


def model_inputs(batch: dict) -> dict:
    """What the model's forward takes out of a collated batch (the rest is labels and counts)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: the name must be one the API registry knows."""
    api_registry.objective(cls.name)  # UnknownName for a typo
    if cls.name in _OBJECTIVES:
        raise ValueError(f"objective {cls.name!r} is registered twice in the trainer")
    _OBJECTIVES[cls.name] = cls
    return cls


def get(name: str) -> type[Objective]:
    _load()
    try:
        return _OBJECTIVES[name]
    except KeyError:
        raise api_registry.UnknownName(
            f"objective {name!r} has no trainer implementation: one of {', '.join(sorted(_OBJECTIVES))}") from None


def names() -> tuple[str, ...]:
    _load()
    return tuple(_OBJECTIVES)


def _load() -> None:
    # Importing a module registers its objectives; one line per module.
    from kubetune_trainer.objectives import sft  # noqa: F401
    from kubetune_trainer.objectives import preference  # noqa: F401
