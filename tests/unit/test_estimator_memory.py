"""The memory model: structure, monotonicity, sharding, and the trainer contract (kubetune.plan)."""
from __future__ import annotations

import dataclasses

import pytest

import kubetune.plan as plan_mod
from kubetune.api.v1alpha1 import EstimateStatus, MemoryBreakdown
from kubetune.estimator import BREAKDOWN_KEYS, catalog_architecture, estimate, estimate_spec, plan_from_flags
from kubetune.estimator import memory as M
from kubetune.estimator.memory import GIB, format_gib

from builders import spec  # Llama-3.1-8B, LoRA, micro batch 4 x 2048

L8 = catalog_architecture("llama-3.1-8b")
L1 = catalog_architecture("llama-3.2-1b")


def lora(**kw):
    base = dict(method="lora", micro_batch_size=4, seq_len=2048, gradient_checkpointing=True)
    base.update(kw)
    return plan_from_flags(**base)


def test_breakdown_keys_sum_and_status():
    e = estimate(L8, lora())
    assert tuple(e.breakdown) == BREAKDOWN_KEYS == tuple(MemoryBreakdown.model_fields)
    assert sum(e.breakdown.values()) == e.total_bytes
    st = e.to_status()
    assert isinstance(st, EstimateStatus)
    assert st.per_gpu_bytes == e.total_bytes and st.per_gpu == format_gib(e.total_bytes)
    assert st.breakdown.weights == e.breakdown["weights"] and st.trainable_params == 41_943_040
    assert st.micro_batch_size == 4 and st.seq_length == 2048


def test_format_gib_rounds_up():
    assert format_gib(int(17.31 * GIB)) == "17.4Gi"
    assert format_gib(17 * GIB) == "17.0Gi"


def test_model_states_by_method_and_dtype():
    P = L8.total_params
    full = estimate(L8, plan_from_flags(method="full", micro_batch_size=1, seq_len=512, gradient_checkpointing=True))
    assert full.breakdown["weights"] == 2 * P and full.breakdown["optimizer"] == 4 * P  # bf16 AdamW states
    mixed = estimate(L8, plan_from_flags(method="full", micro_batch_size=1, seq_len=512, precision="fp32-mixed"))
    assert mixed.breakdown["weights"] == 4 * P and mixed.breakdown["optimizer"] == 8 * P
    a8 = estimate(L8, plan_from_flags(method="full", micro_batch_size=1, seq_len=512, optimizer="adamw-8bit"))
    # 8-bit states but for the embedding, which the HF Trainer keeps in 32-bit states (8 B/param)
    assert a8.breakdown["optimizer"] == int(M.BNB_8BIT_STATE * P + L8.embed_params * (8 - M.BNB_8BIT_STATE))
    lo = estimate(L8, lora())
    assert lo.breakdown["adapters"] == 4 * 41_943_040 and lo.breakdown["optimizer"] == 8 * 41_943_040
    q = estimate(L8, lora(method="qlora"))
    # nf4 + double quant on the linears (0.516 B/param), fp32 embeddings/head/norms (prepare_model_for_kbit_training)
    lin = L8.linear_params
    assert q.breakdown["weights"] == pytest.approx(lin * 0.5159 + (P - lin) * 4, rel=1e-3)
    assert q.total_bytes < lo.total_bytes


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "freeze", "prompt-tuning", "prefix-tuning"])
def test_monotone_in_batch_and_sequence(method):
    p = plan_from_flags(method=method, micro_batch_size=1, seq_len=1024, gradient_checkpointing=True)
    last = 0
    for b in (1, 2, 4, 8):
        t = estimate(L1, p.with_(micro_batch_size=b)).total_bytes
        assert t > last
        last = t
    last = 0
    for s in (256, 1024, 4096):
        t = estimate(L1, p.with_(seq_len=s)).total_bytes
        assert t > last
        last = t


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "freeze", "prompt-tuning"])
def test_checkpointing_and_fused_ce_reduce(method):
    p = plan_from_flags(method=method, micro_batch_size=4, seq_len=2048)
    e = estimate(L1, p).total_bytes
    assert estimate(L1, p.with_(gradient_checkpointing=True)).total_bytes < e
    assert estimate(L1, p.with_(fused_cross_entropy=True)).total_bytes < e


