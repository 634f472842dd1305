"""The estimator prices the end-of-run evaluation (kubetune_trainer.evaluation) as a peak candidate of its own:
after the last step, weights and optimizer states alive and no gradients, one test sequence's logits turned to fp32
(token accuracy) or the answers' KV cache. A plan without an evaluation is priced as it was."""
from __future__ import annotations

import json

import pytest

from kubetune.estimator import catalog_architecture, estimate, plan_from_flags
from kubetune.estimator import memory as M
from kubetune.plan import plan_from_spec

from builders import job_yaml, run_estimate, spec

V, L, KV_HEADS, HEAD_DIM = 128256, 32, 8, 128  # Llama-3.1-8B


@pytest.fixture(scope="module")
def llama():
    return catalog_architecture("llama-3.1-8b")


def lora(**kw):
    base = dict(method="lora", micro_batch_size=1, seq_len=2048, gradient_checkpointing=True,
                fused_cross_entropy=True)
    return plan_from_flags(**{**base, **kw})


# ---- the plan -------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes,fields", [
    ({}, (False, 0)),
    ({"dataset": {"testSplit": 0.1}}, (True, 128)),  # the test examples' prompts are answered too
    ({"dataset": {"testUri": "s3://data/test.jsonl"}, "evaluation": {"maxNewTokens": 32}}, (True, 32)),
    ({"evaluation": {"prompts": [{"prompt": "hi"}], "maxNewTokens": 64}}, (False, 64)),
    ({"evaluation": {"promptsUri": "s3://data/prompts.jsonl"}}, (False, 128)),
])
def test_the_plan_says_what_the_evaluation_runs(changes, fields):
    p = plan_from_spec(spec(**changes))
    assert (p.evaluation_test_data, p.evaluation_new_tokens) == fields


# ---- without an evaluation: as before -------------------------------------------------------------


@pytest.mark.parametrize("kw,figures", [
    # (total, allocated, reserved, phase) of the estimator without the evaluation's terms (re-pinned when the
    # adapters' gradients left the forward, their autocast copies came in and the backward transient was refitted, #20)
    (dict(method="lora", micro_batch_size=4, seq_len=2048, gradient_checkpointing=True, fused_cross_entropy=True),
     (23124372684, 21132812288, 22319066316, "backward")),
    (dict(method="qlora", micro_batch_size=1, seq_len=4096, gradient_checkpointing=True),
     (22122774528, 17943904256, 21317468160, "loss")),
    (dict(method="full", micro_batch_size=2, seq_len=1024, gradient_checkpointing=True, fused_cross_entropy=True,
          gpus=4), (22935309516, 20214792192, 22130003148, "backward")),
])
def test_a_plan_without_an_evaluation_is_priced_as_it_was(llama, kw, figures):
    e = estimate(llama, plan_from_flags(**kw))
    assert (e.total_bytes, e.allocated_bytes, e.reserved_bytes, e.phase) == figures


# ---- the terms ------------------------------------------------------------------------------------


def test_the_test_sequences_logits_can_set_the_peak(llama):
    """Micro batch 1 with the fused head: training never holds the logits; the evaluation holds 12 B per logit of
    one maxSeqLength sequence (fp32 logits, the response rows' copy, their log-softmax)."""
    train = estimate(llama, lora())
    ev = estimate(llama, lora(evaluation_test_data=True))
    logits = M.EVAL_LOGIT_BYTES * V * 2048
    assert ev.phase == "evaluation" and train.phase != "evaluation"
    assert ev.breakdown["logits"] == logits == 12 * V * 2048
    # no gradients; autocast's cached bf16 casts of the fp32 LoRA weights live through the whole evaluation
    assert ev.breakdown["gradients"] == 0 and ev.breakdown["activations"] == 2 * ev.trainable_params
    # the same static memory, overhead and communication: the rise is the logits less the step's transients
    step = sum(train.breakdown[k] for k in ("gradients", "activations", "logits"))
    assert ev.total_bytes - train.total_bytes == logits + 2 * ev.trainable_params - step > 0
    for k in ("weights", "optimizer", "adapters", "overhead", "communication"):
        assert ev.breakdown[k] == train.breakdown[k], k


