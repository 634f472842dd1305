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
            print(f"{f}: {job.kind}/{job.metadata.name} is valid")
    return 1 if failed else 0
