"""`kubetune train --config FILE`: run the trainer from a rendered TrainerConfig.

Top-level imports stay light (no torch): `kubetune` imports this module to build its parser.

Exit codes: 0 Completed/EarlyStopped, 143 Preempted (SIGTERM; a checkpoint was saved), 2 BadConfig,
3 BadData, 4 ModelLoadFailed, 5 StorageFailed, 6 OutOfMemory, 1 anything else. Every exit writes a
TrainerTermination JSON (see progress.py); expected failures print one line, never a traceback.

Multi-GPU and multi-node: when resolved.numProcesses > 1 and this is not already a launched worker,
the command runs itself again under `accelerate launch` (see supervise) with the rendezvous taken
from the Indexed Job's environment:
  KUBETUNE_NUM_NODES (default spec.resources.nodes), KUBETUNE_NODE_RANK or JOB_COMPLETION_INDEX,
  KUBETUNE_MASTER_ADDR or MASTER_ADDR (the index-0 pod's DNS name via the headless Service),
  KUBETUNE_MASTER_PORT or MASTER_PORT (default 29500; on one node too, where it is the rendezvous store's port).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from kubetune.api.constants import EXIT_CODES as EXIT


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="rendered TrainerConfig (YAML or JSON)")
    p.add_argument("--no-launch", action="store_true",
                   help="never re-execute under `accelerate launch` (set automatically in launched workers)")


def launch_command(config, config_path: str, env: dict[str, str] | None = None, knobs=None) -> list[str] | None:
    """The `accelerate launch` command for a multi-process run, or None for a single process."""
    from kubetune_trainer.knobs import Knobs

    env = dict(os.environ if env is None else env)
    k = knobs or Knobs.from_env(env)
    nproc = config.resolved.num_processes
    if nproc <= 1 or "LOCAL_RANK" in env or k.launched:
        return None
    nodes = k.num_nodes or config.spec.resources.nodes
    rank = k.node_rank or 0
    addr = k.master_addr or "127.0.0.1"
    port = k.master_port or "29500"
    # --multi_gpu always: accelerate only infers it from the local GPU count, so one GPU per pod on
    # several nodes would start independent single-process runs. On CPU (tests) it runs gloo.
    # static rendezvous on one machine too: torchrun's static store listens on the master address and
    # port, while c10d without an endpoint (accelerate passes none for one machine) always takes port
    # 29400, so two single-node runs on one host would meet in one store.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(nproc), "--num_machines", str(nodes), "--machine_rank", str(rank),
           "--main_process_ip", addr, "--main_process_port", str(port), "--rdzv_backend", "static",
           "--same_network", "--dynamo_backend", "no", "--mixed_precision", "no",
           "-m", "kubetune_trainer.cli", "--config", config_path, "--no-launch"]
    if nodes == 1:
        cmd.remove("--same_network")
    return cmd


def supervise(cmd: list[str], env: dict[str, str]) -> int:
    """Run the launcher as a child, pass the kubelet's SIGTERM/SIGINT on (torchrun forwards them to
    every worker, which then saves a preemption checkpoint), and exit with the code of the reason
    rank 0 wrote: torchrun turns every worker failure into exit 1, which would hide BadData (no
    retry) or Preempted from the Job's podFailurePolicy."""
    import signal
    import subprocess

    from kubetune_trainer.progress import termination_path, written_reason

    path = termination_path()
    try:
        open(path, "w").close()  # a reason found after the run is this run's
    except OSError:
        pass
    child = subprocess.Popen(cmd, env=env)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    rc = child.wait()
    reason = written_reason(path)
    if reason in EXIT:
        return EXIT[reason]
    return 128 - rc if rc < 0 else rc


def run(args: argparse.Namespace) -> int:
    from kubetune_trainer.config import load_config
    from kubetune_trainer.errors import TrainerError
    from kubetune_trainer.knobs import Knobs
    from kubetune_trainer.progress import log_event, write_termination

    def fail(reason: str, message: str, step=None) -> int:
        write_termination(reason, message, step=step)
        log_event("failed", reason=reason, message=message)
        print(f"kubetune train: {reason}: {message}", file=sys.stderr, flush=True)
        return EXIT[reason]

    try:
        config = load_config(args.config)
        knobs = Knobs.from_env()
    except TrainerError as e:
        return fail(e.reason, e.message)

    if not args.no_launch:
        cmd = launch_command(config, args.config, knobs=knobs)
        if cmd is not None:
            log_event("launch", command=" ".join(cmd))
            env = dict(os.environ, KUBETUNE_LAUNCHED="1")
            # torchrun waits this long (whole seconds) after forwarding SIGTERM before it kills the workers
            env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(math.ceil(knobs.grace_seconds)))
            return supervise(cmd, env)

    try:
        import torch
    except ImportError:
        return fail("Error", "torch is not installed: the trainer needs the kubetune[trainer] extra (the trainer image)")

    from kubetune_trainer.loop import train

    try:
        outcome = train(config, knobs=knobs)
    except TrainerError as e:
        return fail(e.reason, e.message)
    except torch.OutOfMemoryError as e:
        first = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
        return fail("OutOfMemory", f"GPU out of memory: {first[:500]}")
    except KeyboardInterrupt:
        return fail("Error", "interrupted")
    except Exception as e:  # a bug or an unforeseen failure: keep the traceback in the log
        from kubetune.errors import UNTRUSTED_S3, certificate_untrusted

        if certificate_untrusted(e) and type(e).__module__.startswith("botocore"):
            return fail("BadConfig", f"S3 endpoint {config.spec.storage.endpoint}: {UNTRUSTED_S3}")
        import traceback

        traceback.print_exc()
        return fail("Error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:2000])
    is_main = int(os.environ.get("RANK", "0")) == 0 or int(os.environ.get("LOCAL_RANK", "0")) == 0
    if is_main:
        doc = write_termination(outcome.reason, outcome.message, result=outcome.result, step=outcome.step)
        log_event("finished", **doc)
    return EXIT[outcome.reason]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kubetune train")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
