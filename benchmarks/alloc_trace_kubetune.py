"""Record the allocation trace of kubetune's own trainer step on CPU (the stack ``-f job.yaml`` prices).

    .venv/bin/python benchmarks/alloc_trace_kubetune.py [--real]

The same recorder as benchmarks/alloc_trace.py (a TorchDispatchMode logging storages under FakeTensorMode),
driving the trainer's own code: kubetune_trainer.model.build_model (the plan's dtypes, gradient
checkpointing, peft), its LossHead (the fused cross-entropy is model.chunked_linear_ce on CPU: chunked,
logits never whole) and loop.build_optimizer (AdamW); the step is loop.py's: loss from head.loss_from,
backward, clip_grad_norm_, step, zero_grad(set_to_none). KUBETUNE_DEBUG_PRECISION_ON_CPU=1 keeps a GPU's
dtypes (bf16 weights, bf16 autocast as accelerate applies it). Liger is GPU-only: not traced. bitsandbytes
has no fake-tensor kernels but has CPU ones: QLoRA and 8-bit AdamW are recorded with ``fake=False`` under
KUBETUNE_DEBUG_BNB_ON_CPU=1 (real tensors: small dims only). On a GPU the trainer fuses AdamW (fused=True);
on CPU it is the foreach one, whose per-step temporaries are the states' size: a little more than on a GPU.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator" / "src"))
sys.path.insert(0, str(REPO / "trainer-image" / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import alloc_trace as T  # noqa: E402
import torch  # noqa: E402

GIB = 1 << 30


def job_spec(method: str, batch: int, seq: int, gc_on: bool, fused: bool = True, lora_rank: int = 16,
             objective: dict | None = None, optimizer: str = "adamw", liger: bool = False):
    from kubetune.api.v1alpha1 import FineTuneJobSpec

    m: dict = {"type": method}
    if method in ("lora", "qlora"):
        m["lora"] = {"rank": lora_rank, "alpha": 2 * lora_rank, "targetModules": ["all-linear"]}
    return FineTuneJobSpec.model_validate({
        "model": {"uri": "s3://models/m/"},
        "dataset": {"uri": "s3://data/train.jsonl", "maxSeqLength": seq},
        "method": m,
        "objective": objective or {"type": "sft"},
        # fusedKernels only with ``liger`` (Triton's interpreter): otherwise the CPU step runs transformers'
        # RMSNorm and MLP, and the plan must price those (with it on, the estimate priced Liger's smaller
        # saved set: the -4 %/-6 % once seen without checkpointing, every block's activations alive at the loss)
        "training": {"maxSteps": 2, "microBatchSize": batch, "gradientCheckpointing": gc_on,
                     "fusedCrossEntropy": fused, "fusedKernels": liger, "precision": "bf16", "optimizer": optimizer},
        "checkpoints": {"uri": "s3://ckpt/"},
    })


class _AllValid(T.StorageLog):
    """Fake tensors have no values: the chunked cross-entropy's ``(labels != IGNORE).nonzero()`` gets
    every index, which is what it returns for the recorded batch (no label is ignored)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.nonzero.default and self.fake:
            x = args[0]
            out = torch.empty((x.numel(), x.dim()), dtype=torch.long)
            self.track(out.untyped_storage(), "nonzero")
            return out
        return super().__torch_dispatch__(func, types, args, kwargs)


# the trainer's test knobs, set only while recording (a test session's other trainer tests must not see them)
_KNOBS = {"KUBETUNE_DEBUG_PRECISION_ON_CPU": "1", "KUBETUNE_ALLOW_RANDOM_INIT": "1"}


