"""Facts the operator and the trainer share, one home each (the trainer image installs this package
too): how the trainer says why it exited, how long it has to save on SIGTERM, the phases and
conditions of a FineTuneJob. Like kubeflow/trainer's ``constants`` package."""

from __future__ import annotations

from typing import Final

# --- phases and conditions --------------------------------------------------------------------

# Final, one a line: type checkers then see each as its Literal (v1alpha1.Phase), not just a str
PENDING: Final = "Pending"
UNSCHEDULABLE: Final = "Unschedulable"
STARTING: Final = "Starting"
RUNNING: Final = "Running"
SUSPENDED: Final = "Suspended"
SUCCEEDED: Final = "Succeeded"
FAILED: Final = "Failed"
PHASES = (PENDING, UNSCHEDULABLE, STARTING, RUNNING, SUSPENDED, SUCCEEDED, FAILED)
TERMINAL_PHASES = (SUCCEEDED, FAILED)

# condition types, in the order status lists them (kubectl describe reads top to bottom)
VALIDATED, SCHEDULED, CHECKPOINT_SYNCED = "Validated", "Scheduled", "CheckpointSynced"
CONDITION_TYPES = (VALIDATED, SCHEDULED, RUNNING, CHECKPOINT_SYNCED, SUSPENDED, SUCCEEDED, FAILED)

# --- the trainer's exit ----------------------------------------------------------------------

# The trainer's exit code for each TrainerTermination reason. Preempted is 128+SIGTERM: non-zero,
# so the Job does not count the pod as a success.
EXIT_CODES = {
    "Completed": 0,
    "EarlyStopped": 0,
    "Preempted": 143,
    "BadConfig": 2,
    "BadData": 3,
    "ModelLoadFailed": 4,
    "StorageFailed": 5,
    "OutOfMemory": 6,
    "Error": 1,
}
# what retrying the same pod cannot fix: the Job fails at once instead of burning backoffLimit
# (StorageFailed may pass, so it is retried)
NON_RETRYABLE_EXIT_CODES = tuple(EXIT_CODES[r] for r in ("BadConfig", "BadData", "ModelLoadFailed"))
KERNEL_OOM_EXIT_CODE = 137  # SIGKILL from the kernel's OOM killer (a cgroup memory limit)
# the operator handles out-of-memory itself (a retry with fit advice applied)
OOM_EXIT_CODES = (EXIT_CODES["OutOfMemory"], KERNEL_OOM_EXIT_CODE)

# Seconds between SIGTERM and SIGKILL: the trainer saves the step it is on and uploads it within this.
GRACE_SECONDS = 60

# --- training ----------------------------------------------------------------------------------

# label value that a loss ignores (torch's cross_entropy ignore_index): prompt tokens, padding
IGNORE_INDEX = -100

# bf16 arithmetic needs compute capability 8.0 (Ampere) or newer: older GPUs (T4, V100) have no bf16
# tensor cores, and Triton (Liger's kernels and fused loss) refuses bf16 there (linkedin/Liger-Kernel#51:
# sm_75 has no .bf16 instructions; Liger skips its bf16 tests below sm_80). The operator keeps such
# jobs off them (GFD's nvidia.com/gpu.compute.major); the trainer names the field if one gets there anyway.
BF16_PRECISIONS = ("bf16", "bf16-mixed")
BF16_MIN_COMPUTE_MAJOR = 8


def bf16_refused(precision: str, capability: tuple[int, int] | None, gpu: str = "this GPU") -> str | None:
    """Why training.precision cannot run on a GPU of this compute capability, or None when it can (or
    when the capability is unknown: a node without GFD's labels is not turned away on a guess)."""
    if precision not in BF16_PRECISIONS or capability is None or capability[0] >= BF16_MIN_COMPUTE_MAJOR:
        return None
    return (
        f"training.precision {precision} needs a GPU of compute capability {BF16_MIN_COMPUTE_MAJOR}.0 or newer "
        f"(Ampere, Ada, Hopper, Blackwell); {gpu} is {capability[0]}.{capability[1]}: set training.precision "
        "to fp16 (or fp32) to train there"
    )
