"""The allocation sequence of training steps, built from the estimator's own terms, for the allocator simulator.

``reserved_gap(arch, plan, ...)`` returns what PyTorch's caching allocator reserves beyond what is allocated at
its peak (``peak_reserved - peak_allocated``) for the plan's trace shape: the estimate's allocated figure (the
physics) plus this gap is its reserved figure. Pure Python, no torch.

The generated trace follows the order and sizes of the real one that ``benchmarks/alloc_trace.py`` records
from transformers/peft/torch under fake tensors (the HF Trainer + PEFT step): parameters first; per step
the forward (per block: the tensors autograd saves, interleaved with the transients each op makes and
frees; under checkpointing only the block input stays), the unfused loss (bf16 logits, their fp32 copy,
log-softmax; the Trainer drops the logits before the backward), the backward (loss gradients of logits
size, then per block from the top: the recomputed saved set, the gradient transients, the parameter
gradients of full fine-tunes, which stay), the optimizer step (AdamW states on the first step) and
zero_grad(set_to_none) freeing every gradient. Two steps are replayed, the peaks taken over both, as
torch's are over a whole run. A preference objective's reference model adds a frozen copy of the weights
(reference copy) and, before each policy forward, a no-grad reference forward over the same tokens (implicit and
copy): per block the frozen saved set made and freed, then the log-probs of the logits; the caller's ``tokens``
already count chosen and rejected. Tensors are grouped: what matters to the allocator is the sizes and
lifetimes of the large ones, and each group has the size of the tensors it stands for.

Checked against recorded traces replayed in the same simulator (benchmarks/estimator_calibration.py).
"""
from __future__ import annotations

import itertools
import weakref

from kubetune.api.registry import method as method_info
from kubetune.estimator.allocator import simulate

MAX_LAYERS = 32  # blocks replayed (Llama-3.1-8B has 32): deeper models repeat the same per-block pattern
_MOE_EXPERT_SPLIT = 8  # experts' saved tensors are per (token, expert) rows: a few large gathers


class _Trace:
    __slots__ = ("ev", "n")

    def __init__(self) -> None:
        self.ev: list[tuple] = []
        self.n = 0

    def a(self, nbytes: float) -> int:
        self.n += 1
        self.ev.append(("a", self.n, max(1, int(nbytes))))
        return self.n

    def f(self, i: int) -> None:
        self.ev.append(("f", i))

    def tmp(self, *sizes: float) -> None:
        """Allocate the sizes in order, then free them in order (an op's temporaries)."""
        ids = [self.a(s) for s in sizes]
        for i in ids:
            self.f(i)