def test_unfused_logits_term():
    e = estimate(L8, lora())
    assert e.phase == "loss" and e.breakdown["logits"] == 12 * 4 * 2048 * 128256
    assert estimate(L8, lora(fused_cross_entropy=True)).breakdown["logits"] == 0


def test_lora_dropout_and_rank_cost_memory():
    assert estimate(L8, lora(gradient_checkpointing=False, lora_dropout=0.1)).total_bytes > \
        estimate(L8, lora(gradient_checkpointing=False)).total_bytes
    assert estimate(L8, lora(lora_rank=64)).total_bytes > estimate(L8, lora(lora_rank=8)).total_bytes


def test_sharding_reduces_per_gpu_states():
    p = plan_from_flags(method="full", micro_batch_size=1, seq_len=2048, gradient_checkpointing=True,
                        fused_cross_entropy=True)
    one = estimate(L8, p).total_bytes
    per = [estimate(L8, p.with_(num_processes=n, sharding="fsdp")).total_bytes for n in (2, 4, 8)]
    assert one > per[0] > per[1] > per[2]
    z3 = estimate(L8, p.with_(num_processes=8, sharding="zero3")).total_bytes
    z2 = estimate(L8, p.with_(num_processes=8, sharding="zero2")).total_bytes
    ddp = estimate(L8, p.with_(num_processes=8, sharding="ddp"))
    assert z3 < z2 < ddp.total_bytes
    assert ddp.total_bytes > one and ddp.breakdown["communication"] >= 2 * L8.total_params  # gradient buckets


def test_fsdp_gathers_frozen_blocks_without_a_gradient_under_lora():
    """The trainer wraps LoRA adapters as FSDP units of their own (fsdp_wrap_policy, tested under real
    FSDP in tests/trainer/test_distributed.py), so a gathered frozen block has no unsharded gradient;
    under full fine-tuning it has one the size of the block, in the trainable dtype."""
    from kubetune.estimator.memory import BYTES, _prepare

    p = plan_from_flags(method="lora", micro_batch_size=1, seq_len=2048, gradient_checkpointing=True)
    q = plan_from_flags(method="full", micro_batch_size=1, seq_len=2048, gradient_checkpointing=True)
    lora8, full8 = (_prepare(L8, x.with_(num_processes=8, sharding="fsdp"), True) for x in (p, q))
    block = L8.largest_block_params
    # both gather the root (embeddings, head) and two blocks in the compute dtype
    assert lora8.comm_transient == L8.head_params * 2 + 2 * block * 2
    assert full8.comm_transient == L8.head_params * 2 + 2 * block * 2 + block * BYTES[q.trainable_dtype]
    assert q.trainable_dtype == "bf16" and p.adapter_dtype == "fp32"


