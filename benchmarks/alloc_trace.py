"""Record the allocation trace of real training steps on CPU, with no GPU and (under fake tensors) no memory.

    .venv/bin/python benchmarks/alloc_trace.py CONFIG [--real] [--steps 2] [--out trace.json]
    .venv/bin/python benchmarks/alloc_trace.py calibration   # every shared calibration row: trace, replay, compare
    .venv/bin/python benchmarks/alloc_trace.py sweep         # configs no row measures: the estimate vs their traces

The step is the plain HF Trainer + PEFT stack as ../shared/calibration/measure.py runs it (random weights from
the architecture's dims, bf16 weights, sdpa, LoRA r16 on q,k,v,o,gate,up,down, bf16 autocast, non-reentrant
checkpointing, AdamW, clip_grad_norm_(1.0) as the Trainer's max_grad_norm, zero_grad(set_to_none)): forward,
loss, backward with recomputation, optimizer step, zero_grad, run by transformers', peft's and torch's own
code. A TorchDispatchMode logs every storage an op creates (its bytes) and, through a finalizer on the
storage, when it dies: the ordered (alloc id bytes / free id) events the CUDA caching allocator would see.
Under FakeTensorMode the real dims cost no memory (an 8B model records in seconds); with --real the same
step runs on real CPU tensors (tiny dims), which checks that the fake trace is the real one.

The trace replays in kubetune.estimator.allocator (the caching-allocator simulator) to give peak reserved.
Limits: CPU kernels stand in for CUDA ones (SDPA: flash-for-CPU keeps out + logsumexp as CUDA's flash does;
cuBLAS workspaces and the CUDA context are not tensors and are not in the trace); bitsandbytes (QLoRA,
8-bit AdamW) has no fake-tensor kernels, so those rows are not traced; the dataloader's pinned host
batches are not device memory; one stream.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import weakref
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator" / "src"))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

CALIBRATION = REPO.parent / "shared" / "calibration" / "h100-hf-trainer-peft.jsonl"
GIB = 1 << 30


# the tests' model dims: tiny (a real CPU run is instant) and small (estimator terms dominate its constants)
TINY = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=160, vocab_size=500, tie_word_embeddings=False, max_position_embeddings=256)
SMALL = dict(TINY, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=704, vocab_size=8000,
             max_position_embeddings=1024)


class StorageLog(TorchDispatchMode):
    """Logs ("a", id, nbytes, op) when an op's output has a storage not seen before and ("f", id) when
    that storage is freed. Parameters (and anything else alive before the mode) can be declared first."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple] = []
        self.live: dict[int, int] = {}
        self.on = True
        self.marks: dict[str, int] = {}

    def track(self, st, tag: str) -> None:
        k = st._cdata
        if k in self.live:
            return
        n = st.nbytes()
        self.live[k] = n
        self.events.append(("a", k, n, tag))
        weakref.finalize(st, self._free, k)

    def _free(self, k: int) -> None:
        if self.on and k in self.live:
            self.live.pop(k)
            self.events.append(("f", k))

    def track_model(self, model) -> None:
        """Weights first (tied ones once), then buffers, as the model's load makes them."""
        seen = set()
        for p in model.parameters():
            if p.untyped_storage()._cdata not in seen:
                seen.add(p.untyped_storage()._cdata)
                self.track(p.untyped_storage(), "param")
        for b in model.buffers():
            self.track(b.untyped_storage(), "buffer")

    def mark(self, name: str) -> None:
        self.marks[name] = len(self.events)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.track(t.untyped_storage(), str(func.overloadpacket.__name__))
        return out


def live_peak(events) -> tuple[int, int]:
    """(peak of live bytes, index of the event at that peak)."""
    live: dict[int, int] = {}
    cur = peak = at = 0
    for i, e in enumerate(events):
        if e[0] == "a":
            live[e[1]] = e[2]
            cur += e[2]
            if cur > peak:
                peak, at = cur, i
        else:
            cur -= live.pop(e[1])
    return peak, at


