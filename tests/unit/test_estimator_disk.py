"""The work dir's local disk (the trainer pod's ephemeral-storage request)."""
from __future__ import annotations

import copy

from kubetune.api.validation import parse_spec
from kubetune.estimator import catalog_architecture
from kubetune.estimator.disk import HEADROOM, work_dir_bytes
from kubetune.estimator.memory import GIB
from kubetune.plan import plan_from_spec

SPEC = {
    "model": {"uri": "hf://meta-llama/Llama-3.1-70B"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "method": {"type": "lora"},
    "training": {"maxSteps": 10, "microBatchSize": 1},
    "checkpoints": {"uri": "s3://ckpt/runs"},
    "resources": {"gpusPerNode": 8},
}


def need(arch, **over):
    d = copy.deepcopy(SPEC)
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) and k != "method" else v
    s = parse_spec(d)
    plan = plan_from_spec(s, micro_batch_size=1, num_processes=s.resources.total_gpus)
    from kubetune.estimator import estimate

    e = estimate(arch, plan)
    return work_dir_bytes(s, plan, e.total_params, e.trainable_params), e


def test_a_downloaded_model_is_the_bulk_of_it_and_a_model_read_in_place_is_not_counted():
    l70 = catalog_architecture("llama-3.1-70b")
    hf, e = need(l70)
    assert hf % GIB == 0
    model = e.total_params * 2
    assert model < hf - HEADROOM < model + 14 * GIB  # 141 GB of bf16 weights; five LoRA checkpoints (fp32, AdamW) are 12
    assert 139 * GIB < hf < 147 * GIB
    pvc, _ = need(l70, model={"uri": "pvc://models/llama-3.1-70b"})
    assert pvc <= hf - model + GIB  # read in place: no download
    merged, _ = need(l70, output={"mergeAdapter": True})
    assert merged - hf >= model - GIB  # the merged model is written before its upload


def test_full_fine_tuning_counts_an_outages_checkpoints_of_weights_and_adamw_moments_and_the_output():
    l8 = catalog_architecture("llama-3.1-8b")
    full, e = need(l8, model={"uri": "s3://models/llama-3.1-8b"}, method={"type": "full"})
    p = e.total_params
    # download + (keep 3 + the best + the one being written) checkpoints of bf16 weights and
    # moments + the bf16 output
    per_param = 2 + 5 * 3 * 2 + 2
    assert abs(full - HEADROOM - p * per_param) < GIB, (full / GIB, p * per_param / GIB)
    keep1, _ = need(l8, model={"uri": "s3://models/llama-3.1-8b"}, method={"type": "full"}, checkpoints={"keep": 1})
    assert abs((full - keep1) - 2 * p * 3 * 2) < GIB  # fewer kept, less disk