def test_qlora_under_fsdp_peaks_while_every_gpu_holds_the_whole_4bit_model():
    """bitsandbytes quantizes while loading onto each rank's GPU (kubetune_trainer.model.loading_place),
    so more GPUs shrink QLoRA's training footprint but not the load: the estimate is the larger. LoRA
    loads in host memory on rank 0 and reaches the GPUs a unit at a time: no load peak."""
    L70 = catalog_architecture("llama-3.1-70b")
    q = plan_from_flags(method="qlora", micro_batch_size=1, seq_len=2048, gradient_checkpointing=True,
                        fused_cross_entropy=True, precision="bf16")
    one = estimate(L70, q)
    eight = [estimate(L70, q.with_(num_processes=n, sharding="fsdp")) for n in (2, 8)]
    for e in eight:
        assert e.phase == "model load" and e.breakdown["weights"] == one.breakdown["weights"]  # unsharded
        assert e.breakdown["optimizer"] == e.breakdown["gradients"] == e.breakdown["activations"] == 0
        assert sum(e.breakdown.values()) == e.total_bytes and any("while loading" in n for n in e.notes)
    assert eight[0].total_bytes == eight[1].total_bytes < one.total_bytes  # no optimizer or activations yet
    assert 38 * GIB < eight[1].breakdown["weights"] < 42 * GIB  # 70.6B params: NF4 linears, bf16 embeddings/head
    ddp = estimate(L70, q.with_(num_processes=8, sharding="ddp"))
    assert ddp.phase != "model load"  # every rank keeps its whole model anyway: training is the peak
    lora8 = estimate(L70, plan_from_flags(method="lora", micro_batch_size=1, seq_len=2048, gradient_checkpointing=True,
                                          fused_cross_entropy=True, precision="bf16")
                     .with_(num_processes=8, sharding="fsdp"))
    assert lora8.phase != "model load" and lora8.breakdown["weights"] * 8 >= L70.total_params * 2 * 0.99


def test_prompt_and_prefix_tuning():
    pt = estimate(L1, plan_from_flags(method="prompt-tuning", micro_batch_size=1, seq_len=512, virtual_tokens=20))
    assert pt.trainable_params == 20 * 2048
    pf = estimate(L1, plan_from_flags(method="prefix-tuning", micro_batch_size=1, seq_len=512, virtual_tokens=20))
    assert pf.trainable_params == 20 * 16 * 2 * 512  # peft: token_dim = kv heads x head_dim for GQA models
    more = estimate(L1, plan_from_flags(method="prompt-tuning", micro_batch_size=1, seq_len=512, virtual_tokens=200))
    assert more.total_bytes > pt.total_bytes  # virtual tokens lengthen every sequence


def test_freeze_top_k():
    f2 = estimate(L8, plan_from_flags(method="freeze", micro_batch_size=1, seq_len=1024, trainable_layers=2))
    blk = L8.blocks[0][1].params
    assert f2.trainable_params == 2 * blk
    f8 = estimate(L8, plan_from_flags(method="freeze", micro_batch_size=1, seq_len=1024, trainable_layers=8))
    emb = estimate(L8, plan_from_flags(method="freeze", micro_batch_size=1, seq_len=1024, trainable_layers=2,
                                       train_embeddings=True))
    assert f2.total_bytes < f8.total_bytes and f2.total_bytes < emb.total_bytes


def test_moe_and_other_families_estimate():
    for name in ("mixtral-8x7b", "Qwen/Qwen3-30B-A3B", "Qwen/Qwen1.5-MoE-A2.7B", "gemma-2-9b", "gemma-3-4b", "phi-4",
                 "EleutherAI/pythia-1b", "gpt2", "bert-base-uncased"):
        a = catalog_architecture(name)
        for m in ("full", "lora", "qlora"):
            e = estimate(a, plan_from_flags(method=m, micro_batch_size=2, seq_len=512))
            assert e.total_bytes > e.breakdown["weights"] > 0


