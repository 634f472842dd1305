"""`kubetune dev`: the local test ground (control plane built from Go modules, fake GPU fleet, S3, Prometheus).

  kubetune dev build                 build and cache the binaries only (etcd, kubernetes, kwok, helm, s3s-fs,
                                     and for real nodes kubelet, containerd, pause, coredns)
  kubetune dev up [--prometheus] [--real-nodes N]
                                     start everything (builds first when binaries are missing); N real
                                     kubelet nodes beside the KWOK fleet (default 1 as root, else 0)
  kubetune dev status                each process: pid, alive/dead, endpoint
  kubetune dev env                   shell exports: eval "$(kubetune dev env)"
  kubetune dev restart NAME          stop and start one process on the same port and data (e.g. s3)
  kubetune dev prometheus [--target HOST:PORT ...]   start Prometheus / add scrape targets
  kubetune dev down [--purge]        stop exactly the processes `up` started; --purge also deletes the state

Top-level imports stay light: the heavy parts are imported inside run().
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from kubetune.errors import UsageError

ACTIONS = ("build", "up", "down", "status", "env", "restart", "prometheus")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.error = _one_line_error  # type: ignore[method-assign]  # a usage block hides the actual mistake
    parser.epilog = __doc__.split("\n\n")[1]
    parser.add_argument("action", choices=ACTIONS, metavar="ACTION", help="|".join(ACTIONS))
    parser.add_argument("name", nargs="?", help="for restart: the process to restart (e.g. s3, etcd)")
    parser.add_argument("--dir", help="state directory (default $KUBETUNE_DEV_DIR or ~/.cache/kubetune/dev)")
    parser.add_argument("--prometheus", action="store_true", help="up: also start Prometheus")
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="prometheus/up --prometheus: a scrape target (repeatable)",
    )
    parser.add_argument("--purge", action="store_true", help="down: also delete the state directory")
    parser.add_argument(
        "--real-nodes",
        type=_count,
        default=None,
        metavar="N",
        help="up: real kubelet nodes (containerd + runc) beside the KWOK fleet (default 1 as root, else 0)",
    )


def _count(text: str) -> int:
    if not text.isdigit() or int(text) > 8:
        raise argparse.ArgumentTypeError(f"--real-nodes must be a whole number from 0 to 8, got {text!r}")
    return int(text)


def _one_line_error(message: str) -> NoReturn:
    print(f"kubetune dev: error: {message} (see `kubetune dev --help`)", file=sys.stderr)
    sys.exit(2)


def _check(args: argparse.Namespace) -> None:
    if args.action == "restart" and not args.name:
        raise UsageError("restart needs the name of a process, e.g. `kubetune dev restart s3`")
    if args.real_nodes is not None and args.action != "up":
        raise UsageError(f"--real-nodes is for `up`, not `{args.action}`")
    if args.action != "restart" and args.name:
        raise UsageError(f"unexpected argument {args.name!r} for `{args.action}`")
    for t in args.target:
        host, _, port = t.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--target must be HOST:PORT, got {t!r}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    from kubetune.devenv import build, ground, render

    lay = ground.layout(args.dir)
    try:
        if args.action == "build":
            comps = build.ensure_all()
            if ground.default_real_nodes() or not build.missing_packages():
                # Real nodes need root to run; a non-root build without their Debian packages skips them.
                build.ensure_real_node(comps["kubernetes"].version)
            return 0
        if args.action == "up":
            ground.up(lay, with_prometheus=args.prometheus, targets=args.target, real_nodes=args.real_nodes)
            dir_flag = f" --dir {args.dir}" if args.dir else ""
            print(f'ground is up; to use it: eval "$(kubetune dev env{dir_flag})"', file=sys.stderr)
            return 0
        if args.action == "down":
            return _down(lay, args.purge)
        if args.action == "status":
            return _status(lay)
        if args.action == "env":
            print(render.env_exports(ground.env_values(lay)), end="")
            dirs = ":".join(ground.path_dirs(lay))
            print(f"export PATH='{dirs}':\"$PATH\"")
            return 0
        if args.action == "restart":
            ground.restart(args.name, lay)
            return 0
        if args.action == "prometheus":
            proc = ground.start_prometheus(lay, args.target)
            print(f"prometheus pid {proc.pid}: {ground.env_values(lay)['KUBETUNE_PROMETHEUS_URL']}")
            return 0
    except (ground.GroundError, build.BuildError) as e:
        raise UsageError(str(e)) from None
    return 2


def _down(lay, purge: bool) -> int:
    import shutil

    from kubetune.devenv import ground

    stuck = ground.down(lay)
    if stuck:
        print(f"still running: {', '.join(stuck)}")
        return 1
    if purge:
        shutil.rmtree(lay.root, ignore_errors=True)
    return 0


def _status(lay) -> int:
    from kubetune.devenv import ground

    rows = ground.status_rows(lay)
    if not rows:
        print(f"ground is down (no processes recorded in {lay.root})")
        return 3
    for name, pid, alive, endpoint in rows:
        print(f"{name:<24} pid {pid:<8} {'alive' if alive else 'DEAD':<6} {endpoint}")
    return 0 if all(r[2] for r in rows) else 1
