"""`kubetune` console script.

Each subcommand lives in its own module that exposes ``add_arguments(parser)`` and ``run(args) -> int``.
Those modules keep their top-level imports light (no torch, no kubernetes client) so that
``kubetune crd`` or ``kubetune estimate`` start fast and the operator image never loads the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kubetune.errors import UsageError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "crd": ("kubetune.api.cli", "print the FineTuneJob CRD generated from the API models"),
    "validate": ("kubetune.api.cli_validate", "validate FineTuneJob YAML files against the API models"),
    "estimate": ("kubetune.estimator.cli", "estimate per-GPU memory for a job or a set of flags"),
    "report": ("kubetune.report_cli", "show a FineTuneJob's evaluation report: base vs tuned metrics and answers"),
    "dev": ("kubetune.devenv.cli", "local control plane, fake GPU fleet and S3 server: up|down|status|env"),
    "operator": ("kubetune.controller.cli", "run the FineTuneJob operator (kopf)"),
    "train": ("kubetune_trainer.cli", "run the trainer from a rendered trainer config"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line naming the mistake, not a usage block
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="kubetune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        # Only the chosen subcommand's module is imported, so a missing optional dependency
        # (torch for `train`) cannot break the others.
        if only == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    only = chosen if chosen in SUBCOMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except UsageError as e:
        print(f"kubetune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