def test_fused_kernels_keep_fewer_activations_without_checkpointing():
    """Liger's RMSNorm keeps its input (bf16 here) and an fp32 rstd where transformers' keeps an fp32 copy;
    its SwiGLU keeps gate and up where transformers' keeps the act's input, output and up: per token and
    block 2 x 2h + 2i bytes fewer (8B: h 4096, i 14336; 32 blocks; 4 x 2048 tokens)."""
    p = lora(gradient_checkpointing=False, fused_cross_entropy=True)
    def acts(arch, plan):
        return estimate(arch, plan).breakdown["activations"]

    saved = acts(L8, p) - acts(L8, p.with_(fused_kernels=True))
    assert saved == (2 * 2 * 4096 + 2 * 14336) * 32 * 4 * 2048  # 11.0 GiB
    # checkpointing: the recomputed block's peak is the measured one (the calibration's Liger rows)
    gc = p.with_(gradient_checkpointing=True)
    assert estimate(L8, gc.with_(fused_kernels=True)).total_bytes == estimate(L8, gc).total_bytes
    # a gated MLP with an activation Liger's kernel does not compute keeps transformers' MLP; the norms change
    relu = dataclasses.replace(L8, act_fn="relu", _cache={})
    saved_relu = acts(relu, p) - acts(relu, p.with_(fused_kernels=True))
    assert saved_relu == 2 * 2 * 4096 * 32 * 4 * 2048
    gemma = catalog_architecture("gemma-3-4b")  # gelu_pytorch_tanh: Liger's GeGLU
    assert gemma.act_fn == "gelu_pytorch_tanh"
    gp = p.with_(seq_len=512)
    assert estimate(gemma, gp.with_(fused_kernels=True)).total_bytes < estimate(gemma, gp).total_bytes
    # a model type Liger does not patch keeps transformers' modules
    neox = catalog_architecture("EleutherAI/pythia-1b")
    assert estimate(neox, p.with_(fused_kernels=True)).total_bytes == estimate(neox, p).total_bytes
    assert plan_mod.plan_from_spec(spec(training={"gradientCheckpointing": False}), 1).fused_kernels  # the default
    assert not plan_mod.plan_from_spec(spec(training={"fusedKernels": False}), 1).fused_kernels


def test_gemma2_eager_attention_grows_quadratically():
    g = catalog_architecture("gemma-2-2b")
    p = plan_from_flags(method="lora", micro_batch_size=1, seq_len=2048, fused_cross_entropy=True)
    a1 = estimate(g, p).breakdown["activations"]
    a2 = estimate(g, p.with_(seq_len=4096)).breakdown["activations"]
    assert a2 > 2.2 * a1


# ---- the trainer contract ------------------------------------------------------------------------------


def test_estimate_spec_prices_plan_from_spec(monkeypatch):
    calls = []
    real = plan_mod.plan_from_spec

    def spy(*a, **kw):
        p = real(*a, **kw)
        calls.append(p)
        return p

    monkeypatch.setattr(plan_mod, "plan_from_spec", spy)
    s = spec()
    e = estimate_spec(s)
    assert len(calls) == 1
    assert e.total_bytes == estimate(L8, calls[0]).total_bytes
    assert calls[0].fused_cross_entropy and calls[0].gradient_checkpointing  # kubetune's trainer defaults


def test_trainer_defaults_flow_into_the_estimate(monkeypatch):
    s = spec()
    base = estimate_spec(s)
    # trainer default: adapters in fp32 (peft). Changing it in kubetune.plan changes the estimate.
    monkeypatch.setattr(plan_mod, "ADAPTER_DTYPE", "bf16")
    assert estimate_spec(s).total_bytes < base.total_bytes
    monkeypatch.undo()
    # API defaults the trainer applies: fused CE on, checkpointing on
    unfused = estimate_spec(spec(training={"fusedCrossEntropy": False}))
    assert unfused.total_bytes > base.total_bytes + 10 * GIB
    nogc = estimate_spec(spec(training={"gradientCheckpointing": False}))
    assert nogc.total_bytes > base.total_bytes


def test_estimate_spec_resources_and_auto():
    s = spec(method={"type": "full"}, resources={"gpusPerNode": 8}, training={"microBatchSize": "auto"})
    e = estimate_spec(s)  # 8 GPUs, full -> sharding auto = fsdp; auto micro batch priced at 1
    assert e.plan.sharding == "fsdp" and e.plan.num_processes == 8 and e.micro_batch_size == 1
    assert any("auto" in n for n in e.notes)
    assert estimate_spec(s, micro_batch_size=4, num_processes=1).total_bytes > e.total_bytes


def test_kubetune_trainer_beats_the_plain_hf_stack_on_memory():
    # same job: kubetune's plan (fused CE, GC) vs the HF Trainer + PEFT flag form of it
    assert estimate_spec(spec()).total_bytes < estimate(L8, lora()).total_bytes


