"""Host memory the trainer certainly needs: the whole model, when something reads it into host
memory. Pure.

Only what is certain. A process that loads the model onto its own GPU streams it there tensor by
tensor. Rank 0 under FSDP reads it whole into host memory (the other ranks get it by broadcast), and
merging the adapter at the end loads the base whole on the CPU. A pod whose spec.resources.memory is
below that is OOM-killed every time, so the operator refuses it before it takes a GPU. Per-process
overheads (torch, the CUDA context, the data) vary too much to police.
"""
from __future__ import annotations

from kubetune.estimator.memory import BYTES


def whole_model_in_host(spec, plan, total_params: int) -> tuple[int, str]:
    """(bytes, why) of the whole model in host memory at once; (0, "") when nothing reads it whole."""
    why = []
    if plan.sharding == "fsdp" and plan.method != "qlora":
        why.append("rank 0 reads it whole under FSDP")
    if spec.output.merge_adapter:
        why.append("output.mergeAdapter loads it whole")
    per_param = BYTES[plan.weight_dtype] if spec.resources.gpus_per_node else 4  # the trainer computes in fp32 on CPU
    return (total_params * per_param, " and ".join(why)) if why else (0, "")
