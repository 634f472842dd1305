"""Parse FineTuneJob documents with the API models and report problems by field and file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import ValidationError

from kubetune.api.base import format_errors
from kubetune.api.v1alpha1 import API_VERSION, KIND, FineTuneJob, FineTuneJobSpec
from kubetune.errors import UsageError


@dataclass
class Problem:
    where: str  # file[:doc N] name
    lines: list[str]

    def __str__(self) -> str:
        return "\n".join(f"{self.where}: {line}" for line in self.lines)


def parse_job(obj: Any) -> FineTuneJob:
    """Validate one object; raise ValueError whose lines name the fields (spec.method.lora.rank: ...)."""
    if not isinstance(obj, dict):
        raise ValueError(f"(root): expected a mapping (a Kubernetes object), got {type(obj).__name__}")
    try:
        return FineTuneJob.model_validate(obj)
    except ValidationError as e:
        raise ValueError("\n".join(format_errors(e))) from None


def parse_spec(spec: Any) -> FineTuneJobSpec:
    """Validate a spec as the operator receives it from the apiserver."""
    try:
        return FineTuneJobSpec.model_validate(spec)
    except ValidationError as e:
        raise ValueError("\n".join(format_errors(e, root="spec"))) from None


def load_documents(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (label, object) for every YAML document in a file; '-' reads stdin."""
    import sys

    p = str(path)
    try:
        text = sys.stdin.read() if p == "-" else Path(p).read_text()
    except OSError as e:
        raise UsageError(f"{p}: cannot read: {e.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else p
        raise UsageError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    for i, doc in enumerate(docs):
        yield (f"{p}[{i}]" if len(docs) > 1 else p), doc


def load_jobs(path: str | Path) -> list[FineTuneJob]:
    """All FineTuneJobs in a file (other kinds, e.g. a Secret beside the job, are skipped)."""
    jobs, problems = [], []
    for label, doc in load_documents(path):
        if isinstance(doc, dict) and (doc.get("kind"), doc.get("apiVersion")) != (KIND, API_VERSION):
            if doc.get("kind") == KIND:
                problems.append(
                    Problem(label, [f"apiVersion: expected {API_VERSION!r}, got {doc.get('apiVersion')!r}"])
                )
            continue
        try:
            jobs.append(parse_job(doc))
        except ValueError as e:
            problems.append(Problem(label, str(e).splitlines()))
    if problems:
        raise UsageError("\n".join(str(p) for p in problems))
    if not jobs:
        raise UsageError(f"{path}: no {KIND} ({API_VERSION}) found")
    return jobs
