"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3 schema: no $ref,
no anyOf carrying types, no additionalProperties next to properties, a type on every node. This
module turns one into the other and adds the CEL rules declared on the models.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from kubetune.api import v1alpha1 as api
from kubetune.api.base import PATTERN_HELP, KModel

# Models whose declared Rules become x-kubernetes-validations, keyed by the JSON-schema title
# pydantic gives their definition.
_RULED: dict[str, type[KModel]] = {}


def _collect_ruled(model: type[BaseModel]) -> None:
    if issubclass(model, KModel) and model.rules:
        _RULED[model.__name__] = model
    for field in model.model_fields.values():
        for t in _types_in(field.annotation):
            if isinstance(t, type) and issubclass(t, BaseModel) and t.__name__ not in _RULED:
                _collect_ruled(t)


def _types_in(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    if not args:
        return [annotation]
    out = []
    for a in args:
        out.extend(_types_in(a))
    return out


_DROP = {"title", "additionalProperties_false"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Rewrite one pydantic schema node into a structural OpenAPI node."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        name = node.pop("$ref").split("/")[-1]
        target = dict(defs[name])
        # Sibling keys (the field's own description/default) win over the definition's.
        target.update(node)
        node = target
        if name in _RULED:
            node["x-kubernetes-validations"] = [
                *node.get("x-kubernetes-validations", []),
                *(r.schema() for r in _RULED[name].rules),
            ]
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {options}")
        merged = _structural(options[0], defs)
        merged.update({k: v for k, v in node.items() if k not in merged or k == "description"})
        node = merged
    if "const" in node:
        node["enum"] = [node.pop("const")]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title":
            continue
        if key == "additionalProperties" and value is False:
            continue  # unknown fields are pruned or rejected by the apiserver's field validation
        if key == "default" and value is None:
            continue
        if key == "enum" and "type" not in node:
            out["type"] = "integer" if all(isinstance(v, int) for v in value) else "string"
        if key == "properties":
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _structural(value, defs)
        elif key == "format" and value == "date-time":
            out[key] = value
        elif key == "anyOf":
            out[key] = value  # int-or-string keeps its anyOf
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            # 2020-12 numeric exclusive bounds -> OpenAPI v3 boolean form
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        else:
            out[key] = value
    if "x-kubernetes-validations" in out:  # one key order, whichever way a rule was declared
        out["x-kubernetes-validations"] = [
            {k: r[k] for k in ("rule", "message", "fieldPath") if k in r} for r in out["x-kubernetes-validations"]
        ]
    if "pattern" in out:
        out["x-kubernetes-validations"] = [_pattern_rule(out), *out.get("x-kubernetes-validations", [])]
        del out["pattern"]
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _pattern_rule(node: dict[str, Any]) -> dict[str, str]:
    """A schema `pattern` as a CEL rule. The apiserver answers a failed pattern with the whole regex;
    a rule answers with its message: the words PATTERN_HELP gives `kubetune validate` as well."""
    pattern = node["pattern"]
    if pattern not in PATTERN_HELP:
        raise ValueError(f"pattern {pattern!r} has no plain-words help: add it to PATTERN_HELP")
    if "maxLength" not in node:
        raise ValueError(f"pattern {pattern!r} needs a maxLength, or the apiserver's CEL cost estimate is unbounded")
    if "'" in pattern:
        raise ValueError(f"pattern {pattern!r} cannot be quoted as a CEL raw string")
    return {"rule": f"self.matches(r'{pattern}')", "message": f"expected {PATTERN_HELP[pattern]}"}


def _strip_defaults(node: Any) -> Any:
    """Status is written whole by the operator; defaults there would only confuse readers."""
    if isinstance(node, dict):
        return {k: _strip_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_strip_defaults(v) for v in node]
    return node


def _schema_for(model: type[BaseModel]) -> dict[str, Any]:
    _collect_ruled(model)
    raw = model.model_json_schema(by_alias=True, mode="validation", ref_template="#/$defs/{model}")
    defs = raw.pop("$defs", {})
    top = _structural(raw, defs)
    if model.__name__ in _RULED:
        top["x-kubernetes-validations"] = [r.schema() for r in _RULED[model.__name__].rules]
    return top


def openapi_schema() -> dict[str, Any]:
    spec = _schema_for(api.FineTuneJobSpec)
    # status: {} until the operator writes one, so GitOps health expressions that read status
    # fields (Flux's CEL) see "not yet" instead of failing on a missing attribute
    status = {**_strip_defaults(_schema_for(api.FineTuneJobStatus)), "default": {}}
    return {
        "type": "object",
        "description": (api.FineTuneJob.__doc__ or "").strip().replace("\n    ", " "),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "kubetune.io/v1alpha1"},
            "kind": {"type": "string", "description": "FineTuneJob"},
            # the apiserver forbids anything but type here (not even a description)
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [r.schema() for r in api.FineTuneJob.rules],
    }


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method.type"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.percent"},
    {
        "name": "State",
        "type": "string",
        "jsonPath": ".status.progress.state",
        "priority": 1,
        "description": "What the trainer is doing (kubectl get -o wide)",
    },
    {
        "name": "GPU Mem",
        "type": "string",
        "jsonPath": ".status.estimate.perGpu",
        "description": "Per-GPU memory estimate",
    },
    {"name": "Node", "type": "string", "jsonPath": ".status.placement.node"},
    {
        "name": "Test",
        "type": "string",
        "jsonPath": ".status.result.evaluation.headline",
        "priority": 1,
        "description": "The end-of-run evaluation's main change, base vs tuned (kubectl get -o wide)",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["kubetune"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


HEADER = "# Generated by `kubetune crd` from operator/src/kubetune/api/v1alpha1.py. Do not edit.\n"


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=120, allow_unicode=True)
