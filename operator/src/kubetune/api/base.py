"""Building blocks shared by every API model: camelCase aliases, cross-field rules that are
written once and emitted both as CEL (for the apiserver) and as Python checks (for pydantic),
and error formatting that names the field a user has to fix."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, ClassVar, Iterator

from annotated_types import GroupedMetadata
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import core_schema


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

    # A Rule can also annotate one field (``Annotated[dict[str, str], Rule(...)]``): ``check`` then
    # gets the field's value, and the CEL rule lands on the field's schema node.
    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        def validate(v: Any) -> Any:
            if not self.check(v):
                raise ValueError(self.message)
            return v

        return core_schema.no_info_after_validator_function(validate, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict[str, Any]:
        out = handler(schema)
        out.setdefault("x-kubernetes-validations", []).append(self.schema())
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


def cel_in(var: str, names: tuple[str, ...] | list[str]) -> str:
    """CEL for ``var`` being one of ``names`` (registry names: no quotes in them)."""
    if len(names) == 1:
        return f"{var} == '{names[0]}'"
    return f"{var} in [" + ", ".join(f"'{n}'" for n in names) + "]"


def cel_not_in(var: str, names: tuple[str, ...] | list[str]) -> str:
    if len(names) == 1:
        return f"{var} != '{names[0]}'"
    return f"!({cel_in(var, names)})"


def one_of(names: tuple[str, ...] | list[str], conj: str = "or") -> str:
    """'a', 'a or b', 'a, b or c': names as a message lists them."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" {conj} " + names[-1]


# ---------------------------------------------------------------------------------------------
# Regexes read the same by the apiserver (Go RE2, in CEL matches()) and pydantic (Rust regex).
# Neither \s nor \p{..} may appear: Go's \s is ASCII-only while Rust's is Unicode, and the two
# ship different Unicode tables. Code points are spelled out instead (\x{..}, which both read).

# Never in a URI or a name: ASCII and C1 controls, space, and the Unicode spaces and invisible
# format characters (NBSP, U+2028, zero-width and bidi controls, BOM, specials).
UNSAFE_CHARS = (
    r"\x00-\x20\x7F-\x9F\x{A0}\x{AD}\x{1680}\x{180E}\x{2000}-\x{200F}\x{2028}-\x{202F}"
    r"\x{205F}-\x{206F}\x{3000}\x{FEFF}\x{FFF9}-\x{FFFF}"
)


@functools.lru_cache(maxsize=None)
def py_regex(pattern: str) -> re.Pattern[str]:
    r"""The same regex for Python's re, which spells \x{HHHH} as \uHHHH."""
    return re.compile(re.sub(r"\\x\{([0-9A-Fa-f]+)\}", lambda m: "\\u" + m.group(1).zfill(4), pattern))


def full_match(pattern: str, value: str) -> bool:
    # fullmatch: Python's $ also matches before a trailing newline, Go's and Rust's do not
    return py_regex(pattern).fullmatch(value) is not None


# Kubernetes name and label rules (k8s.io/apimachinery/pkg/util/validation), for every string
# that becomes part of a child object: a Job, its pods, their labels and annotations.
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# [prefix/]name: the prefix a DNS subdomain (length checked apart), the name at most 63 characters
QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
QUALIFIED_NAME_MAX = 253 + 1 + 63
# a Secret or ConfigMap key (validation.IsConfigMapKey): not '.', '..' or '..'-prefixed
CONFIG_KEY = r"^\.?[-_A-Za-z0-9][-._A-Za-z0-9]*$"


def is_qualified_name(k: str) -> bool:
    return len(k) <= QUALIFIED_NAME_MAX and k.find("/") <= 253 and full_match(QUALIFIED_NAME, k)


def qualified_name_cel(var: str) -> str:
    """CEL for is_qualified_name; the size test comes first so matches() only sees short keys."""
    return f"{var}.size() <= {QUALIFIED_NAME_MAX} && {var}.indexOf('/') <= 253 && {var}.matches(r'{QUALIFIED_NAME}')"


QUALIFIED_NAME_HELP = (
    "[prefix/]name, the name at most 63 letters, digits, '-', '_' or '.' that starts and ends "
    "with a letter or digit, the optional prefix a DNS subdomain (e.g. example.com/team)"
)
LABEL_VALUE_HELP = "at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"


