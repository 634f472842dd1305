"""The registry of methods and objectives: names, the facts the API, plan and estimator read, and the
clear message for a name it does not know."""
from __future__ import annotations

from typing import get_args

import pytest

from kubetune.api import registry
from kubetune.api.v1alpha1 import Method, MethodType


def test_an_unknown_method_is_refused_naming_the_known_ones():
    with pytest.raises(registry.UnknownName) as e:
        registry.method("lorra")
    assert str(e.value) == "unknown method 'lorra': one of full, lora, qlora, freeze, prompt-tuning, prefix-tuning"


def test_an_unknown_objective_is_refused_naming_the_known_ones():
    with pytest.raises(registry.UnknownName) as e:
        registry.objective("rlhf")
    assert str(e.value) == "unknown objective 'rlhf': one of sft, dpo, orpo, kto, simpo"


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="method 'lora' is already registered"):
        registry.register_method(registry.METHODS["lora"])
    with pytest.raises(ValueError, match="objective 'dpo' is already registered"):
        registry.register_objective(registry.OBJECTIVES["dpo"])


def test_the_api_enum_is_the_registry_in_its_order():
    # the CRD's enum order is the registry's: a reordering would show in the generated CRD
    assert get_args(MethodType) == registry.METHOD_NAMES == (
        "full", "lora", "qlora", "freeze", "prompt-tuning", "prefix-tuning")


def test_method_facts_are_consistent():
    fields = {f.alias or name for name, f in Method.model_fields.items()} | set(Method.model_fields)
    for m in registry.METHODS.values():
        assert m.settings is None or m.settings in fields, m.name
        assert not (m.trains_all and m.adapter), m.name
        assert not m.quantized or m.adapter, m.name  # the quantized base is frozen
        assert (m.virtual_tokens_in is not None) == (m.settings == "virtualTokens"), m.name
        assert m.master_weights == (not m.adapter), m.name  # what trains is the base, which keeps the fp32 master
    assert registry.method_names(adapter=True) == ("lora", "qlora", "prompt-tuning", "prefix-tuning")
    assert registry.method_names(checkpointing=False) == ("prefix-tuning",)


def test_objective_facts_are_consistent():
    for o in registry.OBJECTIVES.values():
        assert o.sequences_per_example == (2 if o.data == "paired" else 1), o.name
        assert o.data in registry.DATA_FORMATS, o.name
        assert set(o.smoothing_losses) <= set(o.loss_variants), o.name
        assert o.gamma == (o.default_gamma is not None), o.name
        assert (o.default_beta is None) == (o.data == "sft"), o.name
    assert registry.objective_names(reference=True) == ("dpo", "kto")


def test_describe_lists_every_name():
    text = registry.describe()
    for name in (*registry.METHOD_NAMES, *registry.OBJECTIVE_NAMES):
        assert f" {name} " in text
