"""Host memory the trainer certainly needs: the whole model, when something reads it into host
memory. Pure.

Only what is certain. A process that loads the model onto its own GPU streams it there tensor by
tensor. Rank 0 under FSDP reads it whole into host memory (the other ranks get it by broadcast), and
merging the adapter at the end loads the base whole on the CPU. A pod whose spec.resources.memory is
below that is OOM-killed every time, so the operator refuses it before it takes a GPU. Per-process
overheads (torch, the CUDA context, the data) vary too much to police.
"""

from __future__ import annotations

import math

from kubetune.api.base import quantity_to_float
from kubetune.api.registry import method as method_info
from kubetune.estimator.memory import BYTES

# Host memory over the whole model that a pod reading it whole must have (the tensors, and the
# allocator's slack while loading).
HOST_MARGIN = 1.1


def whole_model_in_host(spec, plan, total_params: int) -> tuple[int, str]:
    """(bytes, why) of the whole model in host memory at once; (0, "") when nothing reads it whole."""
    why = []
    # a quantized base is quantized while loading onto each GPU, never whole in host memory
    if plan.sharding == "fsdp" and not method_info(plan.method).quantized:
        why.append("rank 0 reads it whole under FSDP")
    if spec.output.merge_adapter:
        why.append("output.mergeAdapter loads it whole")
    per_param = BYTES[plan.weight_dtype] if spec.resources.gpus_per_node else 4  # the trainer computes in fp32 on CPU
    return (total_params * per_param, " and ".join(why)) if why else (0, "")


def memory_floor_gib(spec, host_model_bytes: int) -> int | None:
    """The spec.resources.memory (GiB) a pod that reads ``host_model_bytes`` whole needs, or None
    when the spec's memory already holds it (or nothing reads the model whole)."""
    if not host_model_bytes or quantity_to_float(spec.resources.memory) >= host_model_bytes * HOST_MARGIN:
        return None
    return math.ceil(host_model_bytes * HOST_MARGIN / 2**30 + 8)  # + torch, the CUDA context, the data


def advice_memory_floor_gib(spec, advice) -> int | None:
    """The same for a fit-advice option (an FSDP option makes rank 0 read the whole model)."""
    return memory_floor_gib(spec, whole_model_in_host(spec, advice.plan, advice.estimate.total_params)[0])
