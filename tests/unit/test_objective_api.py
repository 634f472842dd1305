"""spec.objective: its settings, their defaults (from the registry), and the rules that say what cannot
combine, each with a message that names the fields. tests/integration/test_crds.py checks the apiserver
answers the same words."""
from __future__ import annotations

import pytest

from kubetune.api import registry
from kubetune.api.crd import crd
from kubetune.api.v1alpha1 import FineTuneJobSpec, TrainingObjective
from kubetune.api.validation import parse_job

from builders import parse_errors, patched

BASE = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "dpo"},
    "spec": {
        "model": {"uri": "hf://meta-llama/Llama-3.1-8B"},
        "dataset": {"uri": "s3://data/pairs.jsonl", "format": "preference"},
        "method": {"type": "lora"},
        "objective": {"type": "dpo"},
        "training": {"maxSteps": 100, "microBatchSize": 2},
        "checkpoints": {"uri": "s3://ckpt/runs/"},
    },
}


def job(**patch) -> dict:
    """BASE with dotted-path overrides (``__`` for '.'); a value of ... deletes the key."""
    return patched(BASE, **patch)


def errors_of(obj: dict) -> list[str]:
    return parse_errors(obj).splitlines()


IMPLICIT = ("objective.reference implicit needs an adapter method (method.type lora, qlora, prompt-tuning or "
            "prefix-tuning): it disables the adapters to get the base model; with method.type full or freeze use copy "
            "or precomputed")
COPY_QLORA = ("objective.reference copy cannot be used with method.type qlora: the copy would be a second quantized "
              "base model, while the base with the adapters disabled is the same reference at no memory cost; use "
              "implicit (the default) or precomputed")
SFT_FORMAT = ("dataset.format must be auto, alpaca, chat or text with objective.type sft (preference and kto data need "
              "a preference objective)")
PAIRED_FORMAT = ("dataset.format must be auto or preference with objective.type dpo, orpo or simpo (they train on "
                 "{prompt, chosen, rejected} pairs)")
KTO_FORMAT = ("dataset.format must be auto or kto with objective.type kto (it trains on unpaired {prompt, completion, "
              "label} examples)")
PACKING = ("dataset.packing is only valid with objective.type sft (preference objectives score each whole sequence on "
           "its own)")
NO_REFERENCE = ("objective.reference is only valid with objective.type dpo or kto: sft, orpo and simpo use no "
                "reference model")