def test_a_larger_training_step_keeps_its_peak(llama):
    big = lora(micro_batch_size=16, fused_cross_entropy=False)
    e, ev = estimate(llama, big), estimate(llama, big.with_(evaluation_test_data=True, evaluation_new_tokens=128))
    assert ev.phase != "evaluation"
    assert (ev.total_bytes, ev.breakdown) == (e.total_bytes, e.breakdown)


def test_the_answers_kv_cache_is_every_layers_keys_and_values_at_prompt_plus_answer(llama):
    """Written prompts only (no test data): the cache of maxSeqLength + maxNewTokens tokens in the compute dtype
    (generate keeps the last position's logits only)."""
    t, n = 512, 8192
    p = lora(seq_len=t, evaluation_new_tokens=n)
    ev = M._prepare(llama, p, True).evaluation
    assert ev is not None and ev.kv_cache == 2 * L * KV_HEADS * HEAD_DIM * 2
    e = estimate(llama, p)
    assert e.phase == "evaluation"
    kv = 2 * L * KV_HEADS * HEAD_DIM * (t + n) * 2
    assert e.breakdown["activations"] == kv + 2 * e.trainable_params and e.breakdown["logits"] == 0
    # a short answer: the prefill (the prompt's cache and one block's tensors) is the larger part
    short = M.evaluation_moment(llama, p, ev._replace(new_tokens=1), 0)
    assert short.activations == ev.kv_cache * t + ev.layer * t


def test_autocast_caches_a_copy_of_the_fp32_trainable_weights_for_the_whole_evaluation(llama):
    """A mixed-precision full fine-tune (fp32 weights, bf16 compute): autocast's cache of the trained linears'
    bf16 casts is alive while the evaluation runs; bf16 weights need no cast."""
    mixed = plan_from_flags(method="full", micro_batch_size=1, seq_len=2048, gradient_checkpointing=True,
                            fused_cross_entropy=True, precision="fp32-mixed", evaluation_test_data=True)
    ev = M._prepare(llama, mixed, True).evaluation
    assert ev is not None and ev.copies == 2 * (llama.linear_params + llama.lm_head_params)
    bf16 = M._prepare(llama, mixed.with_(weight_dtype="bf16", trainable_dtype="bf16"), True).evaluation
    assert bf16 is not None and bf16.copies == 0


def test_fsdp_skips_the_answers(llama):
    """The trainer answers no prompts under FSDP (generate would gather every weight): only the test data's
    forward is priced there."""
    p = lora(gpus=4, sharding="fsdp")
    assert p.sharding == "fsdp"
    assert estimate(llama, p.with_(evaluation_new_tokens=8192)).breakdown == estimate(llama, p).breakdown
    assert estimate(llama, p.with_(evaluation_test_data=True)).phase == "evaluation"


# ---- the flag form and -f agree -------------------------------------------------------------------


def test_flag_form_and_job_file_give_the_same_bytes_for_a_job_with_test_data(capsys, tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text(job_yaml("ev", dataset={"testSplit": 0.1}, training={"maxSteps": 10, "microBatchSize": 1}))
    rc, out, _ = run_estimate(capsys, "-f", str(f), "--json")
    assert rc == 0
    by_file = json.loads(out)
    rc, out, _ = run_estimate(capsys, "--model", "llama-3.1-8b", "--method", "lora", "--batch-size", "1",
                              "--seq-len", "2048", "--gradient-checkpointing", "--fused-cross-entropy",
                              "--fused-kernels", "--test-data", "--json")
    assert rc == 0
    by_flags = json.loads(out)
    for k in ("total_bytes", "allocated_bytes", "reserved_bytes", "breakdown_bytes", "peak_phase"):
        assert by_file[k] == by_flags[k], k
    assert by_file["peak_phase"] == "evaluation"
    assert "evaluation: test data, answers of 128 tokens" in by_file["plan"] == by_flags["plan"]


def test_evaluation_flags_are_refused_with_a_job_file(capsys, tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text(job_yaml("ev"))
    for flag in (["--test-data"], ["--max-new-tokens", "64"]):
        rc, _, err = run_estimate(capsys, "-f", str(f), *flag)
        assert rc == 2 and f"{flag[0]}: not used with -f (the job file sets it)" in err