def _split(total: float, width: float) -> list[float]:
    """``total`` bytes as tensors of ``width`` bytes (the last one takes the remainder)."""
    if total <= 0:
        return []
    if width <= 0 or total <= width:
        return [total]
    n = int(total // width)
    out = [width] * n
    rest = total - n * width
    if rest > 0.25 * width:
        out.append(rest)
    else:
        out[-1] += rest
    return out


def build_trace(arch, plan, *, autocast: bool, tokens: int, steps: int = 2) -> list[tuple]:
    """The generated allocation events of ``steps`` training steps (see the module doc)."""
    from kubetune.estimator import memory as M

    w, t, c = M.BYTES[plan.weight_dtype], M.BYTES[plan.trainable_dtype], M.BYTES[plan.compute_dtype]
    info = method_info(plan.method)
    full = not info.adapter  # whole blocks train (full, freeze): their gradients stay from the backward on
    gc = plan.gradient_checkpointing
    tok = tokens
    h, V = arch.hidden_size, arch.vocab_size
    blk = arch.blocks[0][1]
    for _, b in arch.blocks:
        if b.params > blk.params:
            blk = b
    moe = blk.moe
    i = arch.intermediate_size if moe is None else max(moe.top_k * moe.intermediate, moe.shared_intermediate, 1)
    # at most MAX_LAYERS blocks are replayed (bounded work for any architecture): the per-block pattern
    # repeats, and the weights, gradients and states of the blocks beyond are single tensors of their size
    L = min(arch.num_layers, MAX_LAYERS)
    extra = arch.num_layers - L
    tr = _Trace()
    lora = info.settings == "lora"
    adapted = arch.lora_modules(tuple(plan.lora_targets) or ("all-linear",)) if lora else ()
    rank = int(plan.lora_rank or 16)
    ad_ids = {id(m) for _, m in adapted}

    # ---- parameters, as loading makes them: embeddings, then block by block, then the head
    if info.quantized:
        per_q = M.INT8_BYTES if (plan.quant_bits or 4) == 8 else (M.NF4_BYTES_DQ if plan.double_quant else M.NF4_BYTES)
    else:
        per_q = w
    lin_sizes = [m.d_in * m.d_out for m in blk.linears]

    def load_weights() -> None:
        tr.a(arch.embed_params * w)
        for _ in range(L):
            for n in lin_sizes:
                tr.a(n * per_q)
            tr.a(max(1, blk.other_params - blk.expert_params) * w)
            if blk.expert_params:
                for _ in range(2):
                    tr.a(blk.expert_params / 2 * w)
        if extra:
            tr.a(extra * (sum(lin_sizes) * per_q + blk.other_params * w))
        if arch.lm_head_params:
            tr.a(arch.lm_head_params * w)

    load_weights()
    if plan.reference == "copy":
        load_weights()  # the frozen reference model: the same tensors again, never freed
    adapters = []
    for cnt, m in adapted:
        for _ in range(min(cnt, L)):
            adapters.append(rank * m.d_in)
            adapters.append(rank * m.d_out)
    for n in adapters:
        tr.a(n * t)

    # trainable tensors (their grads and AdamW states), in the backward's order (head first)
    per_block = lin_sizes[::-1] + [max(1, blk.other_params)]
    freeze = info.settings == "freeze"
    head_trained = info.trains_all or (freeze and plan.train_embeddings)
    train_all = arch.num_layers if info.trains_all else (
        min(int(plan.trainable_layers or 1), arch.num_layers) if freeze else 0)
    train_layers = min(train_all, L)
    lump = (train_all - train_layers) * (sum(lin_sizes) + blk.other_params)  # trained blocks not replayed
    head_grad = (arch.lm_head_params or arch.embed_params) if head_trained else 0
    embed_grad = arch.embed_params if (head_trained and arch.lm_head_params) else 0
    if full:
        trainable = (([head_grad] if head_grad else []) + per_block * train_layers + ([lump] if lump else [])
                     + ([embed_grad] if embed_grad else []))
    elif info.settings == "virtualTokens":
        trainable = [max(1, M._method_info(arch, plan)[1])]
    else:
        trainable = adapters[::-1]
    eight_bit = plan.optimizer in ("adamw-8bit", "paged-adamw-8bit")
    state_bytes = 1 if eight_bit else t

    # ---- per-block activation tensors (bytes for all tokens)
    x = M._ctx_for(arch, plan, blk, info.trains_all, autocast)
    saved = M._block_bytes(arch, blk, x) * tok
    hid = w * h * tok  # the residual stream (a block's input: the checkpoint)
    wide = (c if autocast else w) * i * tok
    narrow = (c if autocast else w) * h * tok
    n_wide = 2 if (x.liger_mlp) else 3
    if moe is not None:
        wide_parts = [wide / _MOE_EXPERT_SPLIT] * (n_wide * _MOE_EXPERT_SPLIT)
    else:
        wide_parts = [wide] * n_wide

    def parts(saved: float) -> list[float]:
        # attention and norms: h-wide tensors; the fp32 norm copies are twice as wide
        rest = saved - sum(wide_parts)
        if rest < 0:
            return [saved]
        return _split(rest, narrow) + wide_parts

    saved_parts = parts(saved)
    ref_forward = plan.reference in ("implicit", "copy")
    if ref_forward:  # a frozen block, adapters off (implicit) or none (copy)
        xr = M.dataclasses.replace(M._ctx_for(arch, plan, blk, False, autocast), adapted=(), dropout=False, rank=0,
                                   moe_lora=False)
        ref_parts = parts(M._block_bytes(arch, blk, xr) * tok)
    # transients of the forward: fp32 copies inside each RMSNorm, and peft's fp32 copy of the input of
    # each adapted group (cast back for lora_A under autocast)
    norm_tmp = [4 * h * tok, 4 * h * tok]
    ad_groups = {}
    for m in blk.linears:
        if id(m) in ad_ids:
            ad_groups[m.group] = max(ad_groups.get(m.group, 0), m.d_in)
    lora_tmp = [d * tok * t for d in ad_groups.values()] if (lora and t != c) else []
    bwd_tmp = [wide, wide, narrow, narrow, 4 * h * tok, 4 * h * tok]

    # bitsandbytes dequantizes each 4/8-bit weight to the compute dtype for its matmul, forward and backward
    dequant = [n * c for n in lin_sizes] if info.quantized else []
    per_dq = max(1, -(-len(dequant) // max(1, len(saved_parts))))

    def block_forward(keep: bool) -> list[int]:
        ids: list[int] = []
        for n in norm_tmp:
            tr.tmp(n)
        half = len(saved_parts) // 2
        for j, n in enumerate(saved_parts):
            if j == half:
                for n2 in lora_tmp:
                    tr.tmp(n2, n2 / 2)
            for dq in dequant[j * per_dq:(j + 1) * per_dq]:
                tr.tmp(dq)
            ids.append(tr.a(n))
        if not keep:
            for j in ids:
                tr.f(j)
            return []
        return ids

    # ---- loss sizes
    fused = plan.fused_cross_entropy
    logits = tok * V
    chunk = min(tok, 1 << max(0, (-(-tok // max(1, -(-V // h))) - 1).bit_length()))

    def reference_forward() -> int:
        """The no-grad reference forward: one block's tensors at a time, the log-probs of the logits (a chunk at a
        time fused); all freed but the per-sequence log-probs it returns."""
        h0 = tr.a(hid)
        ref_dq = max(1, -(-len(dequant) // max(1, len(ref_parts))))
        for _ in range(L):
            for n in norm_tmp:
                tr.tmp(n)
            ids = []
            for j, n in enumerate(ref_parts):
                for dq in dequant[j * ref_dq:(j + 1) * ref_dq]:
                    tr.tmp(dq)
                ids.append(tr.a(n))
            h1 = tr.a(hid)
            for j in ids:
                tr.f(j)
            tr.f(h0)
            h0 = h1
        fp32 = M.REF_LOGIT_FP32_BYTES // 2
        for _ in range(max(1, -(-tok // chunk)) if fused else 1):
            n = chunk if fused else tok
            tr.tmp(n * V * c, n * V * fp32, n * V * fp32)  # logits, their fp32 copy, the log-softmax
        tr.f(h0)
        return tr.a(4 * tok)  # per-token log-probs, summed per sequence (a small tensor)
    grads: list[int] = []
    states: list[int] = []
    for step in range(steps):
        inputs = [tr.a(8 * tok) for _ in range(3)]
        if ref_forward:
            inputs.append(reference_forward())
        ckpts: list[int] = []
        acts: list[list[int]] = []
        hcur = tr.a(hid)  # embedding output
        for _ in range(L):
            prev = hcur
            acts.append(block_forward(keep=not gc))
            hcur = tr.a(hid)
            if gc:
                ckpts.append(prev)  # the block input is the checkpoint
            else:
                tr.f(prev)  # the saved set holds what the backward needs
        head_saved = [tr.a(4 * h * tok), tr.a(narrow)]
        if fused:
            gh = tr.a(narrow)  # liger computes the hidden state's gradient in the forward
            for _ in range(max(1, -(-tok // chunk))):
                tr.tmp(2 * chunk * V * c, chunk * V * 4)
            tr.f(hcur)
            loss_keep = [gh]
        else:
            lg = tr.a(logits * c)
            up = tr.a(logits * 4)
            lsm = tr.a(logits * 4)
            tr.f(up)
            tr.f(lg)  # the Trainer keeps only the loss
            tr.f(hcur)
            loss_keep = [lsm]
        # backward
        if not fused:
            g1 = tr.a(logits * 4)
            g2 = tr.a(logits * 4)
            tr.f(g1)
            tr.f(loss_keep[0])
            g3 = tr.a(logits * c)
            tr.f(g2)
            gh = tr.a(narrow)
            if head_grad:
                grads.append(tr.a(head_grad * t))
            tr.f(g3)
        elif head_grad:
            grads.append(tr.a(head_grad * t))
        for j in head_saved:
            tr.f(j)
        gcur = gh
        lin_rev = [(m.d_in, m.d_out) for m in blk.linears][::-1]
        for layer in reversed(range(L)):
            ids = block_forward(keep=True) if gc else acts[layer]
            trained = layer >= L - train_layers
            # linear by linear from the top: the input's gradient, the weight's gradient (kept: AccumulateGrad
            # takes it) and the saved tensors that op needed die, in that order
            per = max(1, -(-len(ids) // max(1, len(lin_rev))))
            gprev = None
            rev_ids = ids[::-1]
            for k, (d_in, d_out) in enumerate(lin_rev):
                if dequant:
                    tr.tmp(d_in * d_out * c)
                g_in = tr.a((c if autocast else w) * d_in * tok)
                if trained:
                    grads.append(tr.a(d_in * d_out * t))
                for j in rev_ids[k * per:(k + 1) * per]:
                    tr.f(j)
                if gprev is not None:
                    tr.f(gprev)
                gprev = g_in
            for j in rev_ids[len(lin_rev) * per:]:
                tr.f(j)
            if trained:
                grads.append(tr.a(max(1, blk.other_params) * t))
            gnext = tr.a(narrow)
            tr.tmp(*bwd_tmp[4:])
            if gprev is not None:
                tr.f(gprev)
            tr.f(gcur)
            gcur = gnext
            if gc:
                tr.f(ckpts[layer])
        tr.f(gcur)
        if lump:
            grads.append(tr.a(lump * t))
        if embed_grad:
            grads.append(tr.a(embed_grad * t))
        if not full:
            for n in trainable:
                grads.append(tr.a(n * t))
        for j in inputs:
            tr.f(j)
        # optimizer: AdamW's states on the first step; clip_grad_norm_ and the fused step make only scalars
        if not states:
            for n in trainable:
                states.append(tr.a(n * state_bytes))
                states.append(tr.a(n * state_bytes))
        for j in grads:
            tr.f(j)
        grads = []
    return tr.ev


# Liger's fused linear cross-entropy and kernels (Triton) allocate their chunk and gradient buffers in ways
# the generated trace only approximates, and they have no fake-tensor kernels to record. Calibrated: the
# two Liger rows of shared/calibration (1B and 8B LoRA, b4 x 2048) reserve 0.34 and 0.45 GiB more than
# the simulator says for the generated trace; the larger is added to every fused-cross-entropy plan.
FUSED_SLACK = int(0.45 * (1 << 30))

_CACHE: dict = {}
_KEYS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Architecture -> a small int naming its dims
_DIMS: dict = {}  # dims key -> that int: the dims tuple (blocks of Linears) takes ~10 hashes; an int one
_NEXT = itertools.count()  # never reused, so clearing _DIMS costs only sharing, never a wrong hit


def _arch_key(arch) -> tuple:
    return (arch.model_type, arch.family, arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads,
            arch.head_dim, arch.intermediate_size, arch.vocab_size, arch.tie_word_embeddings, arch.blocks,
            arch.embed_params, arch.lm_head_params, arch.norm, arch.qk_norm, arch.act_fn, arch.eager_attention,
            arch.sliding_window, arch.final_logit_softcapping, arch.attn_softcapping)


def reserved_gap(arch, plan, *, autocast: bool, tokens: int, expandable: bool, plan_key: tuple | None = None) -> int:
    """peak_reserved - peak_allocated of the generated trace in the simulator (+ FUSED_SLACK), cached per
    (architecture dims, plan, tokens, setting) for the process: any architecture object of the same dims
    shares it."""
    ak = _KEYS.get(arch)
    if ak is None:
        if len(_DIMS) > 4096:
            _DIMS.clear()
        dims = _arch_key(arch)
        ak = _DIMS.get(dims)
        if ak is None:
            ak = _DIMS[dims] = next(_NEXT)
        _KEYS[arch] = ak
    key = (ak, plan if plan_key is None else plan_key, autocast, tokens, expandable)
    gap = _CACHE.get(key)
    if gap is None:
        ev = build_trace(arch, plan, autocast=autocast, tokens=tokens)
        r = simulate(ev, expandable_segments=expandable)
        gap = r.peak_reserved - r.peak_allocated + (FUSED_SLACK if plan.fused_cross_entropy else 0)
        if len(_CACHE) > 1 << 16:
            _CACHE.clear()
        _CACHE[key] = gap
    return gap