def test_a_trained_head_under_ligers_loss_has_its_gradient_from_the_loss_on_and_the_fallbacks_product():
    """Liger's fused loss makes the head's gradient in the forward; with accumulation it sits beside the
    accumulated .grad at the loss. bf16 (Ampere+, as placed) accumulates each chunk in place; fp16 (maybe a T4)
    and fp32 take the fallback: the chunk's [V, h] product in the compute dtype and its fp32 copy. Traced on
    kubetune's step with Liger on CPU, which takes the fallback (tests/trainer/test_alloc_trace_kubetune.py)."""
    vh = L1.vocab_size * L1.hidden_size  # tied: the embedding is the head
    full = plan_from_flags(method="full", micro_batch_size=4, seq_len=2048, fused_cross_entropy=True,
                           gradient_accumulation_steps=4)
    dtypes = {"bf16": ("bf16", "bf16", "bf16"), "bf16-mixed": ("fp32", "fp32", "bf16"),
              "fp16": ("fp32", "fp32", "fp16"), "fp32": ("fp32", "fp32", "fp32")}  # (weights, trainable, compute)
    for precision, grad, transient in (("bf16", 2, 0), ("bf16-mixed", 4, 0), ("fp16", 4, 2 + 4), ("fp32", 4, 4)):
        w, t, c = dtypes[precision]
        p = full.with_(weight_dtype=w, trainable_dtype=t, compute_dtype=c)
        got = M._prepare(L1, p, p.compute_dtype != "fp32")
        assert (got.fused_head_grad, got.fused_head_transient) == (grad * vh, transient * vh), precision
        loss = M._moments(L1, p, got, 4, 2048)[0]
        assert loss.name == "loss" and loss.grads == got.grads_early + grad * vh
    # no trained head (LoRA), or the unfused loss (its head gradient comes in the backward): none of it
    for other in (lora(fused_cross_entropy=True),
                  plan_from_flags(method="full", micro_batch_size=4, seq_len=2048, fused_cross_entropy=False)):
        got = M._prepare(L8, other, True)
        assert (got.fused_head_grad, got.fused_head_transient) == (0, 0)
    # with accumulation the loss is the peak of an fp16 1B full fine-tune
    fp16 = full.with_(weight_dtype="fp32", trainable_dtype="fp32", compute_dtype="fp16")
    assert estimate(L1, fp16).phase == "loss"


def test_without_checkpointing_the_last_blocks_forward_can_be_the_peak():
    """LoRA on down_proj under autocast: peft's fp32 copy of its input (i wide), the MLP product it is cast from,
    and four h-wide tensors (the MLP's input, the base output, lora_B's output and its scaled copy) sit on top of
    every block's saved set. With the fused loss that is the step's peak (traced on kubetune's step with Liger:
    tests/trainer/test_alloc_trace_kubetune.py)."""
    p = lora(gradient_checkpointing=False, fused_cross_entropy=True)
    assert M._prepare(L8, p, True).fwd_transient == (4 + 2) * 14336 + 4 * 2 * 4096
    e = estimate(L8, p)
    assert e.phase == "forward"
    backward = [m for m in M._moments(L8, p, M._prepare(L8, p, True), 4, 2048) if m.name == "backward"][0]
    assert e.breakdown["activations"] > backward.activations
    # checkpointing, a full fine-tune (down_proj saves the product), LoRA without down_proj: no such moment
    for other in (p.with_(gradient_checkpointing=True),
                  plan_from_flags(method="full", micro_batch_size=4, seq_len=2048, fused_cross_entropy=True),
                  lora(gradient_checkpointing=False, fused_cross_entropy=True, lora_targets=("q_proj", "v_proj"))):
        assert M._prepare(L8, other, True).fwd_transient == 0
    # the unfused loss's logits stay the peak
    assert estimate(L8, p.with_(fused_cross_entropy=False)).phase == "loss"
