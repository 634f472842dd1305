"""The estimator prices each objective (docs/estimator.md "Objectives"): chosen and rejected in one forward (2x
the sequences), the no-grad reference forward before the policy's (implicit, copy), a frozen copy of the weights
(copy), nothing of the reference in the step when it is precomputed. The flag form and -f agree, and `auto`
picks about half the micro batch of SFT."""
from __future__ import annotations

import json

import pytest
import yaml

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.estimator import catalog_architecture, estimate, from_config, max_micro_batch, plan_from_flags
from kubetune.estimator import memory as M
from kubetune.estimator import steptrace as ST
from kubetune.estimator.advice import GPU_SIZE_BYTES, fit_advice
from kubetune.estimator.allocator import simulate
from kubetune.plan import plan_from_spec

from builders import job_yaml, run_estimate

GIB = 1 << 30
SMALL = dict(model_type="llama", hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
             intermediate_size=2816, vocab_size=32000)


def dpo(p, reference="implicit"):
    return p.with_(objective="dpo", sequences_per_example=2, reference=reference)


def _job(objective, method, mbs, fmt, extra):
    """A FineTuneJob on Llama-3.1-8B (one GPU) in YAML."""
    return job_yaml("pref", dataset={"uri": "s3://data/pairs.jsonl", "format": fmt}, method={"type": method},
                    training={"maxSteps": 100, "microBatchSize": mbs if mbs == "auto" else int(mbs), **extra},
                    objective=objective or None)


run = run_estimate


# ---- the terms ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,gc,fused", [("lora", True, True), ("lora", False, False), ("full", True, True),
                                             ("qlora", True, False)])
def test_a_paired_objective_without_a_reference_model_is_sft_at_twice_the_sequences(method, gc, fused):
    a = catalog_architecture("llama-3.1-8b")
    sft = plan_from_flags(method=method, micro_batch_size=4, seq_len=1024, gradient_checkpointing=gc,
                          fused_cross_entropy=fused)
    for objective in ("orpo", "simpo"):
        paired = sft.with_(micro_batch_size=2, objective=objective, sequences_per_example=2)
        e, s = estimate(a, paired), estimate(a, sft)
        assert (e.allocated_bytes, e.reserved_bytes, e.breakdown) == (s.allocated_bytes, s.reserved_bytes, s.breakdown)
        assert e.micro_batch_size == 2 and any("2 sequences (chosen and rejected)" in n for n in e.notes)
    # precomputed reference log-probs put nothing of the reference into the step either
    pre = dpo(sft.with_(micro_batch_size=2), "precomputed")
    assert estimate(a, pre).reserved_bytes == estimate(a, sft).reserved_bytes


def test_kto_is_one_sequence_per_example():
    a = from_config(SMALL)
    sft = plan_from_flags(method="lora", micro_batch_size=4, seq_len=1024, gradient_checkpointing=True)
    kto = sft.with_(objective="kto", sequences_per_example=1, reference="precomputed")
    assert estimate(a, kto).allocated_bytes == estimate(a, sft).allocated_bytes


