"""Read the rendered trainer config (YAML or JSON) through the API's own pydantic models.

There is no second schema: the file is a ``TrainerConfig`` (kubetune.api.v1alpha1), which embeds the
FineTuneJob spec unchanged. Errors name the field as it is written in the file.
"""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from kubetune.api import registry
from kubetune.api.base import format_errors
from kubetune.api.v1alpha1 import TrainerConfig
from kubetune.plan import TrainingPlan, plan_from_spec

from kubetune_trainer.errors import BadConfig


def parse_config(data: dict, source: str = "config") -> TrainerConfig:
    if not isinstance(data, dict):
        raise BadConfig(f"{source}: expected a mapping (a TrainerConfig), got {type(data).__name__}")
    try:
        config = TrainerConfig.model_validate(data)
    except ValidationError as e:
        lines = format_errors(e)
        more = f" (and {len(lines) - 5} more)" if len(lines) > 5 else ""
        raise BadConfig(f"{source}: " + "; ".join(lines[:5]) + more) from None
    _check_trainer_rules(config, source)
    return config


def _check_trainer_rules(config: TrainerConfig, source: str) -> None:
    """What the trainer refuses beyond the API's rules, for a config rendered by an operator that did not
    check it (the API gains the same rule)."""
    spec = config.spec
    objective = getattr(spec, "objective", None)
    if getattr(objective, "reference", None) == "copy" and registry.method(spec.method.type).quantized:
        # deepcopy of the quantized model: a second 4-bit base whose log-probs the adapters-off base gives for free
        raise BadConfig(f"{source}: spec.objective.reference copy cannot be used with spec.method.type qlora: the "
                        "copy would be a second 4-bit base model, while the base with the adapters disabled is the "
                        "same reference at no memory cost; use reference implicit (qlora's default) or precomputed")


def load_config(path: str | Path) -> TrainerConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise BadConfig(f"cannot read trainer config {p}: {e.strerror or e}") from None
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadConfig(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {first}") from None
    return parse_config(data, str(p))


def plan_for(config: TrainerConfig) -> TrainingPlan:
    """The TrainingPlan this run must follow: the same call the estimator priced."""
    r = config.resolved
    try:
        return plan_from_spec(config.spec, r.micro_batch_size, r.gradient_accumulation_steps, r.num_processes)
    except ValueError as e:
        raise BadConfig(str(e)) from None
