"""`kubetune validate FILE...`: check FineTuneJob YAML against the API models, offline."""

from __future__ import annotations

import argparse
import sys

from kubetune.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="YAML files ('-' for stdin)")


def run(args: argparse.Namespace) -> int:
    from kubetune.api.validation import load_jobs

    failed = 0
    for f in args.files:
        try:
            jobs = load_jobs(f)
        except UsageError as e:
            print(e, file=sys.stderr)
            failed += 1
            continue
        for job in jobs:
            if problem := _model_problem(job.spec):
                print(f"{f}: {job.kind}/{job.metadata.name}: {problem}", file=sys.stderr)
                failed += 1
            else:
                print(f"{f}: {job.kind}/{job.metadata.name} is valid")
    return 1 if failed else 0


def _model_problem(spec) -> str | None:
    """What the operator would refuse about the model when its architecture is known offline (inline
    or in the catalog): LoRA targets it does not have, an architecture no GPU could hold. A model
    whose config.json must be read is checked by the operator (or `kubetune estimate -f`)."""
    from kubetune.estimator import ArchitectureNotFound, resolve_architecture
    from kubetune.plan import plan_from_spec

    try:
        arch = resolve_architecture(spec.model)
    except ArchitectureNotFound:
        return None
    except (UsageError, ValueError) as e:
        return str(e)
    try:
        from kubetune.estimator import estimate

        estimate(arch, plan_from_spec(spec, micro_batch_size=1))
    except (UsageError, ValueError) as e:
        return str(e)
    return None
