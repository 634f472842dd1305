"""Every KUBETUNE_* environment knob the trainer reads, read in this one place.

``Knobs.from_env()`` runs once at the start (the CLI, then the recipe) and the frozen result is passed
down. A value that does not parse is a BadConfig naming the variable, not a silent default. Pure
Python (no torch): the CLI builds it before it decides whether to launch workers.

Not here: LossHead's KUBETUNE_FUSED_CE_IMPL fallback (model.py, another owner's region; the recipe
passes ``fused_ce_impl`` to it explicitly).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, TypeVar

from kubetune.api.constants import GRACE_SECONDS

from kubetune_trainer.errors import BadConfig

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
T = TypeVar("T")
CE_IMPLS = ("liger", "torch")


@dataclass(frozen=True)
class Knobs:
    # run
    grace_seconds: float = float(GRACE_SECONDS)  # the pod's terminationGracePeriodSeconds (the operator sets it)
    progress_interval: float = 10.0  # seconds between progress writes
    upload_max_backoff: float = 30.0  # checkpoint upload retries back off up to this
    final_upload_timeout: float = 1800.0  # how long the end of the run waits for pending checkpoint uploads
    termination_log: str = "/dev/termination-log"
    # storage (storage.py): where pvc:// claims are mounted; the boto3 client's retries and timeouts
    pvc_root: str = "/mnt/pvc"
    s3_max_attempts: int = 3
    s3_connect_timeout: float = 5.0
    s3_read_timeout: float = 60.0
    # speed levers (benchmarks)
    fused_optimizer: bool = True  # fused AdamW on CUDA
    compile: bool = False  # torch.compile the model
    fused_ce_impl: str | None = None  # liger | torch; None: liger where it runs
    fsdp_rank0_load: bool = True  # under FSDP only rank 0 reads the weights (model.loading_place)
    skip_outputs: bool = False  # benchmarks: no final checkpoint, eval or outputs
    allow_random_init: bool = False  # no weight files: random init from config.json (benchmarks, calibration)
    # test knobs: drive GPU code paths on CPU, stretch a tiny run
    debug_fsdp_on_cpu: bool = False
    debug_precision_on_cpu: bool = False
    debug_bnb_on_cpu: bool = False
    debug_liger_on_cpu: bool = False  # only with TRITON_INTERPRET=1 (liger_on)
    triton_interpret: bool = False
    debug_step_sleep: float = 0.0
    debug_eval_sleep: float = 0.0
    # launcher (cli.launch_command): the Indexed Job's rendezvous
    launched: bool = False
    num_nodes: int | None = None
    node_rank: int | None = None  # else JOB_COMPLETION_INDEX
    master_addr: str | None = None  # else MASTER_ADDR
    master_port: str | None = None  # else MASTER_PORT

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Knobs":
        r = _Reader(os.environ if env is None else env)
        d = cls()
        return cls(
            grace_seconds=r.number("KUBETUNE_GRACE_SECONDS", d.grace_seconds),
            progress_interval=r.number("KUBETUNE_PROGRESS_INTERVAL", d.progress_interval, positive=True),
            upload_max_backoff=r.number("KUBETUNE_UPLOAD_MAX_BACKOFF", d.upload_max_backoff),
            final_upload_timeout=r.number("KUBETUNE_FINAL_UPLOAD_TIMEOUT", d.final_upload_timeout),
            termination_log=termination_log(env),
            pvc_root=r.text("KUBETUNE_PVC_ROOT") or d.pvc_root,
            s3_max_attempts=r.integer("KUBETUNE_S3_MAX_ATTEMPTS", default=d.s3_max_attempts),
            s3_connect_timeout=r.number("KUBETUNE_S3_CONNECT_TIMEOUT", d.s3_connect_timeout),
            s3_read_timeout=r.number("KUBETUNE_S3_READ_TIMEOUT", d.s3_read_timeout),
            fused_optimizer=r.flag("KUBETUNE_FUSED_OPTIMIZER", d.fused_optimizer),
            compile=r.flag("KUBETUNE_COMPILE", d.compile),
            fused_ce_impl=r.choice("KUBETUNE_FUSED_CE_IMPL", CE_IMPLS),
            fsdp_rank0_load=r.flag("KUBETUNE_FSDP_RANK0_LOAD", d.fsdp_rank0_load),
            skip_outputs=r.flag("KUBETUNE_SKIP_OUTPUTS", d.skip_outputs),
            allow_random_init=r.flag("KUBETUNE_ALLOW_RANDOM_INIT", d.allow_random_init),
            debug_fsdp_on_cpu=r.flag("KUBETUNE_DEBUG_FSDP_ON_CPU", False),
            debug_precision_on_cpu=r.flag("KUBETUNE_DEBUG_PRECISION_ON_CPU", False),
            debug_bnb_on_cpu=r.flag("KUBETUNE_DEBUG_BNB_ON_CPU", False),
            debug_liger_on_cpu=r.flag("KUBETUNE_DEBUG_LIGER_ON_CPU", False),
            triton_interpret=r.text("TRITON_INTERPRET") == "1",  # Triton's own variable: as Triton reads it
            debug_step_sleep=r.number("KUBETUNE_DEBUG_STEP_SLEEP", 0.0),
            debug_eval_sleep=r.number("KUBETUNE_DEBUG_EVAL_SLEEP", 0.0),
            launched=r.flag("KUBETUNE_LAUNCHED", False),
            num_nodes=r.integer("KUBETUNE_NUM_NODES", minimum=1),
            node_rank=r.integer("KUBETUNE_NODE_RANK") if r.text("KUBETUNE_NODE_RANK") else r.integer("JOB_COMPLETION_INDEX"),
            master_addr=r.text("KUBETUNE_MASTER_ADDR") or r.text("MASTER_ADDR"),
            master_port=r.text("KUBETUNE_MASTER_PORT") or r.text("MASTER_PORT"),
        )


class _Reader:
    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def text(self, name: str) -> str | None:
        v = self.env.get(name)
        return v.strip() if v and v.strip() else None  # empty: unset, as a pod spec's "" often means

    def flag(self, name: str, default: bool) -> bool:
        v = self.text(name)
        if v is None:
            return default
        if v.lower() in _TRUE:
            return True
        if v.lower() in _FALSE:
            return False
        raise BadConfig(f"environment variable {name}={v!r}: expected 1 or 0")

    def number(self, name: str, default: float, positive: bool = False) -> float:
        want = "a positive number (seconds)" if positive else "a number >= 0 (seconds)"
        finite = lambda x: (x > 0 if positive else x >= 0) and x != float("inf")  # noqa: E731  (nan fails both)
        return self.typed(name, float, finite, want, default)

    def integer(self, name: str, minimum: int = 0, default: int | None = None) -> int | None:
        return self.typed(name, int, lambda x: x >= minimum, f"an integer >= {minimum}", default)

    def typed(self, name: str, parse: Callable[[str], T], ok: Callable[[T], bool], want: str, default):
        """The variable parsed (default when unset); a value that does not parse or is not ok names it."""
        v = self.text(name)
        if v is None:
            return default
        try:
            x = parse(v)
        except ValueError:
            x = None
        if x is None or not ok(x):
            raise BadConfig(f"environment variable {name}={v!r}: expected {want}")
        return x

    def choice(self, name: str, allowed: tuple[str, ...]) -> str | None:
        v = self.text(name)
        if v is not None and v not in allowed:
            raise BadConfig(f"environment variable {name}={v!r}: expected one of {', '.join(allowed)}")
        return v


def termination_log(env: Mapping[str, str] | None = None) -> str:
    """Where the termination message goes. Readable alone: a run that fails on another knob's bad
    value must still write its reason there."""
    if env is None and _installed is not None:
        return _installed.termination_log
    return _Reader(os.environ if env is None else env).text("KUBETUNE_TERMINATION_LOG") or Knobs.termination_log


# The recipe installs its Knobs for the run, so helpers deep in model building (model.plan_dtypes_on
# and friends, called from build_model) see the same values without a parameter through every layer.
# Outside a run (unit tests, benchmarks that set the env around one call) they are read when asked.
_installed: Knobs | None = None


def current() -> Knobs:
    return _installed if _installed is not None else Knobs.from_env()


@contextlib.contextmanager
def installed(knobs: Knobs) -> Iterator[Knobs]:
    global _installed
    previous, _installed = _installed, knobs
    try:
        yield knobs
    finally:
        _installed = previous