BAD = [
    ("beta-with-sft", dict(spec__objective={"type": "sft", "beta": 0.1}, spec__dataset__format="alpaca"),
     "spec.objective: objective.beta is only valid with objective.type dpo, orpo, kto or simpo"),
    ("loss-with-orpo", dict(spec__objective={"type": "orpo", "loss": "ipo"}),
     "spec.objective: objective.loss is only valid with objective.type dpo"),
    ("smoothing-with-ipo", dict(spec__objective={"type": "dpo", "loss": "ipo", "labelSmoothing": 0.1}),
     "spec.objective: objective.labelSmoothing is only valid with objective.type dpo and objective.loss sigmoid "
     "(the default)"),
    ("smoothing-with-kto", dict(spec__objective={"type": "kto", "labelSmoothing": 0.1}, spec__dataset__format="kto"),
     "spec.objective: objective.labelSmoothing is only valid with objective.type dpo and objective.loss sigmoid"),
    ("gamma-with-dpo", dict(spec__objective={"type": "dpo", "gamma": 1.0}),
     "spec.objective: objective.gamma is only valid with objective.type simpo"),
    ("desirable-weight-with-dpo", dict(spec__objective={"type": "dpo", "desirableWeight": 2.0}),
     "spec.objective: objective.desirableWeight is only valid with objective.type kto"),
    ("undesirable-weight-with-simpo", dict(spec__objective={"type": "simpo", "undesirableWeight": 2.0}),
     "spec.objective: objective.undesirableWeight is only valid with objective.type kto"),
    ("reference-with-orpo",
     dict(spec__objective={"type": "orpo", "reference": "copy"}), f"spec.objective: {NO_REFERENCE}"),
    ("reference-with-simpo", dict(spec__objective={"type": "simpo", "reference": "precomputed"}),
     f"spec.objective: {NO_REFERENCE}"),
    ("reference-with-sft", dict(spec__objective={"type": "sft", "reference": "implicit"}, spec__dataset__format="chat"),
     f"spec.objective: {NO_REFERENCE}"),
    ("implicit-with-full",
     dict(spec__method={"type": "full"}, spec__objective={"type": "dpo", "reference": "implicit"}),
     f"spec: {IMPLICIT}"),
    ("implicit-with-freeze", dict(spec__method={"type": "freeze", "freeze": {"trainableLayers": 2}},
                                  spec__objective={"type": "kto", "reference": "implicit"},
                                  spec__dataset__format="kto"),
     f"spec: {IMPLICIT}"),
    ("copy-with-qlora", dict(spec__method={"type": "qlora"}, spec__resources={"gpusPerNode": 1},
                             spec__objective={"type": "dpo", "reference": "copy"}), f"spec: {COPY_QLORA}"),
    ("preference-data-without-objective", dict(spec__objective=...), f"spec: {SFT_FORMAT}"),
    ("kto-data-with-sft", dict(spec__objective={"type": "sft"}, spec__dataset__format="kto"), f"spec: {SFT_FORMAT}"),
    ("alpaca-with-dpo", dict(spec__dataset__format="alpaca"), f"spec: {PAIRED_FORMAT}"),
    ("kto-data-with-simpo",
     dict(spec__objective={"type": "simpo"}, spec__dataset__format="kto"), f"spec: {PAIRED_FORMAT}"),
    ("preference-data-with-kto", dict(spec__objective={"type": "kto"}), f"spec: {KTO_FORMAT}"),
    ("packing-with-dpo", dict(spec__dataset__packing=True), f"spec: {PACKING}"),
    ("packing-with-kto",
     dict(spec__objective={"type": "kto"}, spec__dataset__format="auto", spec__dataset__packing=True),
     f"spec: {PACKING}"),
    ("unknown-objective", dict(spec__objective={"type": "rlhf"}),
     "spec.objective.type: Input should be 'sft', 'dpo', 'orpo', 'kto' or 'simpo' (got 'rlhf')"),
    ("unknown-loss", dict(spec__objective={"type": "dpo", "loss": "logistic"}),
     "spec.objective.loss: Input should be 'sigmoid', 'ipo' or 'hinge' (got 'logistic')"),
    ("unknown-reference", dict(spec__objective={"type": "dpo", "reference": "base"}),
     "spec.objective.reference: Input should be 'implicit', 'copy' or 'precomputed' (got 'base')"),
    ("beta-zero",
     dict(spec__objective={"type": "dpo", "beta": 0}), "spec.objective.beta: Input should be greater than 0"),
    ("beta-past-100", dict(spec__objective={"type": "dpo", "beta": 101}),
     "spec.objective.beta: Input should be less than or equal to 100"),
    ("smoothing-half", dict(spec__objective={"type": "dpo", "labelSmoothing": 0.5}),
     "spec.objective.labelSmoothing: Input should be less than 0.5"),
    ("gamma-negative", dict(spec__objective={"type": "simpo", "gamma": -1}),
     "spec.objective.gamma: Input should be greater than or equal to 0"),
    ("weight-zero", dict(spec__objective={"type": "kto", "desirableWeight": 0}, spec__dataset__format="kto"),
     "spec.objective.desirableWeight: Input should be greater than 0"),
    ("objective-typo", dict(spec__objective={"type": "dpo", "betta": 0.1}),
     "spec.objective.betta: unknown field (check the spelling; fields are camelCase)"),
]


