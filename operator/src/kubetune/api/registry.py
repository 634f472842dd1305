"""The registry of fine-tuning methods and training objectives: one entry each.

An entry holds the facts about a method or objective that the API, the plan, the estimator and the
trainer all need, so none of them compares method strings of its own (peft's ``register_peft_method``
and kubeflow/trainer's runtime plugins are the models). Pure Python, no torch: the operator image
imports it. The trainer registers how each one builds its model and computes its loss under the same
names (``kubetune_trainer.registry``); a test checks that both sides list the same names.

Adding an objective: one ``ObjectiveInfo`` line here, one trainer module, tests.

    python -c "from kubetune.api import registry; print(registry.describe())"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# --- methods -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    adapter: bool  # trains a small adapter over frozen base weights; the output is adapter/, not model/
    peft_type: str | None = None  # peft's PeftType the trainer builds (None: plain transformers model)
    quantized: bool = False  # frozen base weights held in 4 or 8 bits (bitsandbytes; needs a GPU)
    mergeable: bool = False  # output.mergeAdapter can fold the adapter into the base weights
    master_weights: bool = False  # under bf16-mixed/fp16 the trained base weights keep an fp32 master copy
    shard_by_default: bool = False  # training.sharding auto picks fsdp across GPUs (whole model states per GPU)
    settings: str | None = None  # the method.<field> that configures it, valid with this method alone
    checkpointing: bool = True  # activation recomputation possible (prefix tuning's KV-cache tokens are not)
    trains_all: bool = False  # every weight trains (full); freeze trains its top blocks, adapters none of them
    # where learned virtual tokens go: "input" joins the sequence (prompt tuning), "kv" lengthens every block's
    # keys and values (prefix tuning: attention then needs an explicit mask)
    virtual_tokens_in: Literal["input", "kv"] | None = None


@dataclass(frozen=True)
class ObjectiveInfo:
    name: str
    summary: str
    data: Literal["sft", "paired", "unpaired"]  # sft: one sequence; paired: {prompt, chosen, rejected}; unpaired: KTO
    sequences_per_example: int  # sequences one example puts through the model per forward (chosen + rejected: 2)
    reference: bool  # needs a reference model's log-probs (DPO, KTO); ORPO and SimPO do not
    default_beta: float | None = None
    loss_variants: tuple[str, ...] = ()  # objective.loss values, first is the default
    gamma: bool = False  # SimPO's target reward margin
    metrics: tuple[str, ...] = ()  # per-step metrics beyond loss (status, progress, /metrics)
    default_gamma: float | None = None  # SimPO's objective.gamma when unset
    smoothing_losses: tuple[str, ...] = ()  # loss variants that take objective.labelSmoothing (conservative DPO)
    label_weights: bool = False  # KTO's objective.desirableWeight / undesirableWeight


METHODS: dict[str, MethodInfo] = {}
OBJECTIVES: dict[str, ObjectiveInfo] = {}

REFERENCE_MODES = ("implicit", "copy", "precomputed")
PREFERENCE_METRICS = ("rewardsChosen", "rewardsRejected", "rewardMargin", "rewardAccuracy")
# dataset.format values (besides auto, which detects among them) each kind of objective data reads
DATA_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("alpaca", "chat", "text"),
    "paired": ("preference",),
    "unpaired": ("kto",),
}
DEFAULT_LABEL_WEIGHT = 1.0  # KTO's desirableWeight and undesirableWeight when unset


def register_method(info: MethodInfo) -> MethodInfo:
    if info.name in METHODS:
        raise ValueError(f"method {info.name!r} is already registered")
    METHODS[info.name] = info
    return info


def register_objective(info: ObjectiveInfo) -> ObjectiveInfo:
    if info.name in OBJECTIVES:
        raise ValueError(f"objective {info.name!r} is already registered")
    OBJECTIVES[info.name] = info
    return info


class UnknownName(ValueError):
    pass


def method(name: str) -> MethodInfo:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownName(f"unknown method {name!r}: one of {', '.join(METHODS)}") from None


def objective(name: str) -> ObjectiveInfo:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise UnknownName(f"unknown objective {name!r}: one of {', '.join(OBJECTIVES)}") from None


def method_names(**having) -> tuple[str, ...]:
    """Names of the methods whose attributes equal ``having``: method_names(adapter=True)."""
    return tuple(n for n, m in METHODS.items() if all(getattr(m, k) == v for k, v in having.items()))


def objective_names(**having) -> tuple[str, ...]:
    return tuple(n for n, o in OBJECTIVES.items() if all(getattr(o, k) == v for k, v in having.items()))


def describe() -> str:
    rows = [f"method    {m.name:<14} {m.summary}" for m in METHODS.values()]
    rows += [f"objective {o.name:<14} {o.summary}" for o in OBJECTIVES.values()]
    return "\n".join(rows)


# --- the entries ---------------------------------------------------------------------------------

register_method(
    MethodInfo(
        "full", "every weight trains", adapter=False, master_weights=True, shard_by_default=True, trains_all=True
    )
)
register_method(
    MethodInfo(
        "lora", "low-rank adapters on frozen weights", adapter=True, peft_type="LORA", mergeable=True, settings="lora"
    )
)
register_method(
    MethodInfo(
        "qlora",
        "low-rank adapters on a 4- or 8-bit frozen base",
        adapter=True,
        peft_type="LORA",
        quantized=True,
        mergeable=True,
        settings="lora",
    )
)
register_method(
    MethodInfo(
        "freeze",
        "only the top k blocks train",
        adapter=False,
        master_weights=True,
        shard_by_default=True,
        settings="freeze",
    )
)
register_method(
    MethodInfo(
        "prompt-tuning",
        "learned virtual tokens before the input",
        adapter=True,
        peft_type="PROMPT_TUNING",
        settings="virtualTokens",
        virtual_tokens_in="input",
    )
)
register_method(
    MethodInfo(
        "prefix-tuning",
        "learned virtual key/values in every block",
        adapter=True,
        peft_type="PREFIX_TUNING",
        settings="virtualTokens",
        checkpointing=False,
        virtual_tokens_in="kv",
    )
)

register_objective(
    ObjectiveInfo(
        "sft",
        "supervised fine-tuning: next-token loss on the responses",
        data="sft",
        sequences_per_example=1,
        reference=False,
    )
)
register_objective(
    ObjectiveInfo(
        "dpo",
        "direct preference optimization on {prompt, chosen, rejected} pairs",
        data="paired",
        sequences_per_example=2,
        reference=True,
        default_beta=0.1,
        loss_variants=("sigmoid", "ipo", "hinge"),
        metrics=PREFERENCE_METRICS,
        smoothing_losses=("sigmoid",),
    )
)
register_objective(
    ObjectiveInfo(
        "orpo",
        "odds-ratio preference optimization: SFT plus a preference term, no reference",
        data="paired",
        sequences_per_example=2,
        reference=False,
        default_beta=0.1,
        metrics=PREFERENCE_METRICS,
    )
)
register_objective(
    ObjectiveInfo(
        "kto",
        "Kahneman-Tversky optimization on unpaired {prompt, completion, label}",
        data="unpaired",
        sequences_per_example=1,
        reference=True,
        default_beta=0.1,
        metrics=PREFERENCE_METRICS,
        label_weights=True,
    )
)
register_objective(
    ObjectiveInfo(
        "simpo",
        "simple preference optimization: length-normalized, no reference",
        data="paired",
        sequences_per_example=2,
        reference=False,
        default_beta=2.0,
        gamma=True,
        default_gamma=0.5,
        metrics=PREFERENCE_METRICS,
    )
)

METHOD_NAMES = tuple(METHODS)
OBJECTIVE_NAMES = tuple(OBJECTIVES)
