"""`kubetune operator`: run the FineTuneJob operator (kopf)."""

from __future__ import annotations

import argparse
import logging
import random
from typing import TYPE_CHECKING

from kubetune.errors import UsageError

if TYPE_CHECKING:
    from kubetune.controller.state import Config


def _seconds(text: str) -> float:
    """An interval flag: a positive number of seconds (kopf's timers take no zero or negative one)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0 and < 86400, got {text!r}")
    return value


def _lifetime(text: str) -> int:
    """--peering-lifetime: whole seconds, long enough for kopf's renewal 5-10 s before expiry."""
    if not text.isdigit() or not 15 <= int(text) <= 3600:
        raise argparse.ArgumentTypeError(f"must be whole seconds from 15 to 3600, got {text!r}")
    return int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch only this namespace (repeatable); default: all namespaces",
    )
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port (0 disables)")
    p.add_argument("--metrics-address", default="0.0.0.0", help="address for /metrics")
    p.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="kopf liveness endpoint ('' disables)")
    p.add_argument(
        "--peering",
        default="kubetune",
        metavar="NAME",
        help="kopf peering object for leader election: of the replicas sharing it, only the one with "
        "the highest priority acts",
    )
    p.add_argument(
        "--peering-lifetime",
        type=_lifetime,
        default=60,
        metavar="SECONDS",
        help="how long a replica's peering record counts as alive (default 60, kopf's): a standby takes "
        "over this long after the leader died; each replica renews its record 5-10 s before it lapses",
    )
    p.add_argument("--standalone", action="store_true", help="no peering (a single replica, or tests)")
    p.add_argument(
        "--priority",
        default="random",
        help="peering priority; 'random' (default) gives each replica a distinct one, because kopf "
        "pauses every operator when two share the highest priority",
    )
    p.add_argument("--image", default=None, help="default trainer image (runPolicy.image overrides it per job)")
    p.add_argument(
        "--hf-endpoint",
        default=None,
        metavar="URL",
        help="a Hugging Face Hub mirror for hf:// models and datasets: the operator reads config.json "
        "from it and trainer pods get it as HF_ENDPOINT (default: $HF_ENDPOINT, else the Hub)",
    )
    p.add_argument(
        "--trainer-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for every trainer pod (repeatable): proxies, NCCL settings; a "
        "job's spec.resources.env wins for the same name",
    )
    p.add_argument(
        "--allow-endpoint",
        action="append",
        default=[],
        metavar="HOST|CIDR[:PORT]",
        help="an S3 endpoint address the operator may call although it is loopback, link-local or "
        "otherwise refused (repeatable): e.g. a MinIO on the node's loopback in a test cluster. "
        "Cloud metadata addresses stay refused unless named here",
    )
    p.add_argument(
        "--progress-interval", type=_seconds, default=10.0, help="seconds between progress polls (default 10)"
    )
    p.add_argument(
        "--retry-interval",
        type=_seconds,
        default=30.0,
        help="seconds between re-checks of a job that waits (Pending: a Secret, a claim, a model's config; "
        "Unschedulable; Starting) for what sends the operator no event (default 30)",
    )
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
    return not (
        record.levelno == logging.INFO
        and isinstance(record.msg, str)
        and record.msg.startswith(("Handler '", "Timer '"))
        and record.msg.endswith(" succeeded.")
    )


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


