"""`kubetune operator`: run the FineTuneJob operator (kopf)."""
from __future__ import annotations

import argparse
import logging
import random

from kubetune.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                   help="watch only this namespace (repeatable); default: all namespaces")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port (0 disables)")
    p.add_argument("--metrics-address", default="0.0.0.0", help="address for /metrics")
    p.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="kopf liveness endpoint ('' disables)")
    p.add_argument("--peering", default="kubetune", metavar="NAME",
                   help="kopf peering object for leader election: of the replicas sharing it, only the one with "
                        "the highest priority acts")
    p.add_argument("--standalone", action="store_true", help="no peering (a single replica, or tests)")
    p.add_argument("--priority", default="random",
                   help="peering priority; 'random' (default) gives each replica a distinct one, because kopf "
                        "pauses every operator when two share the highest priority")
    p.add_argument("--image", default=None, help="default trainer image (runPolicy.image overrides it per job)")
    p.add_argument("--hf-endpoint", default=None, metavar="URL",
                   help="a Hugging Face Hub mirror for hf:// models and datasets: the operator reads config.json "
                        "from it and trainer pods get it as HF_ENDPOINT (default: $HF_ENDPOINT, else the Hub)")
    p.add_argument("--trainer-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for every trainer pod (repeatable): proxies, NCCL settings; a "
                        "job's spec.resources.env wins for the same name")
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress polls")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig outside a cluster (default: $KUBECONFIG)")
    p.add_argument("--verbose", action="store_true")


def _bounded_malloc() -> None:
    """glibc gives every thread that allocates its own malloc arena; with the operator's worker
    threads that fragments to hundreds of MB of RSS for ~50 MB of live Python objects. Two arenas
    keep it bounded (the usual setting for threaded Python servers). glibc reads it at start-up,
    so re-exec once with it set; the image sets it already."""
    import os
    import sys

    if os.environ.get("MALLOC_ARENA_MAX") is None and sys.platform == "linux":
        os.environ["MALLOC_ARENA_MAX"] = "2"
        os.execv(sys.executable, [sys.executable, "-m", "kubetune.cli", *sys.argv[1:]])


def _trim_periodically(every: float = 30.0) -> None:
    """Hand freed heap back to the OS after a burst (glibc keeps it otherwise)."""
    import ctypes
    import threading
    import time

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return

    def loop() -> None:
        while True:
            time.sleep(every)
            libc.malloc_trim(0)

    threading.Thread(target=loop, name="malloc-trim", daemon=True).start()


def _quiet_success(record: logging.LogRecord) -> bool:
    """kopf logs every successful handler and timer call at INFO: with node heartbeats and progress
    polls that is thousands of lines an hour that say nothing. Failures and our own lines stay."""
    return not (record.levelno == logging.INFO and isinstance(record.msg, str)
                and record.msg.startswith(("Handler '", "Timer '")) and record.msg.endswith(" succeeded."))


def trainer_env(items: list[str]) -> tuple[tuple[str, str], ...]:
    """--trainer-env NAME=VALUE items, checked by the rules of spec.resources.env."""
    import re

    from kubetune.api.v1alpha1 import ENV_NAME_PATTERN, RESERVED_ENV_MESSAGE, reserved_env

    out: dict[str, str] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not re.match(ENV_NAME_PATTERN, name):
            raise UsageError(f"--trainer-env {item!r}: expected NAME=VALUE with NAME matching {ENV_NAME_PATTERN}")
        if reserved_env(name):
            raise UsageError(f"--trainer-env {name}: this name {RESERVED_ENV_MESSAGE}")
        out[name] = value
    return tuple(out.items())


def run(args: argparse.Namespace) -> int:
    _bounded_malloc()
    if args.priority == "random":
        priority = random.SystemRandom().randint(1, 2**31 - 1)
    else:
        try:
            priority = int(args.priority)
        except ValueError:
            raise UsageError(f"--priority must be an integer or 'random', got {args.priority!r}") from None
    if not 0 <= args.metrics_port <= 65535:
        raise UsageError(f"--metrics-port must be 0-65535, got {args.metrics_port}")

    import os

    from kubetune.controller.sources import hub_endpoint

    if args.hf_endpoint is not None:
        hf_endpoint = hub_endpoint(args.hf_endpoint, "--hf-endpoint")
    else:
        hf_endpoint = hub_endpoint(os.environ.get("HF_ENDPOINT"), "HF_ENDPOINT")
    env = trainer_env(args.trainer_env)
    os.environ["KUBETUNE_PROGRESS_INTERVAL"] = str(args.progress_interval)  # read when handlers load
    import kopf

    from kubetune.controller import handlers, kube, manifests, metrics

    kube.configure(args.kubeconfig)
    handlers.CONFIG.namespaces = list(args.namespace)
    handlers.CONFIG.pod = manifests.PodDefaults(image=args.image or manifests.DEFAULT_IMAGE, hf_endpoint=hf_endpoint,
                                                env=env)
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
    _trim_periodically()
    kopf.configure(verbose=args.verbose)
    if not args.verbose:
        logging.getLogger("kopf.objects").addFilter(_quiet_success)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        priority=priority,
        liveness_endpoint=args.liveness or None,
    )
    return 0