def test_a_reference_copy_holds_a_second_frozen_copy_of_the_weights_sharded_like_the_policy():
    a = catalog_architecture("llama-3.1-8b")
    p = plan_from_flags(method="full", micro_batch_size=1, seq_len=2048, gradient_checkpointing=True,
                        fused_cross_entropy=True)
    pre, copy = estimate(a, dpo(p, "precomputed")), estimate(a, dpo(p, "copy"))
    w = a.total_params * 2  # bf16
    assert pre.breakdown["weights"] == w and copy.breakdown["weights"] == 2 * w
    # no gradients and no optimizer states for it
    states = ("gradients", "optimizer")
    assert [copy.breakdown[k] for k in states] == [pre.breakdown[k] for k in states]
    assert copy.allocated_bytes - pre.allocated_bytes == w
    assert any("reference copy: a frozen second copy of the model weights (15.0 GiB per GPU)" in n for n in copy.notes)
    fsdp = dpo(p.with_(num_processes=4, sharding="fsdp"), "copy")
    assert estimate(a, fsdp).breakdown["weights"] == 2 * (w // 4)
    # QLoRA: the copy is the quantized base, as the policy's is
    q = plan_from_flags(method="qlora", micro_batch_size=1, seq_len=2048, gradient_checkpointing=True)
    qe, qc = estimate(a, dpo(q, "precomputed")), estimate(a, dpo(q, "copy"))
    assert qc.breakdown["weights"] == 2 * qe.breakdown["weights"]


def test_the_reference_forward_is_freed_before_the_policy_forward():
    """implicit: no extra tensors at the policy's peak (the reserved figure replays the reference forward too)."""
    a = catalog_architecture("llama-3.1-8b")
    for p in (plan_from_flags(method="lora", micro_batch_size=2, seq_len=2048, gradient_checkpointing=True,
                              fused_cross_entropy=True),
              plan_from_flags(method="lora", micro_batch_size=1, seq_len=2048)):
        pre, imp = estimate(a, dpo(p, "precomputed")), estimate(a, dpo(p, "implicit"))
        assert imp.allocated_bytes == pre.allocated_bytes and imp.phase != "reference forward"


def test_the_reference_forward_moment_holds_one_block_and_the_log_probs(monkeypatch):
    """Priced as a moment of its own: when it is the largest (here made so by a far costlier log-softmax), the
    estimate is a block's input and output, one frozen block's activations and the log-probs of every logit
    (unfused) or of one chunk (fused)."""
    monkeypatch.setattr(M, "REF_LOGIT_FP32_BYTES", 400)
    for fused in (False, True):
        a = from_config(SMALL)  # a new architecture: its estimate cache is empty
        p = dpo(plan_from_flags(method="lora", micro_batch_size=2, seq_len=512, gradient_checkpointing=True,
                                fused_cross_entropy=fused))
        e = estimate(a, p)
        tok = 2 * 2 * 512
        chunk = min(tok, 1 << max(0, (-(-tok // -(-32000 // 1024)) - 1).bit_length()))
        assert e.phase == "reference forward"
        assert e.breakdown["logits"] == (2 + 400) * 32000 * (chunk if fused else tok)
        prep = M._prepare(a, p, True)
        assert e.breakdown["activations"] == (2 * prep.resid + prep.ref_block) * tok
        assert prep.resid == 2 * 1024 and 0 < prep.ref_block < prep.act_block  # frozen: fewer saved tensors


@pytest.mark.parametrize("kw", [dict(method="lora", gradient_checkpointing=True, fused_cross_entropy=True),
                                dict(method="lora"), dict(method="qlora", gradient_checkpointing=True),
                                dict(method="full", gradient_checkpointing=True)])
@pytest.mark.parametrize("reference", ["implicit", "copy"])
def test_the_generated_trace_has_the_reference_and_its_peak_is_the_physics(kw, reference):
    if reference == "implicit" and kw["method"] == "full":
        return  # implicit needs adapters (the API refuses it)
    a = from_config(SMALL)
    p = dpo(plan_from_flags(micro_batch_size=2, seq_len=512, **kw), reference)
    tokens = 2 * 2 * 512
    ev = ST.build_trace(a, p, autocast=True, tokens=tokens)
    alloc = {e[1] for e in ev if e[0] == "a"}
    freed = [e[1] for e in ev if e[0] == "f"]
    assert len(freed) == len(set(freed)) and set(freed) <= alloc
    pre = ST.build_trace(a, p.with_(reference="precomputed"), autocast=True, tokens=tokens)
    assert len(ev) > len(pre)  # the reference forward's allocations are in the sequence
    r = simulate(ev)
    # the estimate's allocated figure adds MISC (workspaces and small tensors the trace leaves out)
    assert r.peak_allocated == pytest.approx(estimate(a, p).allocated_bytes - M.MISC, rel=0.08)


def test_the_trace_counts_the_reference_copy_once_loaded():
    a = from_config(SMALL)
    p = dpo(plan_from_flags(method="full", micro_batch_size=1, seq_len=256), "copy")
    copy = simulate(ST.build_trace(a, p, autocast=True, tokens=512)).peak_allocated
    pre = simulate(ST.build_trace(a, p.with_(reference="precomputed"), autocast=True, tokens=512)).peak_allocated
    assert copy - pre == pytest.approx(a.total_params * 2, rel=0.01)


# ---- auto micro batch and placement ---------------------------------------------------------------


@pytest.mark.parametrize("method,objective", [("lora", {"type": "dpo"}),  # implicit reference
                                              ("full", {"type": "dpo", "reference": "precomputed"}),
                                              ("lora", {"type": "simpo"})])
def test_auto_micro_batch_for_dpo_is_about_half_of_sfts(method, objective):
    a = catalog_architecture("llama-3.1-8b")
    extra = {"effectiveBatchSize": 1024}  # so the cap (effective batch per GPU) is not what stops auto
    sft = FineTuneJob.model_validate(yaml.safe_load(_job(None, method, "auto", "alpaca", extra))).spec
    pref = FineTuneJob.model_validate(yaml.safe_load(_job(objective, method, "auto", "preference", extra))).spec
    gpu = 143771 * 2**20  # H200: room for a batch of them
    # what the operator's placement calls: max_micro_batch over plan_from_spec
    b_sft = max_micro_batch(a, plan_from_spec(sft, micro_batch_size=1), gpu)
    b_dpo = max_micro_batch(a, plan_from_spec(pref, micro_batch_size=1), gpu)
    # half, within the allocator's fragmentation (simulated per power-of-two batch)
    assert b_sft >= 16 and 0.9 * b_sft / 2 - 1 <= b_dpo <= b_sft / 2, (b_sft, b_dpo)
    if method == "full":  # a reference copy's weights leave less room still
        doc = yaml.safe_load(_job({"type": "dpo"}, method, "auto", "preference", extra))
        copy = FineTuneJob.model_validate(doc).spec
        assert max_micro_batch(a, plan_from_spec(copy, micro_batch_size=1), gpu) < b_dpo


def test_fit_advice_offers_a_precomputed_reference_for_a_copy():
    a = catalog_architecture("llama-3.1-8b")
    p = dpo(plan_from_flags(method="full", micro_batch_size=1, seq_len=1024, gradient_checkpointing=True,
                            fused_cross_entropy=True), "copy")
    sizes = [81559 * 2**20]  # 80GB
    assert not estimate(a, p).fits(sizes[0])
    advice = fit_advice(a, p, sizes)
    pre = [x for x in advice if x.plan.reference == "precomputed"]
    assert pre and pre[0].description == "objective.reference precomputed instead of copy"
    assert pre[0].to_dict()["reference"] == "precomputed"
    assert all(x.plan.reference in ("copy", "precomputed") for x in fit_advice(a, p, list(GPU_SIZE_BYTES)))


# ---- the flag form and -f agree -------------------------------------------------------------------


@pytest.mark.parametrize("method,objective,flags", [
    ("lora", {"type": "dpo"}, []),
    ("lora", {"type": "dpo", "reference": "precomputed"}, ["--reference", "precomputed"]),
    ("full", {"type": "dpo"}, []),  # copy by default for full fine-tuning
    ("lora", {"type": "simpo"}, []),
])
def test_flag_form_and_job_file_give_the_same_bytes_for_a_preference_job(capsys, tmp_path, method, objective, flags):
    f = tmp_path / "job.yaml"
    f.write_text(_job(objective, method, "2", "preference", {}))
    rc, out, _ = run(capsys, "-f", str(f), "--json")
    assert rc == 0
    by_file = json.loads(out)
    # kubetune's trainer defaults, spelled as flags: bf16, checkpointing, fused cross-entropy and kernels on
    rc, out, _ = run(capsys, "--model", "llama-3.1-8b", "--method", method, "--batch-size", "2", "--seq-len", "2048",
                     "--gradient-checkpointing", "--fused-cross-entropy", "--fused-kernels",
                     "--objective", objective["type"], *flags, "--json")
    assert rc == 0
    by_flags = json.loads(out)
    for k in ("total_bytes", "allocated_bytes", "reserved_bytes", "breakdown_bytes"):
        assert by_file[k] == by_flags[k], k
    assert f"| {objective['type']}" in by_file["plan"] and "micro batch 2 examples (4 sequences)" in by_flags["plan"]
    sft = json.loads((run(capsys, "--model", "llama-3.1-8b", "--method", method, "--batch-size", "2", "--seq-len",
                          "2048", "--gradient-checkpointing", "--fused-cross-entropy", "--fused-kernels", "--json"))[1])
    assert by_flags["total_bytes"] > sft["total_bytes"]


@pytest.mark.parametrize("argv,msg", [
    (["--objective", "ppo"], "--objective: must be one of sft, dpo, orpo, kto, simpo (got 'ppo')"),
    (["--objective", "orpo", "--reference", "copy"],
     "--reference: only valid with --objective dpo or kto (sft, orpo and simpo use no reference model)"),
    (["--reference", "copy"], "--reference: only valid with --objective dpo or kto"),
    (["--objective", "dpo", "--reference", "base"],
     "--reference: must be one of implicit, copy, precomputed (got 'base')"),
    (["--method", "full", "--objective", "dpo", "--reference", "implicit"],
     "--reference implicit: needs an adapter --method (lora, qlora, prompt-tuning or prefix-tuning): it disables the "
     "adapters to get the base model; use copy or precomputed"),
    (["--objective", "kto", "--packing"],
     "--packing: only valid with --objective sft (preference objectives score each whole sequence on its own)"),
])
def test_objective_flag_errors_name_the_flag(capsys, argv, msg):
    rc, out, err = run(capsys, "--model", "llama-3.1-8b", *argv)
    assert rc == 2 and not out and err.count("\n") == 1
    assert msg in err, err


def test_objective_flags_are_refused_with_a_job_file(capsys, tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text(_job({"type": "dpo"}, "lora", "2", "preference", {}))
    rc, _, err = run(capsys, "-f", str(f), "--objective", "dpo")
    assert rc == 2 and "--objective: not used with -f (the job file sets it)" in err


def test_plan_from_flags_takes_the_apis_defaults_and_rules():
    assert plan_from_flags(method="lora", micro_batch_size=1, seq_len=8, objective="dpo").reference == "implicit"
    assert plan_from_flags(method="freeze", micro_batch_size=1, seq_len=8, objective="kto").reference == "copy"
    assert plan_from_flags(method="full", micro_batch_size=1, seq_len=8, objective="orpo").reference == "none"
    p = plan_from_flags(method="full", micro_batch_size=1, seq_len=8, objective="simpo")
    assert (p.objective, p.sequences_per_example) == ("simpo", 2)
    with pytest.raises(ValueError, match="objective must be one of sft, dpo, orpo, kto, simpo"):
        plan_from_flags(method="lora", micro_batch_size=1, seq_len=8, objective="ppo")
    with pytest.raises(ValueError, match="reference implicit needs an adapter method"):
        plan_from_flags(method="full", micro_batch_size=1, seq_len=8, objective="dpo", reference="implicit")