def record(arch: dict, method: str, batch: int, seq: int, gc_on: bool, *, fake: bool = True, steps: int = 2,
           fused: bool = True, objective: dict | None = None, optimizer: str = "adamw", liger: bool = False) -> dict:
    """``objective``: spec.objective (sft when None). A preference objective's step is its own loss
    (kubetune_trainer.objectives: the reference's no-grad forward, then chosen and rejected in one
    forward), on a batch of ``batch`` pairs, each response ``seq`` tokens."""
    old = {k: os.environ.get(k) for k in _KNOBS}
    os.environ.update(_KNOBS)
    try:
        return _record(arch, method, batch, seq, gc_on, fake, steps, fused, objective, optimizer, liger)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _record(arch, method, batch, seq, gc_on, fake, steps, fused, objective, optimizer, liger) -> dict:
    from contextlib import nullcontext

    import transformers
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kubetune.plan import plan_from_spec
    from kubetune_trainer import objectives
    from kubetune_trainer.loop import build_optimizer
    from kubetune_trainer.model import LossHead, build_model

    transformers.logging.set_verbosity_error()
    spec = job_spec(method, batch, seq, gc_on, fused, objective=objective, optimizer=optimizer, liger=liger)
    plan = plan_from_spec(spec)
    cpu = torch.device("cpu")
    mode = FakeTensorMode(allow_non_fake_inputs=False) if fake else nullcontext()
    import transformers.masking_utils as mu

    packed = mu.find_packed_sequence_indices
    if fake:
        mu.find_packed_sequence_indices = lambda position_ids: None  # as in alloc_trace.record
    try:
        with tempfile.TemporaryDirectory() as d:
            cfg = transformers.AutoConfig.for_model(**arch)
            cfg.save_pretrained(d)
            torch.manual_seed(0)
            if plan.quant_bits and not fake:
                # bitsandbytes quantizes only what from_pretrained loads (random init skips it): random weights
                # on disk, loaded through its CPU kernels (KUBETUNE_DEBUG_BNB_ON_CPU)
                transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(d)
            model, base = build_model(plan, spec, Path(d), cpu, log=lambda s: None, place="meta" if fake else "cpu")
        if fake:
            T.to_fake(model, mode)
        with mode:
            # Liger's fused loss where its kernels run (liger: Triton's interpreter), else chunked_linear_ce
            head = LossHead(model, base, fused=plan.fused_cross_entropy, device=cpu, impl=None if liger else "torch")
            obj = objectives.get(plan.objective)(spec, plan, log=lambda s: None)
            obj.prepare(model, head, None)  # the reference: a frozen copy's weights for reference copy
            ref_model = getattr(getattr(obj, "reference", None), "model", None)
            if fake and ref_model is not None:
                T.to_fake(ref_model, mode)  # deepcopy gives fake tensors a mode of their own
            model.train()
            opt = build_optimizer(model, plan, spec.training, cpu)
            params = [p for p in model.parameters() if p.requires_grad]
            log = _AllValid()
            log.fake = fake
            log.track_model(model)
            if ref_model is not None:
                log.track_model(ref_model)
            log.mark("loaded")
            V = arch["vocab_size"]
            with log:
                for step in range(steps):
                    log.mark(f"step{step}")
                    # the trainer's collator with full rows: no padding, and no mask (an all-ones mask is
                    # dropped by transformers, a test of values fake tensors cannot answer)
                    ids = torch.randint(0, V, (batch * plan.sequences_per_example, seq))
                    labels = ids.clone()
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        if plan.objective == "sft":
                            with head.computing_loss(labels):
                                loss = head.loss_from(model(input_ids=ids))
                        else:
                            live = torch.ones(batch, dtype=torch.bool)
                            b = {"input_ids": ids, "labels": labels, "live": live, "desirable": live, "count": batch}
                            if plan.reference == "precomputed":  # from the pass before training
                                b["ref_logps"] = torch.zeros(ids.shape[0])
                            loss, metrics = obj.loss(model, head, b)
                            del b
                            del metrics, live
                    log.mark(f"backward{step}")
                    loss.backward()
                    del loss, labels, ids
                    log.mark(f"optimizer{step}")
                    torch.nn.utils.clip_grad_norm_(params, spec.training.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    gc.collect()
                log.mark("end")
            log.on = False
            head.restore()
            return {"events": log.events, "marks": log.marks, "plan": plan}
    finally:
        mu.find_packed_sequence_indices = packed


def compare(arch: dict, method: str, batch: int, seq: int, gc_on: bool, fake: bool = True,
            objective: dict | None = None) -> dict:
    from kubetune.estimator import estimate, from_config
    from kubetune.estimator.allocator import EXPANDABLE, simulate

    t = record(arch, method, batch, seq, gc_on, fake=fake, objective=objective)
    peak, at = T.live_peak(t["events"])
    ev = [e[:3] if e[0] == "a" else e for e in t["events"]]
    sim = simulate(ev, expandable_segments=True)
    est = estimate(from_config(arch), t["plan"], allocator=EXPANDABLE)
    return {"peak": peak, "sim_reserved": sim.peak_reserved, "sim_allocated": sim.peak_allocated,
            "est_allocated": est.allocated_bytes, "est_reserved": est.reserved_bytes, "at": at,
            "alive": T.alive_at(t["events"], at)}


LLAMA8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
               tie_word_embeddings=False)
LLAMA1B = dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, max_position_embeddings=8192,
               tie_word_embeddings=True)


def main() -> int:
    from kubetune.estimator.memory import MISC

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None)
    a = ap.parse_args()
    rows = [("8b-lora-r16-b4s2048-gc", LLAMA8B, "lora", 4, 2048, True, None),
            ("1b-full-b4s2048-gc", LLAMA1B, "full", 4, 2048, True, None),
            ("8b-lora-r16-dpo-b2s2048-gc", LLAMA8B, "lora", 2, 2048, True, {"type": "dpo"}),
            ("1b-full-dpo-copy-b2s2048-gc", LLAMA1B, "full", 2, 2048, True, {"type": "dpo", "reference": "copy"})]
    print("kubetune trainer (expandable_segments:True), GiB: trace peak | estimate allocated - MISC | "
          "simulated reserved of the trace | estimate reserved - MISC")
    for name, arch, method, b, s, g, objective in rows:
        if a.only and a.only not in name:
            continue
        r = compare(arch, method, b, s, g, objective=objective)
        print(f"  {name:26s} peak {r['peak'] / GIB:7.3f} | est {(r['est_allocated'] - MISC) / GIB:7.3f} "
              f"({((r['est_allocated'] - MISC) / r['peak'] - 1) * 100:+.1f}%) | "
              f"sim reserved {r['sim_reserved'] / GIB:7.3f} | "
              f"est reserved {(r['est_reserved'] - MISC) / GIB:7.3f} "
              f"({((r['est_reserved'] - MISC) / r['sim_reserved'] - 1) * 100:+.1f}%)", flush=True)
        for tag, n in list(r["alive"].items())[:6]:
            print(f"      {tag:30s} {n / GIB:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
