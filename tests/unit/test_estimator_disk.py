"""The work dir's local disk (the trainer pod's ephemeral-storage request)."""
from __future__ import annotations

from kubetune.estimator import catalog_architecture
from kubetune.estimator.disk import HEADROOM, work_dir_bytes
from kubetune.estimator.memory import GIB
from kubetune.plan import plan_from_spec

from builders import spec, spec_dict

SPEC = spec_dict(model={"uri": "hf://meta-llama/Llama-3.1-70B"}, training={"microBatchSize": 1},
                 checkpoints={"uri": "s3://ckpt/runs"}, resources={"gpusPerNode": 8})


def need(arch, **over):
    s = spec(SPEC, **over)
    plan = plan_from_spec(s, micro_batch_size=1, num_processes=s.resources.total_gpus)
    from kubetune.estimator import estimate

    e = estimate(arch, plan)
    return work_dir_bytes(s, plan, e.total_params, e.trainable_params), e


def test_a_downloaded_model_is_the_bulk_of_it_and_a_model_read_in_place_is_not_counted():
    l70 = catalog_architecture("llama-3.1-70b")
    hf, e = need(l70)
    assert hf % GIB == 0
    model = e.total_params * 2
    # 141 GB of bf16 weights; five LoRA checkpoints (fp32, AdamW) are 12
    assert model < hf - HEADROOM < model + 14 * GIB
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


def test_an_fp32_checkpoint_downloads_twice_what_a_bf16_one_does():
    from kubetune.estimator import estimate
    from kubetune.estimator.arch import from_config

    cfg = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256}
    bf16, fp32 = from_config({**cfg, "torch_dtype": "bfloat16"}), from_config({**cfg, "torch_dtype": "float32"})
    assert (bf16.disk_weight_bytes, fp32.disk_weight_bytes) == (2, 4)
    assert from_config({**cfg, "dtype": "float32"}).disk_weight_bytes == 4  # transformers 5 writes "dtype"
    assert from_config(cfg).disk_weight_bytes == 2  # unknown: priced as bf16
    assert from_config({**cfg, "torch_dtype": "float32", "quantization_config": {"bits": 4}}).disk_weight_bytes == 2
    s = spec(SPEC)
    plan = plan_from_spec(s, micro_batch_size=1, num_processes=8)
    e = estimate(fp32, plan)
    small = work_dir_bytes(s, plan, e.total_params, e.trainable_params, bf16.disk_weight_bytes)
    big = work_dir_bytes(s, plan, e.total_params, e.trainable_params, fp32.disk_weight_bytes)
    assert abs((big - small) - 2 * e.total_params) <= GIB, ((big - small) / GIB, e.total_params)  # 8B: 16 GB more
