"""Preference objectives: DPO, ORPO, KTO and SimPO.

Each micro batch is one forward of every sequence ([chosen..., rejected...], prefdata.collate), giving
per-sequence summed log-probs of the response tokens (LossHead.computing_sequence_nll, without full
logits in fused mode); the reference's come first (reference.py). The losses are the pure functions of
losses.py, summed over the batch's live examples; the metrics are sums over the same examples.

The recipe's calls, in order:
    obj = objectives.get(spec.objective.type)(spec, plan, log)
    records, fmt = data.read_records(files, spec.dataset.format, on_bad_line, stats, formats=obj.formats())
    examples = obj.examples(records, fmt, tokenizer, max_len, stats)
    obj.prepare(model, head, accelerator)          # built model, BEFORE accelerator.prepare(model)
    model = accelerator.prepare(model)
    obj.precompute_reference(model, head, accelerator, pad_id, train, validation)  # before a checkpoint loads
    ... per micro batch: b = obj.collate(batch, pad_id); loss, metrics = obj.loss(model, head, b)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from kubetune.api import registry as api_registry

from kubetune_trainer import data as dt
from kubetune_trainer.errors import BadConfig
from kubetune_trainer.objectives import Objective, losses, prefdata, reference, register


@dataclass(frozen=True)
class Settings:
    beta: float
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    gamma: float = 0.0
    desirable_weight: float = api_registry.DEFAULT_LABEL_WEIGHT
    undesirable_weight: float = api_registry.DEFAULT_LABEL_WEIGHT
    reference: str | None = None  # implicit | copy | precomputed; None: the objective needs none


def settings_for(spec, plan, info: api_registry.ObjectiveInfo) -> Settings:
    """spec.objective's settings, defaults applied by its effective_* helpers (the API's one place for
    them); read with getattr, so a spec without objective, or a test's SimpleNamespace of the raw fields,
    gets the registry's defaults."""
    o = getattr(spec, "objective", None)

    def get(name: str, default):
        v = getattr(o, f"effective_{name}", None)
        if v is None:
            v = getattr(o, name, None)
        return default if v is None else v

    ref = None
    if info.reference:
        eff = getattr(o, "effective_reference", None)
        adapter = api_registry.method(plan.method).adapter
        ref = eff(plan.method) if callable(eff) else get("reference", "implicit" if adapter else "copy")
        if ref == "implicit" and not adapter:
            raise BadConfig(f"objective.reference implicit (the base with the adapters disabled) needs an adapter "
                            f"method, not method.type {plan.method}: use copy or precomputed")
    return Settings(beta=float(get("beta", info.default_beta)),
                    loss=get("loss", info.loss_variants[0] if info.loss_variants else "sigmoid"),
                    label_smoothing=float(get("label_smoothing", 0.0)),
                    gamma=float(get("gamma", info.default_gamma or 0.0)),
                    desirable_weight=float(get("desirable_weight", api_registry.DEFAULT_LABEL_WEIGHT)),
                    undesirable_weight=float(get("undesirable_weight", api_registry.DEFAULT_LABEL_WEIGHT)),
                    reference=ref)


class _Preference(Objective):
    def __init__(self, spec, plan, log: Callable[[str], None] = print):
        super().__init__(spec, plan, log)
        self.settings = settings_for(spec, plan, self.info)
        self.reference: reference.Reference | None = None

    # --- data -----------------------------------------------------------------------------------
    def formats(self) -> tuple[str, ...]:
        return api_registry.DATA_FORMATS[self.info.data]

    def examples(self, records: list[dict], fmt: str, tokenizer, max_len: int, stats) -> list:
        if fmt not in self.formats():
            raise BadConfig(f"objective {self.name} reads dataset.format {' or '.join(self.formats())}, not {fmt}")
        return prefdata.tokenize_all(records, fmt, tokenizer, max_len, stats)

    def collate(self, batch: list, pad_id: int, pad_to: int | None = None) -> dict:
        return prefdata.collate(batch, pad_id, pad_to)

    # --- model ----------------------------------------------------------------------------------
    def prepare(self, model, head, accelerator) -> None:
        """The reference, from the model as built: before accelerator.prepare(model) (a copy is made of
        the plain model and wrapped on its own under FSDP) and before a checkpoint loads."""
        if self.settings.reference is not None:
            adapter = api_registry.method(self.plan.method).adapter
            self.reference = reference.build(self.settings.reference, model, head, accelerator, adapter)
            self.log(f"objective {self.name}: reference {self.settings.reference}")

    def precompute_reference(self, model, head, accelerator, pad_id: int, *example_lists: list) -> None:
        """With reference precomputed: one pass without grad over each list (train, validation), storing
        the reference log-probs on the examples. After accelerator.prepare(model), before a checkpoint
        loads (the reference is the model as built). A no-op for any other reference."""
        if isinstance(self.reference, reference.Precomputed):
            for examples in example_lists:
                self.reference.compute(model, head, accelerator, examples, self.plan.micro_batch_size,
                                       self.collate, pad_id, self.log)

    # --- loss -----------------------------------------------------------------------------------
    def loss(self, model, head, batch: dict):
        ref = self.reference.logps(model, head, batch) if self.reference is not None else None  # first
        logps = reference.sequence_logps(model, head, batch)
        counts = (batch["labels"] != dt.IGNORE).sum(1).clamp(min=1).to(logps.dtype)
        live = batch["live"]
        per_example, metrics = self.terms(logps, counts, ref, batch)
        return (per_example * live.to(per_example.dtype)).sum(), metrics

    def terms(self, logps, counts, ref, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-example losses [B] and the metric sums."""
        raise NotImplementedError


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = t.shape[0] // 2
    return t[:b], t[b:]


@register
class DPO(_Preference):
    name = "dpo"

    def terms(self, logps, counts, ref, batch):
        s = self.settings
        (pc, pr), (rc, rr) = _halves(logps), _halves(ref)
        per = losses.dpo_losses(pc, pr, rc, rr, s.beta, s.loss, s.label_smoothing)
        return per, losses.pair_metrics(s.beta * (pc - rc), s.beta * (pr - rr), batch["live"])


class _LengthNormalized(_Preference):
    """ORPO and SimPO: no reference; their rewards are β·mean token log-prob (as TRL reports them)."""

    def terms(self, logps, counts, ref, batch):
        (pc, pr), (nc, nr) = _halves(logps), _halves(counts)
        beta = self.settings.beta
        return self.pair_losses(pc, pr, nc, nr), losses.pair_metrics(beta * pc / nc, beta * pr / nr, batch["live"])

    def pair_losses(self, pc, pr, nc, nr) -> torch.Tensor:
        raise NotImplementedError


@register
class ORPO(_LengthNormalized):
    name = "orpo"

    def pair_losses(self, pc, pr, nc, nr):
        return losses.orpo_losses(pc, pr, nc, nr, self.settings.beta)


@register
class SimPO(_LengthNormalized):
    name = "simpo"

    def pair_losses(self, pc, pr, nc, nr):
        s = self.settings
        return losses.simpo_losses(pc, pr, nc, nr, s.beta, s.gamma, s.label_smoothing)


@register
class KTO(_Preference):
    name = "kto"

    def terms(self, logps, counts, ref, batch):
        s = self.settings
        per, _ = losses.kto_losses(logps, ref, batch["desirable"], batch["live"], s.beta, s.desirable_weight,
                                   s.undesirable_weight)
        return per, losses.kto_metrics(s.beta * (logps - ref), batch["desirable"], batch["live"])
