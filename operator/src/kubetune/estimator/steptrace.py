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

import dataclasses
import itertools
import weakref

from kubetune.api.registry import method as method_info
from kubetune.estimator import memory as M
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
    trace = _StepTrace(arch, plan, autocast, tokens)
    trace.load_parameters()
    for _ in range(steps):
        trace.step()
    return trace.tr.ev


def _largest_block(arch):
    blk = arch.blocks[0][1]
    for _, b in arch.blocks:
        if b.params > blk.params:
            blk = b
    return blk


class _StepTrace:
    """The events of a plan's training steps. The constructor sizes the tensors (the estimator's terms, for
    all ``tokens``); the methods emit them in the order the real step makes and frees them."""

    def __init__(self, arch, plan, autocast: bool, tokens: int) -> None:
        self.tr = _Trace()
        self.arch, self.plan, self.autocast, self.tok = arch, plan, autocast, tokens
        self.w, self.t, self.c = M.BYTES[plan.weight_dtype], M.BYTES[plan.trainable_dtype], M.BYTES[plan.compute_dtype]
        self.info = method_info(plan.method)
        # whole blocks train (full, freeze): their gradients stay from the backward on
        self.full = not self.info.adapter
        self.gc = plan.gradient_checkpointing
        self.fused = plan.fused_cross_entropy
        self.blk = _largest_block(arch)
        # at most MAX_LAYERS blocks are replayed (bounded work for any architecture): the per-block pattern
        # repeats, and the weights, gradients and states of the blocks beyond are single tensors of their size
        self.layers = min(arch.num_layers, MAX_LAYERS)
        self.extra_layers = arch.num_layers - self.layers
        self.lora = self.info.settings == "lora"
        self.adapted = arch.lora_modules(tuple(plan.lora_targets) or ("all-linear",)) if self.lora else ()
        self.lin_sizes = [m.d_in * m.d_out for m in self.blk.linears]
        self._size_trainable()
        self._size_activations()
        self.grads: list[int] = []
        self.states: list[int] = []

    # ---- sizes

    def _size_trainable(self) -> None:
        """Adapters, and the trainable tensors (their grads and AdamW states) in the backward's order (head first)."""
        arch, plan, info, blk = self.arch, self.plan, self.info, self.blk
        rank = int(plan.lora_rank or 16)
        self.adapters = [
            n for cnt, m in self.adapted for _ in range(min(cnt, self.layers)) for n in (rank * m.d_in, rank * m.d_out)
        ]
        per_block = self.lin_sizes[::-1] + [max(1, blk.other_params)]
        freeze = info.settings == "freeze"
        head_trained = info.trains_all or (freeze and plan.train_embeddings)
        train_all = (
            arch.num_layers
            if info.trains_all
            else (min(int(plan.trainable_layers or 1), arch.num_layers) if freeze else 0)
        )
        self.train_layers = min(train_all, self.layers)
        # trained blocks not replayed
        self.lump = (train_all - self.train_layers) * (sum(self.lin_sizes) + blk.other_params)
        self.head_grad = (arch.lm_head_params or arch.embed_params) if head_trained else 0
        # Liger's per-chunk fallback for a trained head, bytes per head element (memory.liger_head_fallback)
        self.head_fallback = tuple(self.head_grad * n for n in M.liger_head_fallback(plan)) if self.head_grad else ()
        self.embed_grad = arch.embed_params if (head_trained and arch.lm_head_params) else 0
        if self.full:
            self.trainable = (
                ([self.head_grad] if self.head_grad else [])
                + per_block * self.train_layers
                + ([self.lump] if self.lump else [])
                + ([self.embed_grad] if self.embed_grad else [])
            )
        elif info.settings == "virtualTokens":
            self.trainable = [max(1, M._method_info(arch, plan)[1])]
        else:
            self.trainable = self.adapters[::-1]
        self.state_bytes = 1 if plan.optimizer in ("adamw-8bit", "paged-adamw-8bit") else self.t

    def _size_activations(self) -> None:
        """A block's saved tensors, the forward's and the backward's transients, the logits' chunks."""
        arch, plan, blk, tok, c, h = self.arch, self.plan, self.blk, self.tok, self.c, self.arch.hidden_size
        moe = blk.moe
        inter = arch.intermediate_size if moe is None else max(moe.top_k * moe.intermediate, moe.shared_intermediate, 1)
        x = M._ctx_for(arch, plan, blk, self.info.trains_all, self.autocast)
        act = c if self.autocast else self.w
        self.hid = self.w * h * tok  # the residual stream (a block's input: the checkpoint)
        self.narrow = act * h * tok
        wide = act * inter * tok
        n_wide = 2 if (x.liger_mlp) else 3
        if moe is not None:
            self.wide_parts = [wide / _MOE_EXPERT_SPLIT] * (n_wide * _MOE_EXPERT_SPLIT)
        else:
            self.wide_parts = [wide] * n_wide
        self.saved_parts = self._parts(M._block_bytes(arch, blk, x) * tok)
        self.ref_forward = plan.reference in ("implicit", "copy")
        if self.ref_forward:  # a frozen block, adapters off (implicit) or none (copy)
            xr = dataclasses.replace(
                M._ctx_for(arch, plan, blk, False, self.autocast), adapted=(), dropout=False, rank=0, moe_lora=False
            )
            self.ref_parts = self._parts(M._block_bytes(arch, blk, xr) * tok)
        # transients of the forward: fp32 copies inside each RMSNorm, and peft's fp32 copy of the input of
        # each adapted group (cast back for lora_A under autocast)
        self.norm_tmp = [4 * h * tok, 4 * h * tok]
        ad_ids = {id(m) for _, m in self.adapted}
        ad_groups: dict[str, int] = {}
        for m in blk.linears:
            if id(m) in ad_ids:
                ad_groups[m.group] = max(ad_groups.get(m.group, 0), m.d_in)
        self.lora_tmp = [d * tok * self.t for d in ad_groups.values()] if (self.lora and self.t != c) else []
        # bitsandbytes dequantizes each 4/8-bit weight to the compute dtype for its matmul, forward and backward
        self.dequant = [n * c for n in self.lin_sizes] if self.info.quantized else []
        self.logits = tok * arch.vocab_size
        self.chunk = min(tok, 1 << max(0, (-(-tok // max(1, -(-arch.vocab_size // h))) - 1).bit_length()))

    def _parts(self, saved: float) -> list[float]:
        # attention and norms: h-wide tensors; the fp32 norm copies are twice as wide
        rest = saved - sum(self.wide_parts)
        if rest < 0:
            return [saved]
        return _split(rest, self.narrow) + self.wide_parts

    # ---- parameters, as loading makes them: embeddings, then block by block, then the head

    def load_parameters(self) -> None:
        self._load_weights()
        if self.plan.reference == "copy":
            self._load_weights()  # the frozen reference model: the same tensors again, never freed
        for n in self.adapters:
            self.tr.a(n * self.t)

    def _load_weights(self) -> None:
        arch, plan, blk, tr, w = self.arch, self.plan, self.blk, self.tr, self.w
        if self.info.quantized:
            nf4 = M.NF4_BYTES_DQ if plan.double_quant else M.NF4_BYTES
            per_q = M.INT8_BYTES if (plan.quant_bits or 4) == 8 else nf4
        else:
            per_q = w
        tr.a(arch.embed_params * w)
        for _ in range(self.layers):
            for n in self.lin_sizes:
                tr.a(n * per_q)
            tr.a(max(1, blk.other_params - blk.expert_params) * w)
            if blk.expert_params:
                for _ in range(2):
                    tr.a(blk.expert_params / 2 * w)
        if self.extra_layers:
            tr.a(self.extra_layers * (sum(self.lin_sizes) * per_q + blk.other_params * w))
        if arch.lm_head_params:
            tr.a(arch.lm_head_params * w)

    # ---- one step

    def step(self) -> None:
        tr = self.tr
        inputs = [tr.a(8 * self.tok) for _ in range(3)]
        if self.ref_forward:
            inputs.append(self._reference_forward())
        ckpts, acts, hidden = self._forward()
        head_saved = [tr.a(4 * self.arch.hidden_size * self.tok), tr.a(self.narrow)]
        grad_hidden = self._loss_and_its_backward(hidden)
        for j in head_saved:
            tr.f(j)
        self._backward_blocks(grad_hidden, ckpts, acts)
        if self.lump:
            self.grads.append(tr.a(self.lump * self.t))
        if self.embed_grad:
            self.grads.append(tr.a(self.embed_grad * self.t))
        if not self.full:
            for n in self.trainable:
                self.grads.append(tr.a(n * self.t))
        for j in inputs:
            tr.f(j)
        # optimizer: AdamW's states on the first step; clip_grad_norm_ and the fused step make only scalars
        if not self.states:
            for n in self.trainable:
                self.states.append(tr.a(n * self.state_bytes))
                self.states.append(tr.a(n * self.state_bytes))
        for j in self.grads:
            tr.f(j)
        self.grads = []

    def _forward(self) -> tuple[list[int], list[list[int]], int]:
        """The blocks' forward: (checkpoints, each block's saved tensors, the last hidden state)."""
        tr = self.tr
        ckpts: list[int] = []
        acts: list[list[int]] = []
        hcur = tr.a(self.hid)  # embedding output
        for _ in range(self.layers):
            prev = hcur
            acts.append(self._block_forward(keep=not self.gc))
            hcur = tr.a(self.hid)
            if self.gc:
                ckpts.append(prev)  # the block input is the checkpoint
            else:
                tr.f(prev)  # the saved set holds what the backward needs
        return ckpts, acts, hcur

    def _block_forward(self, keep: bool) -> list[int]:
        tr = self.tr
        ids: list[int] = []
        for n in self.norm_tmp:
            tr.tmp(n)
        per_dq = max(1, -(-len(self.dequant) // max(1, len(self.saved_parts))))
        half = len(self.saved_parts) // 2
        for j, n in enumerate(self.saved_parts):
            if j == half:
                for n2 in self.lora_tmp:
                    tr.tmp(n2, n2 / 2)
            for dq in self.dequant[j * per_dq : (j + 1) * per_dq]:
                tr.tmp(dq)
            ids.append(tr.a(n))
        if not keep:
            for j in ids:
                tr.f(j)
            return []
        return ids

    def _loss_and_its_backward(self, hidden: int) -> int:
        """The loss (fused: Liger computes the hidden state's gradient in the forward; unfused: the Trainer keeps
        only the log-softmax) and its backward down to the hidden state's gradient, which it returns."""
        tr, logits, c, vocab, chunk = self.tr, self.logits, self.c, self.arch.vocab_size, self.chunk
        if self.fused:
            grad_hidden = tr.a(self.narrow)
            # a trained head: Liger's grad_weight, made before the chunks; where it cannot add a chunk's
            # product in place, the product and its fp32 copy come and go per chunk (memory.fused_head_bytes)
            head = tr.a(self.head_grad * self.t) if self.head_grad else None
            for _ in range(max(1, -(-self.tok // chunk))):
                tr.tmp(2 * chunk * vocab * c, chunk * vocab * 4)
                if self.head_fallback:
                    tr.tmp(*self.head_fallback)
            tr.f(hidden)
            if head is not None:
                self.grads.append(head)
            return grad_hidden
        lg = tr.a(logits * c)
        up = tr.a(logits * 4)
        lsm = tr.a(logits * 4)
        tr.f(up)
        tr.f(lg)  # the Trainer keeps only the loss
        tr.f(hidden)
        g1 = tr.a(logits * 4)
        g2 = tr.a(logits * 4)
        tr.f(g1)
        tr.f(lsm)
        g3 = tr.a(logits * c)
        tr.f(g2)
        grad_hidden = tr.a(self.narrow)
        if self.head_grad:
            self.grads.append(tr.a(self.head_grad * self.t))
        tr.f(g3)
        return grad_hidden

    def _backward_blocks(self, gcur: int, ckpts: list[int], acts: list[list[int]]) -> None:
        tr = self.tr
        lin_rev = [(m.d_in, m.d_out) for m in self.blk.linears][::-1]
        for layer in reversed(range(self.layers)):
            ids = self._block_forward(keep=True) if self.gc else acts[layer]
            trained = layer >= self.layers - self.train_layers
            gprev = self._backward_linears(ids, lin_rev, trained)
            if trained:
                self.grads.append(tr.a(max(1, self.blk.other_params) * self.t))
            gnext = tr.a(self.narrow)
            tr.tmp(4 * self.arch.hidden_size * self.tok, 4 * self.arch.hidden_size * self.tok)
            if gprev is not None:
                tr.f(gprev)
            tr.f(gcur)
            gcur = gnext
            if self.gc:
                tr.f(ckpts[layer])
        tr.f(gcur)

    def _backward_linears(self, ids: list[int], lin_rev: list[tuple[int, int]], trained: bool) -> int | None:
        """Linear by linear from the top: the input's gradient, the weight's gradient (kept: AccumulateGrad takes
        it) and the saved tensors that op needed die, in that order. Returns the last input gradient."""
        tr, c, tok = self.tr, self.c, self.tok
        per = max(1, -(-len(ids) // max(1, len(lin_rev))))
        gprev = None
        rev_ids = ids[::-1]
        for k, (d_in, d_out) in enumerate(lin_rev):
            if self.dequant:
                tr.tmp(d_in * d_out * c)
            g_in = tr.a((c if self.autocast else self.w) * d_in * tok)
            if trained:
                self.grads.append(tr.a(d_in * d_out * self.t))
            for j in rev_ids[k * per : (k + 1) * per]:
                tr.f(j)
            if gprev is not None:
                tr.f(gprev)
            gprev = g_in
        for j in rev_ids[len(lin_rev) * per :]:
            tr.f(j)
        return gprev

    def _reference_forward(self) -> int:
        """The no-grad reference forward: one block's tensors at a time, the log-probs of the logits (a chunk at a
        time fused); all freed but the per-sequence log-probs it returns."""
        tr, tok, chunk, vocab = self.tr, self.tok, self.chunk, self.arch.vocab_size
        h0 = tr.a(self.hid)
        ref_dq = max(1, -(-len(self.dequant) // max(1, len(self.ref_parts))))
        for _ in range(self.layers):
            for n in self.norm_tmp:
                tr.tmp(n)
            ids = []
            for j, n in enumerate(self.ref_parts):
                for dq in self.dequant[j * ref_dq : (j + 1) * ref_dq]:
                    tr.tmp(dq)
                ids.append(tr.a(n))
            h1 = tr.a(self.hid)
            for j in ids:
                tr.f(j)
            tr.f(h0)
            h0 = h1
        fp32 = M.REF_LOGIT_FP32_BYTES // 2
        for _ in range(max(1, -(-tok // chunk)) if self.fused else 1):
            n = chunk if self.fused else tok
            tr.tmp(n * vocab * self.c, n * vocab * fp32, n * vocab * fp32)  # logits, their fp32 copy, the log-softmax
        tr.f(h0)
        return tr.a(4 * tok)  # per-token log-probs, summed per sequence (a small tensor)


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
    return (
        arch.model_type,
        arch.family,
        arch.hidden_size,
        arch.num_layers,
        arch.num_heads,
        arch.num_kv_heads,
        arch.head_dim,
        arch.intermediate_size,
        arch.vocab_size,
        arch.tie_word_embeddings,
        arch.blocks,
        arch.embed_params,
        arch.lm_head_params,
        arch.norm,
        arch.qk_norm,
        arch.act_fn,
        arch.eager_attention,
        arch.sliding_window,
        arch.final_logit_softcapping,
        arch.attn_softcapping,
    )


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
