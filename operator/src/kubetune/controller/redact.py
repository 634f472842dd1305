"""One redaction layer for everything the operator says: status, Events and logs.

Users who may read a FineTuneJob's status or its namespace's Events (the built-in `view` role) may
not read its Secrets. Error text from HTTP libraries, botocore and pydantic can carry what they
were given: a token with a trailing newline in an ``Invalid header value b'Bearer hf_…\\n'``, a
password in an endpoint URL, a signed request. Two nets, both applied to every outgoing string:
the exact values of the Secrets this job's reconcile read (in the forms libraries print them),
and the shapes of credentials whatever their source.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

MASK = "***"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # userinfo in any URL: scheme://user:pass@host
    (re.compile(r"(?<=://)[^/\s@'\"]+@"), MASK + "@"),
    # Authorization headers and bearer tokens, however quoted
    (re.compile(r"(?i)\b(bearer|basic)\s+[^\s'\",;]+"), r"\1 " + MASK),
    (re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)[^'\",;]+"), r"\1" + MASK),
    # Hugging Face tokens (hf_ + 34 letters/digits) and AWS access key ids
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), "hf_" + MASK),
    (re.compile(r"\b(AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}\b"), MASK),
    # SigV4 pieces in signed URLs and headers
    (re.compile(r"(?i)(x-amz-(signature|credential|security-token)=)[^&\s'\"]+"), r"\1" + MASK),
    (re.compile(r"(?i)(Credential=)[^,\s'\"]+"), r"\1" + MASK),
    (re.compile(r"(?i)(Signature=)[0-9a-f]+"), r"\1" + MASK),
)


def _forms(value: str) -> set[str]:
    """How a library may print a secret: as is, stripped, escaped (repr of str or bytes), URL-quoted."""
    out = {
        value,
        value.strip(),
        value.encode("unicode_escape").decode("ascii"),
        value.strip().encode("unicode_escape").decode("ascii"),
        quote(value, safe=""),
        quote(value.strip(), safe=""),
    }
    return {f for f in out if len(f) >= 4}  # a 1-3 character "secret" would mask half of every message


class Redactor:
    """Masks known secret values (longest first, so one is never left half-masked) and credential shapes."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        forms: set[str] = set()
        for s in secrets:
            if isinstance(s, str) and s:
                forms |= _forms(s)
        self._values = sorted(forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for v in self._values:
            if v in text:
                text = text.replace(v, MASK)
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        return text

    def deep(self, obj: Any) -> Any:
        """Every string in a JSON-like value (a status patch, an Event), redacted."""
        if isinstance(obj, str):
            return self(obj)
        if isinstance(obj, dict):
            return {k: self.deep(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.deep(v) for v in obj]
        return obj


redact = Redactor()  # shapes only, for text with no job at hand (startup, the log filter)


def secret_values(*datas: dict[str, str] | None) -> list[str]:
    """Every value of the Secrets a reconcile read."""
    return [v for d in datas if d for v in d.values() if isinstance(v, str)]
