"""GPU memory estimator: per-GPU bytes of a FineTuneJob from the model's architecture and the job's plan.

Public API (pure Python, no torch; docs/estimator.md explains every term):

- ``estimate(arch, plan) -> Estimate``: price a :class:`kubetune.plan.TrainingPlan`.
- ``estimate_spec(spec, micro_batch_size=None, num_processes=None, read_config=None) -> Estimate``:
  the plan kubetune's trainer runs for a spec (``plan_from_spec``), priced.
- ``resolve_architecture(model_source, read_config=None) -> Architecture``: inline architecture,
  then the built-in catalog (hf:// names), then config.json read by ``read_config(uri) -> str``.
- ``max_micro_batch(arch, plan, gpu_bytes, margin=0.05) -> int``: the ``auto`` micro-batch solver.
- ``fit_advice(arch, plan, gpu_sizes_bytes) -> list[Advice]``: nearby configurations that fit.
- ``plan_from_flags(...)``: the plain HF Trainer + PEFT stack's plan (the CLI flag form).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from kubetune.errors import UsageError
from kubetune.estimator.advice import (
    DEFAULT_MARGIN,
    GPU_SIZE_BYTES,
    GPU_SIZES,
    Advice,
    GpuSize,
    fit_advice,
    fits,
    max_micro_batch,
)
from kubetune.estimator.arch import Architecture, from_config, from_model_architecture
from kubetune.estimator.flagplan import plan_from_flags
from kubetune.estimator.memory import BREAKDOWN_KEYS, GIB, Estimate, estimate, format_gib

__all__ = [
    "Advice",
    "Architecture",
    "ArchitectureNotFound",
    "BREAKDOWN_KEYS",
    "DEFAULT_MARGIN",
    "Estimate",
    "GIB",
    "GPU_SIZES",
    "GPU_SIZE_BYTES",
    "GpuSize",
    "estimate",
    "estimate_spec",
    "fit_advice",
    "fits",
    "format_gib",
    "from_config",
    "max_micro_batch",
    "plan_from_flags",
    "resolve_architecture",
]


class ArchitectureNotFound(UsageError):
    """No architecture for spec.model: not inline, not in the catalog, config.json unreadable."""


ReadConfig = Callable[[str], str]


def resolve_architecture(model_source: Any, read_config: ReadConfig | None = None) -> Architecture:
    """The architecture of ``spec.model`` (a ModelSource).

    Order: the inline ``architecture``; the built-in catalog for ``hf://org/name[@revision]``; then
    ``read_config(uri)``, a caller-supplied callable returning config.json text for the URI (the operator
    passes one that reads the Hub, S3 or a PVC). Raises ArchitectureNotFound naming spec.model.uri.
    """
    from kubetune.estimator import catalog

    uri = model_source.uri
    if model_source.architecture is not None:
        return from_model_architecture(model_source.architecture, "spec.model.architecture")
    if uri.startswith("hf://"):
        hit = catalog.lookup(uri)
        if hit is not None:
            name, cfg = hit
            return _cached_catalog_arch(name)
    why = "no config reader was given"
    if read_config is not None:
        try:
            text = read_config(uri)
        except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear line
            why = f"reading its config.json failed: {e}"
        else:
            try:
                cfg = json.loads(text)
            except (TypeError, ValueError) as e:
                raise ArchitectureNotFound(f"spec.model.uri {uri}: config.json is not valid JSON ({e})") from None
            return from_config(cfg, f"spec.model.uri {uri} config.json")
    raise ArchitectureNotFound(
        f"spec.model.uri {uri}: not in kubetune's model catalog and {why}; "
        "set spec.model.architecture (the config.json dimensions) to estimate it"
    )


_CATALOG_ARCHS: dict[str, Architecture] = {}


def _cached_catalog_arch(name: str) -> Architecture:
    """Catalog architectures are built once per process (their estimate caches live on them)."""
    from kubetune.estimator import catalog

    a = _CATALOG_ARCHS.get(name)
    if a is None:
        a = from_config(catalog.CATALOG[name], name, name=name)
        _CATALOG_ARCHS[name] = a
    return a


def catalog_architecture(name: str) -> Architecture | None:
    """Architecture of a catalog repo id or alias (hf:// and @revision allowed); None when unknown."""
    from kubetune.estimator import catalog

    hit = catalog.lookup(name)
    return _cached_catalog_arch(hit[0]) if hit else None


def estimate_spec(
    spec: Any,
    micro_batch_size: int | None = None,
    num_processes: int | None = None,
    read_config: ReadConfig | None = None,
    gradient_accumulation_steps: int | None = None,
) -> Estimate:
    """Estimate what kubetune's trainer will do with ``spec``: ``plan_from_spec`` then ``estimate``.

    With ``training.microBatchSize: auto`` and no ``micro_batch_size``, the estimate is for a micro
    batch of 1 (resolve auto with ``max_micro_batch`` first to price the real one).
    """
    from kubetune.plan import plan_from_spec

    arch = resolve_architecture(spec.model, read_config)
    mbs = micro_batch_size
    note: tuple[str, ...] = ()
    if mbs is None and spec.training.micro_batch_size == "auto":
        mbs, note = 1, ("microBatchSize is auto: estimated at micro batch 1",)
    plan = plan_from_spec(
        spec, micro_batch_size=mbs, gradient_accumulation_steps=gradient_accumulation_steps, num_processes=num_processes
    )
    est = estimate(arch, plan)
    if note:
        est.notes = est.notes + note
    return est
