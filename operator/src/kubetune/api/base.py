"""Building blocks shared by every API model: camelCase aliases, cross-field rules that are
written once and emitted both as CEL (for the apiserver) and as Python checks (for pydantic),
and error formatting that names the field a user has to fix."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class Rule:
    """A cross-field rule. ``cel`` is what the apiserver evaluates at admission; ``check`` is the
    same rule for pydantic (the operator, the trainer, `kubetune validate`). Both report
    ``message``, so a user sees the same words whichever side caught the mistake."""

    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None  # e.g. ".lora", so the apiserver points at the field

    def schema(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


class KModel(BaseModel):
    """Base for spec models: camelCase on the wire, unknown fields rejected (a typo in a CR
    must not silently fall back to a default)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=False,
    )
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self):
        broken = [r.message for r in type(self).rules if not r.check(self)]
        if broken:
            raise ValueError("; ".join(broken))
        return self

    def dump(self) -> dict[str, Any]:
        """The object as it appears in YAML: camelCase, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class StatusModel(KModel):
    """Status is written by the operator; tolerate fields a newer operator added."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


# Kubernetes resource.Quantity, as controller-gen emits it: an int or a string matching the pattern.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _quantity_schema() -> dict[str, Any]:
    return {
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "pattern": QUANTITY_PATTERN,
        "x-kubernetes-int-or-string": True,
    }


def _check_quantity(v: int | str) -> str:
    s = str(v)
    if not re.match(QUANTITY_PATTERN, s):
        raise ValueError(f"{s!r} is not a Kubernetes quantity (examples: 8, 500m, 64Gi, 80G)")
    return s


Quantity = Annotated[str, BeforeValidator(_check_quantity), WithJsonSchema(_quantity_schema())]

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def quantity_to_float(q: str | int) -> float:
    """Parse a Kubernetes quantity ("64Gi", "500m", "1e3") into base units."""
    s = str(q).strip()
    for suffix, mult in _BINARY.items():
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * mult
    if s and s[-1] in _DECIMAL and not s[-1].isdigit():
        return float(s[:-1]) * _DECIMAL[s[-1]]
    return float(s)


# Regexes are unreadable in an error message; patterns registered here are explained instead.
PATTERN_HELP: dict[str, str] = {}


def format_errors(err: ValidationError, root: str = "") -> list[str]:
    """One line per problem, each naming the field as a user writes it in YAML
    (``spec.method.lora.rank: ...``), without pydantic's URLs."""
    lines = []
    for e in err.errors(include_url=False):
        parts = [root] if root else []
        for item in e["loc"]:
            if isinstance(item, int):
                parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
            elif item in ("function-after[_check_rules()]",) or "[" in str(item) and "(" in str(item):
                continue  # pydantic's internal validator names are noise to a user
            else:
                parts.append(str(item))
        where = ".".join(parts) or "(root)"
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; fields are camelCase)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "string_pattern_mismatch":
            pattern = (e.get("ctx") or {}).get("pattern", "")
            msg = f"{e.get('input')!r} is not valid: expected {PATTERN_HELP.get(pattern, 'a string matching ' + pattern)}"
        elif e["type"] in ("literal_error", "enum"):
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"{where}: {msg}")
    return lines
