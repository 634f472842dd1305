"""Local disk a trainer pod's work dir needs: its ephemeral-storage request. Pure.

Without a request the scheduler may bind a 70B job to a node whose disk cannot hold the 141 GB
download; the kubelet then evicts it under DiskPressure, the Job retries the eviction without
counting it (a disruption, not the trainer's fault), and the next pod downloads again: a loop. A
request makes the scheduler pick a node with room. No limit: the kubelet would evict a pod over it.
"""

from __future__ import annotations

from kubetune.api.registry import method as method_info
from kubetune.estimator.memory import BYTES, GIB

OUTPUT_WEIGHT_BYTES = 2  # the trainer saves the tuned model in bf16
HEADROOM = 2 * GIB  # data files, the tokenizer, HF and Triton caches, logs


def local_checkpoints(spec) -> int:
    return spec.checkpoints.keep + 2


def work_dir_bytes(spec, plan, total_params: int, trainable_params: int, disk_weight_bytes: int = 2) -> int:
    """Rank 0's pod (every pod gets the same template): the downloaded model (s3:// or hf://, in
    its files' dtype, ``Architecture.disk_weight_bytes``; a pvc:// or local model is read in
    place), checkpoints written before upload (trainable weights plus AdamW's two moments,
    gathered to rank 0 under FSDP), the final output, rounded up to GiB.

    Checkpoints: normally two (one uploading while the next is written); while S3 is down the
    uploader holds what retention keeps, the newest ``keep`` and the best by eval loss, plus the
    one being written. The request covers the outage, or a long one would end in eviction."""
    model = total_params * disk_weight_bytes if spec.model.uri.split("://")[0] in ("s3", "hf") else 0
    checkpoint = trainable_params * 3 * BYTES[plan.trainable_dtype]
    if not method_info(plan.method).adapter:  # the whole tuned model is the output
        output = total_params * OUTPUT_WEIGHT_BYTES
    else:
        output = trainable_params * 4 + (total_params * OUTPUT_WEIGHT_BYTES if spec.output.merge_adapter else 0)
    need = model + local_checkpoints(spec) * checkpoint + output + HEADROOM
    return -(-need // GIB) * GIB