class _RedactingFilter(logging.Filter):
    """The last net: no log line of any library leaves the process with a credential's shape in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from kubetune.controller.redact import redact

        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a record whose arguments do not format is left to logging
            return True
        clean = redact(text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


def ensure_peering(custom, name: str, namespaces: list[str], log: logging.Logger) -> None:
    """Leader election needs kopf's peering object, which kopf waits for silently when it is
    missing. Create it (as the chart does), or refuse to start with the way out. ``custom``: the
    operator's CustomObjectsApi (``Kube.custom``)."""
    from kubernetes.client.rest import ApiException

    plural = "clusterkopfpeerings" if not namespaces else "kopfpeerings"
    kind = "ClusterKopfPeering" if not namespaces else "KopfPeering"
    scopes: list[str | None] = [*namespaces] or [None]  # None: the cluster-wide peering
    for ns in scopes:
        where = f"{kind} {name!r}" + (f" in namespace {ns}" if ns else "")
        body = {
            "apiVersion": "kopf.dev/v1",
            "kind": kind,
            "metadata": {"name": name, **({"namespace": ns} if ns else {})},
        }
        try:
            # list, not get: list is what the chart's RBAC grants on peerings (kopf watches them)
            sel = {"field_selector": f"metadata.name={name}"}
            found = (
                custom.list_namespaced_custom_object("kopf.dev", "v1", ns, plural, **sel)
                if ns
                else custom.list_cluster_custom_object("kopf.dev", "v1", plural, **sel)
            )
            if found.get("items"):
                continue
            if ns:
                custom.create_namespaced_custom_object("kopf.dev", "v1", ns, plural, body)
            else:
                custom.create_cluster_custom_object("kopf.dev", "v1", plural, body)
            log.info(f"created {where} for leader election")
        except ApiException as e:
            if e.status == 409:
                continue
            if e.status == 404:
                raise UsageError(
                    f"leader election (--peering {name}) needs kopf's peering CRDs, which are not "
                    "installed: kubectl apply -f crds/kopf-peering.yaml (the Helm chart installs them), "
                    "or run a single replica with --standalone"
                ) from None
            if e.status == 403:
                log.warning(
                    f"waiting for {where} (leader election): this operator may not create it; create it "
                    f"(kubectl apply -f crds/kopf-peering.yaml, then a {kind} named {name}) or run with "
                    "--standalone"
                )
                continue
            raise
    log.info(f"leader election through {kind} {name!r}: only the replica with the highest priority acts")


def operator_config(args: argparse.Namespace) -> Config:
    """The handlers' Config from the flags, each checked."""
    import os

    from kubetune.controller import manifests
    from kubetune.controller.egress import EgressPolicy
    from kubetune.controller.sources import hub_endpoint
    from kubetune.controller.state import Config

    if args.hf_endpoint is not None:
        hf_endpoint = hub_endpoint(args.hf_endpoint, "--hf-endpoint")
    else:
        hf_endpoint = hub_endpoint(os.environ.get("HF_ENDPOINT"), "HF_ENDPOINT")
    pod = manifests.PodDefaults(
        image=args.image or manifests.DEFAULT_IMAGE, hf_endpoint=hf_endpoint, env=trainer_env(args.trainer_env)
    )
    return Config(
        pod=pod,
        namespaces=tuple(args.namespace),
        egress=EgressPolicy(allow=tuple(args.allow_endpoint)),
        progress_interval=args.progress_interval,
        retry_interval=args.retry_interval,
        peering_lifetime=args.peering_lifetime,
    )


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

    import kopf

    from kubetune.controller import handlers, metrics
    from kubetune.controller.kube import Kube

    config = operator_config(args)
    kube = Kube.connect(args.kubeconfig)
    state = handlers.new_state(kube, config)
    if args.metrics_port:
        metrics.serve(state.table, args.metrics_port, args.metrics_address)
    _trim_periodically()
    kopf.configure(verbose=args.verbose)
    for h in logging.getLogger().handlers:
        h.addFilter(_RedactingFilter())
    if not args.verbose:
        logging.getLogger("kopf.objects").addFilter(_quiet_success)
    if not args.standalone:
        ensure_peering(kube.custom, args.peering, list(args.namespace), logging.getLogger("kubetune.operator"))
    kopf.run(
        registry=handlers.registry(config),
        memo=state,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        priority=priority,
        liveness_endpoint=args.liveness or None,
    )
    return 0