@pytest.mark.parametrize("patch,line", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_objective_is_refused_naming_the_fields(patch, line):
    lines = errors_of(job(**patch))
    assert any(x.startswith(line) for x in lines), lines


GOOD = [
    ("dpo-defaults", {}),
    ("dpo-every-setting", dict(spec__objective={"type": "dpo", "beta": 0.5, "loss": "sigmoid", "labelSmoothing": 0.1,
                                                "reference": "precomputed"})),
    ("dpo-ipo", dict(spec__objective={"type": "dpo", "loss": "ipo", "reference": "copy"})),
    ("dpo-full-copy", dict(spec__method={"type": "full"}, spec__objective={"type": "dpo", "reference": "copy"})),
    ("dpo-auto-format", dict(spec__dataset__format="auto")),
    ("dpo-format-default", dict(spec__dataset__format=...)),
    ("orpo", dict(spec__objective={"type": "orpo", "beta": 0.2})),
    ("simpo", dict(spec__objective={"type": "simpo", "beta": 2.5, "gamma": 1.0})),
    ("kto", dict(spec__objective={"type": "kto", "desirableWeight": 1.0, "undesirableWeight": 1.33,
                                  "reference": "implicit"}, spec__dataset__format="kto")),
    ("kto-prefix-tuning", dict(spec__method={"type": "prefix-tuning"}, spec__objective={"type": "kto"},
                               spec__dataset__format="auto")),
    ("sft-explicit-packing",
     dict(spec__objective={"type": "sft"}, spec__dataset__format="chat", spec__dataset__packing=True)),
    ("sft-empty-objective", dict(spec__objective={}, spec__dataset__format="text")),
    ("no-objective", dict(spec__objective=..., spec__dataset__format="alpaca")),
]


@pytest.mark.parametrize("patch", [g[1] for g in GOOD], ids=[g[0] for g in GOOD])
def test_good_objectives_are_accepted(patch):
    parse_job(job(**patch))


def test_every_objective_rule_is_in_the_crd_with_the_same_words():
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec_msgs = {r["message"] for r in schema["x-kubernetes-validations"]}
    obj_msgs = {r["message"] for r in schema["properties"]["objective"]["x-kubernetes-validations"]}
    for _, _, line in BAD:
        where, _, msg = line.partition(": ")
        if where == "spec":
            assert msg in spec_msgs, msg
        elif where == "spec.objective":
            assert any(m.startswith(msg) for m in obj_msgs), msg
    assert schema["properties"]["objective"]["properties"]["type"]["enum"] == list(registry.OBJECTIVE_NAMES)
    assert "default" not in schema["properties"]["objective"]  # absent is sft, not an object the apiserver adds
    # settings whose default depends on the type must have none in the schema, or the apiserver would fill in a
    # dpo setting on every objective and then refuse it
    for f in ("beta", "loss", "labelSmoothing", "reference", "gamma", "desirableWeight", "undesirableWeight"):
        assert "default" not in schema["properties"]["objective"]["properties"][f], f
    assert schema["properties"]["dataset"]["properties"]["format"]["enum"] == [
        "auto", "alpaca", "chat", "text", "preference", "kto"]


@pytest.mark.parametrize("name", registry.OBJECTIVE_NAMES)
def test_defaults_come_from_the_registry(name):
    o = TrainingObjective(type=name)
    info = registry.objective(name)
    assert o.effective_beta == info.default_beta
    assert o.effective_loss == (info.loss_variants[0] if info.loss_variants else None)
    assert o.effective_gamma == info.default_gamma
    assert o.effective_label_smoothing == 0.0
    assert o.effective_desirable_weight == o.effective_undesirable_weight == 1.0


def test_set_values_win_over_defaults():
    o = TrainingObjective(type="dpo", beta=0.3, loss="hinge")
    assert (o.effective_beta, o.effective_loss) == (0.3, "hinge")
    s = TrainingObjective(type="simpo", gamma=0.0)
    assert s.effective_gamma == 0.0  # 0 is a margin, not "unset"
    k = TrainingObjective(type="kto", undesirable_weight=1.5)
    assert (k.effective_desirable_weight, k.effective_undesirable_weight) == (1.0, 1.5)


@pytest.mark.parametrize("objective,method,want", [
    ("dpo", "lora", "implicit"), ("dpo", "qlora", "implicit"), ("dpo", "prompt-tuning", "implicit"),
    ("kto", "prefix-tuning", "implicit"), ("dpo", "full", "copy"), ("kto", "freeze", "copy"),
    ("orpo", "lora", "none"), ("simpo", "full", "none"), ("sft", "lora", "none"),
])
def test_the_default_reference_follows_the_method(objective, method, want):
    assert TrainingObjective(type=objective).effective_reference(method) == want


def test_a_set_reference_is_kept():
    assert TrainingObjective(type="dpo", reference="precomputed").effective_reference("lora") == "precomputed"
    assert TrainingObjective(type="dpo", reference="copy").effective_reference("lora") == "copy"


def test_no_objective_is_sft_and_round_trips():
    spec = parse_job(job(spec__objective=..., spec__dataset__format="alpaca")).spec
    assert spec.objective is None and spec.effective_objective.type == "sft"
    dpo = parse_job(job(spec__objective={"type": "dpo", "beta": 0.2})).spec
    # the trainer reads the spec the operator renders: what is dumped parses to the same spec, unset stays unset
    again = FineTuneJobSpec.model_validate(dpo.dump())
    assert again == dpo and dpo.dump()["objective"] == {"type": "dpo", "beta": 0.2}


@pytest.mark.parametrize("objective,method,fmt,want", [
    (None, "lora", "alpaca", ("sft", 1, "none")),
    ({"type": "dpo"}, "lora", "preference", ("dpo", 2, "implicit")),
    ({"type": "dpo"}, "full", "preference", ("dpo", 2, "copy")),
    ({"type": "dpo", "reference": "precomputed"}, "full", "preference", ("dpo", 2, "precomputed")),
    ({"type": "orpo"}, "qlora", "preference", ("orpo", 2, "none")),
    ({"type": "simpo"}, "lora", "auto", ("simpo", 2, "none")),
    ({"type": "kto"}, "prompt-tuning", "kto", ("kto", 1, "implicit")),
    ({"type": "kto", "reference": "copy"}, "lora", "kto", ("kto", 1, "copy")),
])
def test_the_plan_carries_the_objective(objective, method, fmt, want):
    from kubetune.plan import plan_from_spec

    spec = parse_job(job(spec__objective=objective if objective is not None else ..., spec__method={"type": method},
                         spec__dataset__format=fmt, spec__resources={"gpusPerNode": 1})).spec
    p = plan_from_spec(spec)
    assert (p.objective, p.sequences_per_example, p.reference) == want
    assert p.micro_batch_size == 2  # examples per micro batch: the sequences are micro batch x sequences_per_example
