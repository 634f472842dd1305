"""metav1.Condition helpers, in the manner of apimachinery's meta.SetStatusCondition (used by kueue):
lastTransitionTime moves only when status flips, so `kubectl describe` tells how long a state has held."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from kubetune.api.constants import CONDITION_TYPES
from kubetune.api.v1alpha1 import Condition

# Status and Events are read by people, and the apiserver caps a condition's message at 32768: a message
# built from user input (huge nodeSelector values, a long URI) is cut well before either limit.
ConditionStatus = Literal["True", "False", "Unknown"]  # Condition.status

MAX_MESSAGE = 4096


def clip(message: str, limit: int = MAX_MESSAGE) -> str:
    return (
        message if len(message) <= limit else message[: limit - 40] + f"… ({len(message) - limit + 40} more characters)"
    )


def find(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: list[Condition], type_: str) -> bool:
    c = find(conditions, type_)
    return c is not None and c.status == "True"


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: bool | ConditionStatus,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> tuple[list[Condition], bool]:
    """Return the new list and whether status or reason changed (a transition worth an Event)."""
    message = clip(message)
    s: ConditionStatus = status if isinstance(status, str) else ("True" if status else "False")
    old = find(conditions, type_)
    if (
        old is not None
        and old.status == s
        and old.reason == reason
        and old.message == message
        and old.observed_generation == generation
    ):
        return conditions, False
    changed = old is None or old.status != s or old.reason != reason
    new = Condition(
        type=type_,
        status=s,
        reason=reason,
        message=message,
        last_transition_time=now if old is None or old.status != s else old.last_transition_time,
        observed_generation=generation,
    )
    out = [c for c in conditions if c.type != type_] + [new]
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    out.sort(key=lambda c: order.get(c.type, 99))
    return out, changed