def alive_at(events, index: int) -> dict[str, int]:
    """Bytes alive at event ``index``, by the op that made them (what is alive at the peak)."""
    live: dict[int, tuple[int, str]] = {}
    for e in events[: index + 1]:
        if e[0] == "a":
            live[e[1]] = (e[2], e[3])
        else:
            live.pop(e[1], None)
    out: dict[str, int] = {}
    for n, tag in live.values():
        out[tag] = out.get(tag, 0) + n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def build(arch: dict, method: str, *, lora_rank: int = 16, lora_dropout: float = 0.0, dtype=torch.bfloat16,
          device: str = "meta", lora_targets: list[str] | str | None = None, trainable_layers: int = 2,
          virtual_tokens: int = 20):
    """The model as measure.py builds it (random weights, sdpa, dtype), with peft's LoRA for method lora
    (measure.py's seven targets unless ``lora_targets``, e.g. "all-linear"), the top ``trainable_layers``
    blocks trained for freeze, or peft's prompt tuning. On the meta device it costs nothing; :func:`to_fake`
    then makes its tensors fake CPU tensors."""
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.AutoConfig.for_model(**arch)
    cfg.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
        if method == "lora":
            import peft

            m = peft.get_peft_model(m, peft.LoraConfig(
                r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=lora_dropout, task_type="CAUSAL_LM",
                target_modules=lora_targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"]))
        elif method == "freeze":  # LLaMA-Factory's freeze: only the top k blocks train
            m.requires_grad_(False)
            for layer in m.model.layers[-trainable_layers:]:
                layer.requires_grad_(True)
        elif method == "prompt-tuning":
            import peft

            m = peft.get_peft_model(m, peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                               num_virtual_tokens=virtual_tokens))
        elif method != "full":
            raise ValueError(f"method {method!r}: the recorder builds full, lora, freeze and prompt-tuning")
    return m


def to_fake(model, mode) -> None:
    """Replace every meta parameter and buffer by a fake CPU tensor of the same shape and dtype (tied
    weights stay tied). Values do not matter to memory; a few buffers (RoPE's inv_freq) get arange values."""
    made: dict[int, torch.Tensor] = {}
    with mode:
        for mod in model.modules():
            for name, p in list(mod._parameters.items()):
                if p is None:
                    continue
                if id(p) not in made:
                    made[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
                mod._parameters[name] = made[id(p)]
            for name, b in list(mod._buffers.items()):
                if b is None:
                    continue
                if id(b) not in made:
                    made[id(b)] = torch.ones(b.shape, dtype=b.dtype)
                mod._buffers[name] = made[id(b)]
        # peft's prompt tuning keeps the virtual tokens' ids in a plain dict, neither parameter nor buffer
        prompt_tokens = getattr(model, "prompt_tokens", None) or {}
        for name, ids in list(prompt_tokens.items()):
            prompt_tokens[name] = torch.arange(ids.numel(), dtype=ids.dtype)


def record(arch: dict, method: str, batch: int, seq: int, gc_on: bool, *, fake: bool = True, steps: int = 2,
           lora_rank: int = 16, dtype=torch.bfloat16, autocast: bool = True, vocab_ids: int | None = None,
           **build_kw) -> dict:
    """Trace ``steps`` optimizer steps of the plan (``build_kw``: :func:`build`'s). Returns {"events", "marks"}: the
    parameters (and LoRA adapters) are the first allocations, as loading makes them."""
    from contextlib import nullcontext

    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=False) if fake else nullcontext()
    import transformers.masking_utils as mu

    packed_indices = mu.find_packed_sequence_indices
    if fake:
        # transformers looks at position ids' values for packed rows; fake ones have none, and it would
        # build a mask the real (unpacked) run never makes: answer as the real run does
        mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        return _record(arch, method, batch, seq, gc_on, mode, fake, steps, lora_rank, dtype, autocast, vocab_ids,
                       build_kw)
    finally:
        mu.find_packed_sequence_indices = packed_indices


def _record(arch, method, batch, seq, gc_on, mode, fake, steps, lora_rank, dtype, autocast, vocab_ids,
            build_kw) -> dict:
    from contextlib import nullcontext

    model = build(arch, method, lora_rank=lora_rank, dtype=dtype, device="meta" if fake else "cpu", **build_kw)
    if fake:
        to_fake(model, mode)
    with mode:
        model.train()
        if gc_on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if method != "full":
                model.enable_input_require_grads()  # what the Trainer does for peft models with checkpointing
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        V = arch["vocab_size"]
        log = StorageLog()
        log.track_model(model)
        log.mark("loaded")
        with log:
            for step in range(steps):
                log.mark(f"step{step}")
                ids = torch.randint(0, vocab_ids or V, (batch, seq))
                batch_in = {"input_ids": ids, "labels": ids.clone(),
                            "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
                ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
                # an all-ones mask: transformers checks its values and then runs SDPA causal without one;
                # fake tensors have no values, so the fake step leaves it out to take the same path
                fwd = {k: v for k, v in batch_in.items() if not (fake and k == "attention_mask")}
                with ctx:
                    out = model(**fwd)
                loss = out.loss
                del out, fwd  # Trainer.compute_loss keeps only the loss: the logits die before the backward
                log.mark(f"backward{step}")
                loss.backward()
                del loss, batch_in, ids
                log.mark(f"optimizer{step}")
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                gc.collect()
            log.mark("end")
        log.on = False
        res = {"events": log.events, "marks": log.marks}
    return res


def simulate_row(trace: dict, expandable: bool = False):
    from kubetune.estimator.allocator import simulate

    ev = [e[:3] if e[0] == "a" else e for e in trace["events"]]
    # peaks over the last step: torch's are over all 14 steps; the first has no optimizer states yet
    return simulate(ev, expandable_segments=expandable)


def row_config(r: dict) -> dict:
    a = dict(r["architecture"])
    a.setdefault("max_position_embeddings", 8192)
    return a


def calibration(rows_filter: str | None = None) -> int:
    rows = [json.loads(x) for x in CALIBRATION.read_text().splitlines() if x.strip()]
    print(f"{'config':28s} {'trace peak':>10s} {'meas alloc':>10s} {'sim res':>8s} {'meas res':>8s} "
          f"{'sim gap':>7s} {'meas gap':>8s}  (GiB; non-expandable segments, as measure.py ran)")
    for r in rows:
        if rows_filter and rows_filter not in r["config"]:
            continue
        if r["method"] not in ("lora", "full") or r["fused_cross_entropy_liger"]:
            print(f"{r['config']:28s} not traced ({r['method']}, liger={r['fused_cross_entropy_liger']}): "
                  "bitsandbytes/liger have no fake-tensor kernels")
            continue
        t = record(row_config(r), r["method"], r["batch_size"], r["seq_len"], r["gradient_checkpointing"])
        peak, _ = live_peak(t["events"])
        s = simulate_row(t)
        print(f"{r['config']:28s} {peak / GIB:10.3f} {r['peak_allocated_gib']:10.3f} {s.peak_reserved / GIB:8.3f} "
              f"{r['peak_reserved_gib']:8.3f} {(s.peak_reserved - s.peak_allocated) / GIB:7.3f} "
              f"{r['peak_reserved_gib'] - r['peak_allocated_gib']:8.3f}", flush=True)
    return 0


# Configs no calibration row measures, as a new user of the flag form would pick them: other vocab sizes and
# families, full fine-tunes of 1.5-4B tied models, LoRA r64, long and short sequences, freeze, prompt tuning,
# fp32 master weights. (name, catalog model, method, micro batch, seq len, checkpointing, build keywords)
SWEEP = [
    ("llama-1b freeze4 b4 gc", "meta-llama/Llama-3.2-1B", "freeze", 4, 2048, True, dict(trainable_layers=4)),
    ("llama-1b freeze4 b4", "meta-llama/Llama-3.2-1B", "freeze", 4, 2048, False, dict(trainable_layers=4)),
    ("qwen2.5-3b freeze2 b2 gc", "Qwen/Qwen2.5-3B", "freeze", 2, 2048, True, dict(trainable_layers=2)),
    ("llama-1b full fp32-mixed b4 gc", "meta-llama/Llama-3.2-1B", "full", 4, 2048, True, dict(dtype=torch.float32)),
    ("llama-3b full b2 gc", "meta-llama/Llama-3.2-3B", "full", 2, 2048, True, {}),
    ("qwen3-4b full b2 gc", "Qwen/Qwen3-4B", "full", 2, 2048, True, {}),
    ("qwen2.5-1.5b full b4 gc", "Qwen/Qwen2.5-1.5B", "full", 4, 2048, True, {}),
    ("qwen2.5-0.5b full b16x512", "Qwen/Qwen2.5-0.5B", "full", 16, 512, False, {}),
    ("smollm2-1.7b full b8 gc", "HuggingFaceTB/SmolLM2-1.7B", "full", 8, 2048, True, {}),
    ("tinyllama full b4", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "full", 4, 2048, False, {}),
    ("llama-8b lora r64 b4 gc", "meta-llama/Llama-3.1-8B", "lora", 4, 2048, True, dict(lora_rank=64)),
    ("mistral-7b lora r64 b2x4096 gc", "mistralai/Mistral-7B-v0.3", "lora", 2, 4096, True, dict(lora_rank=64)),
    ("qwen2.5-7b lora b2x4096 gc", "Qwen/Qwen2.5-7B", "lora", 2, 4096, True, {}),
    ("qwen2.5-7b lora b1x8192 gc", "Qwen/Qwen2.5-7B", "lora", 1, 8192, True, {}),
    ("llama-8b lora b1x8192 gc", "meta-llama/Llama-3.1-8B", "lora", 1, 8192, True, {}),
    ("llama-8b lora b8x1024 gc", "meta-llama/Llama-3.1-8B", "lora", 8, 1024, True, {}),
    ("llama-1b lora b8", "meta-llama/Llama-3.2-1B", "lora", 8, 2048, False, {}),
    ("qwen3-8b lora b4 gc", "Qwen/Qwen3-8B", "lora", 4, 2048, True, {}),
    ("phi-3.5-mini lora all-linear b4 gc", "microsoft/Phi-3.5-mini-instruct", "lora", 4, 2048, True,
     dict(lora_targets="all-linear")),
    ("gemma-3-1b lora b4 gc", "google/gemma-3-1b-pt", "lora", 4, 2048, True, {}),
    ("llama-2-7b lora b4 gc", "meta-llama/Llama-2-7b-hf", "lora", 4, 2048, True, {}),
    ("mistral-nemo-12b lora b2 gc", "mistralai/Mistral-Nemo-Base-2407", "lora", 2, 2048, True, {}),
    ("llama-1b prompt-tuning b4 gc", "meta-llama/Llama-3.2-1B", "prompt-tuning", 4, 2048, True, {}),
    ("llama-8b prompt-tuning b2", "meta-llama/Llama-3.1-8B", "prompt-tuning", 2, 2048, False, {}),
]


def sweep_row(model: str, method: str, batch: int, seq: int, gc_on: bool, kw: dict) -> dict:
    """Record one config's step under fake tensors and estimate it with the flag form's plan of the same run.
    GiB: the recorded peak and its simulated reserved (non-expandable segments, as measure.py ran), and the
    estimate's allocated and reserved less MISC (workspaces: not tensors, so not in a trace)."""
    from kubetune.estimator import catalog, estimate, from_config, plan_from_flags
    from kubetune.estimator import memory as M

    found = catalog.lookup(model)
    assert found is not None, model
    arch = dict(found[1])
    arch["max_position_embeddings"] = max(int(arch.get("max_position_embeddings", 0)), seq)
    kw = dict(kw)
    dtype = kw.pop("dtype", torch.bfloat16)
    t = record(arch, method, batch, seq, gc_on, dtype=dtype, **kw)
    peak, _ = live_peak(t["events"])
    sim = simulate_row(t)
    flags: dict = dict(method=method, micro_batch_size=batch, seq_len=seq, gradient_checkpointing=gc_on,
                       precision="fp32-mixed" if dtype == torch.float32 else "bf16")
    if "trainable_layers" in kw:
        flags["trainable_layers"] = kw["trainable_layers"]
    if "lora_rank" in kw:
        flags.update(lora_rank=kw["lora_rank"], lora_alpha=2 * kw["lora_rank"])  # build() sets alpha = 2r
    e = estimate(from_config(arch), plan_from_flags(**flags))
    return dict(trace=peak / GIB, sim_reserved=sim.peak_reserved / GIB, allocated=(e.allocated_bytes - M.MISC) / GIB,
                reserved=(e.reserved_bytes - M.MISC) / GIB, phase=e.phase)


def sweep(only: str | None = None) -> int:
    print(f"{'config':36s} {'trace':>7s} {'est':>7s} {'err':>6s}  {'sim res':>7s} {'est res':>7s} {'err':>6s}"
          "  (GiB; allocated vs the recorded peak, reserved vs its replay; est less MISC)")
    for name, model, method, batch, seq, gc_on, kw in SWEEP:
        if only and only not in name:
            continue
        r = sweep_row(model, method, batch, seq, gc_on, kw)
        print(f"{name:36s} {r['trace']:7.3f} {r['allocated']:7.3f} {r['allocated'] / r['trace'] - 1:+6.1%}  "
              f"{r['sim_reserved']:7.3f} {r['reserved']:7.3f} {r['reserved'] / r['sim_reserved'] - 1:+6.1%}  "
              f"{r['phase']}", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", help="'calibration', 'sweep' (configs no row measures) or a calibration config name")
    ap.add_argument("--only", default=None)
    ap.add_argument("--real", action="store_true", help="real CPU tensors (tiny dims only)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.config == "calibration":
        return calibration(a.only)
    if a.config == "sweep":
        return sweep(a.only)
    rows = {json.loads(x)["config"]: json.loads(x) for x in CALIBRATION.read_text().splitlines() if x.strip()}
    r = rows[a.config]
    t = record(row_config(r), r["method"], r["batch_size"], r["seq_len"], r["gradient_checkpointing"],
               fake=not a.real, steps=a.steps)
    peak, at = live_peak(t["events"])
    print(f"{a.config}: {len(t['events'])} events, peak live {peak / GIB:.3f} GiB at event {at}; marks {t['marks']}")
    for tag, n in list(alive_at(t["events"], at).items())[:12]:
        print(f"  {tag:40s} {n / GIB:8.3f} GiB")
    s = simulate_row(t)
    print(f"simulated: peak reserved {s.peak_reserved / GIB:.3f} GiB, peak allocated {s.peak_allocated / GIB:.3f} GiB")
    if a.out:
        Path(a.out).write_text(json.dumps(t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