# ---------------------------------------------------------------------------------------------
# Kubernetes resource.Quantity: an int or a string in the quantity syntax.
# The exponent is an integer of at most 3 digits: the apiserver parses a longer one into an int32
# and wraps it (1e4294967296 is 1 there, and astronomically large in Python), and a fraction
# ("1e2.5"), which the k8s schema pattern allows, is no quantity at all to ParseQuantity.
QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?[0-9]{1,3}))?$"
QUANTITY_MAX_LENGTH = 64  # "1.5Ti" needs 5; the bound keeps the CEL cost estimate small


def quantity_rule(field: str, maximum: str, example: str) -> Rule:
    """A quantity greater than 0 and at most ``maximum``: the apiserver's quantity() library and
    Python's exact Decimal compare the same numbers (1e400 is refused by both, not rounded to inf)."""
    q = "quantity(string(self))"
    return Rule(
        # the pattern as well as isQuantity, so that both sides accept exactly the same syntax
        cel=f"string(self).matches(r'{QUANTITY_PATTERN}') && isQuantity(string(self)) "
        f"&& {q}.isGreaterThan(quantity('0')) && !{q}.isGreaterThan(quantity('{maximum}'))",
        message=f"{field} must be a Kubernetes quantity greater than 0 and at most {maximum} (e.g. {example})",
        check=lambda v: _quantity_in(v, quantity_to_decimal(maximum)),
    )


def _quantity_in(v: Any, maximum: Decimal) -> bool:
    s = str(v)
    if isinstance(v, bool) or len(s) > QUANTITY_MAX_LENGTH or not full_match(QUANTITY_PATTERN, s):
        return False
    return Decimal(0) < quantity_to_decimal(s) <= maximum


@dataclass(frozen=True)
class _QuantityBounds(GroupedMetadata):
    """The validator and schema of one bounded quantity field, as one piece of ``Annotated`` metadata
    (pydantic unpacks grouped metadata): ``Annotated[str, bounded_quantity(...)]`` is a type mypy can
    read, where a call returning a whole ``Annotated`` type is not."""

    validator: BeforeValidator
    json_schema: WithJsonSchema

    def __iter__(self) -> Iterator[object]:
        yield self.validator
        yield self.json_schema


def bounded_quantity(field: str, maximum: str, example: str) -> _QuantityBounds:
    """A quantity for one spec field (``Annotated[str, bounded_quantity(...)]``); its message names the
    field and the bounds."""
    rule = quantity_rule(field, maximum, example)

    def check(v: Any) -> str:
        if not rule.check(v):
            raise ValueError(rule.message)
        return str(v)

    schema = {
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "maxLength": QUANTITY_MAX_LENGTH,
        "x-kubernetes-int-or-string": True,
        "x-kubernetes-validations": [rule.schema()],
    }
    return _QuantityBounds(BeforeValidator(check), WithJsonSchema(schema))


_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def quantity_to_decimal(q: str | int) -> Decimal:
    """Parse a Kubernetes quantity exactly (no float rounding, no overflow to inf)."""
    s = str(q).strip()
    try:
        for suffix, mult in _BINARY.items():
            if s.endswith(suffix):
                return Decimal(s[: -len(suffix)]) * mult
        if s and s[-1] in _DECIMAL and not s[-1].isdigit():
            return Decimal(s[:-1]) * Decimal(str(_DECIMAL[s[-1]]))
        return Decimal(s)
    except InvalidOperation:
        raise ValueError(f"{s!r} is not a Kubernetes quantity") from None


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
# The CRD generator moves every pattern into a CEL matches() rule whose message is "expected
# <these words>", so the apiserver and pydantic say the same thing (and it refuses an unlisted one).
PATTERN_HELP: dict[str, str] = {
    DNS1123_SUBDOMAIN: "a Kubernetes object name: lowercase letters, digits, '-' and '.', starting and ending "
    "with a letter or digit",
    LABEL_VALUE: "a Kubernetes label value: " + LABEL_VALUE_HELP,
    CONFIG_KEY: "a Secret or ConfigMap key: letters, digits, '-', '_' and '.', not starting with '..'",
}

# userinfo in a URL (http://user:password@host) is a credential: never echo it back
_USERINFO = re.compile(r"(?<=://)[^/?#@]*@")


def redact(value: Any) -> str:
    return _USERINFO.sub("***@", repr(value))


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
            expected = PATTERN_HELP.get(pattern, "a string matching " + pattern)
            msg = f"{redact(e.get('input'))} is not valid: expected {expected}"
        elif e["type"] in ("literal_error", "enum"):
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"{where}: {msg}")
    return lines
