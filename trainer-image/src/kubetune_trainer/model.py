"""Build the model, its trainable part and its loss from the TrainingPlan.

The plan (kubetune.plan) is the contract with the memory estimator: the dtypes, the method, the
adapter settings, gradient checkpointing and fused cross-entropy used here are exactly the ones it
priced. On CPU everything computes in fp32 whatever the plan's precision (as the API documents).

The loss: the output head's forward is swapped for one that returns the summed token cross-entropy
(labels are set just before each forward), so full-vocabulary logits are never materialized when
fusedCrossEntropy is on: Liger's fused linear cross-entropy on CUDA, a chunked torch implementation
on CPU. Doing it inside the head keeps it inside FSDP's forward, where the head's weight is gathered.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from kubetune.api import registry
from kubetune.api.constants import IGNORE_INDEX
from kubetune_trainer import knobs
from kubetune_trainer.errors import BadConfig, ModelLoadFailed

IGNORE = IGNORE_INDEX  # the label a loss skips (kubetune.api.constants)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer_config.json")


# ---------------------------------------------------------------------------------------------
# where the model comes from


def resolve_model_dir(uri: str, storage, work_dir: Path, log: Callable[[str], None] = print,
                      weights: bool = True) -> Path:
    """The model as a local directory. weights=False fetches everything but the weight files: for a
    node whose ranks all build the model on meta (loading_place), which needs only the config and
    tokenizer (a 70B model's second node would otherwise download 141 GB it never reads)."""
    from kubetune_trainer import storage as st

    if uri.startswith("hf://"):
        repo, _, rev = uri[len("hf://"):].partition("@")
        patterns = ["*.json", "*.model", "*.txt", "*.jinja", "*.py"] + (["*.safetensors"] if weights else [])
        try:
            from huggingface_hub import snapshot_download

            # snapshot_download resumes partial files and checks them against the Hub's hashes
            return Path(snapshot_download(repo, revision=rev or None, cache_dir=str(work_dir / "hf"),
                                          allow_patterns=patterns))
        except Exception as e:
            raise st.hub_error(uri, e, ModelLoadFailed) from None
    local = st.local_path_of(uri)
    if local is not None:
        if not local.is_dir():
            raise ModelLoadFailed(f"{uri}: no such model directory ({local})")
        return local
    dest = work_dir / "model"
    # a StorageFailed goes up as it is: S3 trouble may pass, and the Job retries the pod for it
    st.download_tree(st.open_location(uri, storage), dest, log=log,
                     only=None if weights else (lambda key: not key.endswith(WEIGHT_FILES)))
    return dest


def check_model_dir(model_dir: Path, uri: str, trust_remote_code: bool = False) -> dict:
    """config.json and the tokenizer files, checked before transformers reads them: its own errors
    blame the tokenizer for a broken config.json, or stop at "see the report above"."""
    where = f"{uri.rstrip('/')}/config.json"
    f = model_dir / "config.json"
    if not f.is_file():
        raise ModelLoadFailed(f"{uri}: no config.json (a model directory holds config.json, the weights and the tokenizer)")
    try:
        cfg = json.loads(f.read_bytes())
    except UnicodeDecodeError:
        raise ModelLoadFailed(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ModelLoadFailed(f"{where}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise ModelLoadFailed(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelLoadFailed(f"{where}: missing model_type (every Hugging Face config.json names its architecture)")
    import transformers
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        if not cfg.get("auto_map"):
            raise ModelLoadFailed(f"{where}: model_type {model_type!r} is not an architecture transformers "
                                  f"{transformers.__version__} knows; check the model, or use a trainer image with a newer transformers")
        if not trust_remote_code:
            raise ModelLoadFailed(f"{where}: model_type {model_type!r} ships its own modelling code (auto_map); "
                                  "set spec.model.trustRemoteCode: true to run it")
    if not any((model_dir / n).is_file() for n in TOKENIZER_FILES):
        raise ModelLoadFailed(f"{uri}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); the trainer takes "
                              "the tokenizer and its chat template from the model directory")
    return cfg


def weight_problems(model_dir: Path, trust_remote_code: bool = False, limit: int = 3) -> list[str]:
    """Why the weights would not load, file by file: an unreadable safetensors file, or tensors
    whose shape config.json contradicts (the model built on meta, so no memory, against the
    safetensors headers, so no tensor data read)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    headers, out = {}, []
    for f in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as sf:
                headers[f.name] = {k: list(sf.get_slice(k).get_shape()) for k in sf.keys()}
        except Exception as e:
            out.append(f"{f.name} is not a readable safetensors file ({_short(e)}): truncated or corrupt, upload it again")
    if out:
        return out[:limit]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code),
                                                 trust_remote_code=trust_remote_code)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    for name, shapes in headers.items():
        for k, got in shapes.items():
            if k in expected and expected[k] != got:
                out.append(f"{name}: {k} is {got}, config.json makes it {expected[k]}")
    return out[:limit]


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadFailed(f"cannot load the tokenizer from {path}: {_short(e)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"[:400]


# ---------------------------------------------------------------------------------------------
# building per method


def decoder_layers(model) -> torch.nn.ModuleList:
    """The transformer blocks: the ModuleList holding the most parameters."""
    best, best_n = None, -1
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = mod, n
    if best is None:
        raise BadConfig("cannot find the model's transformer blocks (freeze needs them)")
    return best


def plan_dtypes_on(on_cuda: bool) -> bool:
    """Whether the plan's dtypes apply. On CPU the trainer holds and computes everything in fp32 (no
    fast bf16 there); the test knob KUBETUNE_DEBUG_PRECISION_ON_CPU=1 keeps a GPU's dtypes (bf16
    weights, bf16/fp16 autocast) so the CPU tests drive those paths."""
    return on_cuda or knobs.current().debug_precision_on_cpu


def bitsandbytes_on(on_cuda: bool) -> bool:
    """Whether bitsandbytes (QLoRA, 8-bit optimizers) may run. Its CPU kernels are real but slow: the
    test knob KUBETUNE_DEBUG_BNB_ON_CPU=1 lets CPU tests drive those paths; users get the error."""
    return on_cuda or knobs.current().debug_bnb_on_cpu


def liger_on(on_cuda: bool) -> bool:
    """Whether Liger's Triton kernels run. On CPU only under Triton's interpreter: the test knob
    KUBETUNE_DEBUG_LIGER_ON_CPU=1 with TRITON_INTERPRET=1 runs the very kernels a GPU would, in numpy."""
    k = knobs.current()
    return on_cuda or (k.debug_liger_on_cpu and k.triton_interpret)


def apply_fused_kernels(model) -> list[str]:
    """Swap this model instance's RMSNorm, rotary embedding and gated MLP for Liger's Triton kernels
    (training.fusedKernels): fewer kernel launches, and the norm and MLP keep fewer activations for the
    backward (the estimator prices exactly that; kubetune.plan.LIGER_MODEL_TYPES). Loss kernels stay
    off: LossHead owns the loss. A model type Liger does not know runs unchanged. Returns what it swapped."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    from kubetune.plan import LIGER_GEGLU_ACTS, LIGER_SWIGLU_ACTS

    fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(getattr(model.config, "model_type", None))
    if fn is None:
        return []
    params = inspect.signature(fn).parameters
    kw = {k: False for k in ("cross_entropy", "fused_linear_cross_entropy") if k in params}
    # An instance patch replaces forward wholesale and never reads the config's activation: a Llama-layout
    # model with another activation would silently train a different function.
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    act = getattr(text, "hidden_activation", None) or getattr(text, "hidden_act", None)
    if "swiglu" in params and act not in LIGER_SWIGLU_ACTS:
        kw["swiglu"] = False
    if "geglu" in params and act not in LIGER_GEGLU_ACTS:
        kw["geglu"] = False
    fn(model=model, **kw)
    return [k for k in ("rope", "rms_norm", "layer_norm", "swiglu", "geglu")
            if k in params and kw.get(k, params[k].default) is True]


def attention_for(model_dir: Path, trust: bool) -> str:
    """transformers' SDPA (flash / memory-efficient kernels, no s^2 scores kept) unless the model has no
    SDPA path (Gemma 2, for its soft-capped scores), which gets eager attention: what the estimator
    prices (Architecture.eager_attention). A config this cannot resolve is left to the load to report."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust)
        cls = AutoModelForCausalLM._model_mapping[type(cfg)]
    except Exception:
        return "sdpa"
    return "sdpa" if getattr(cls, "_supports_sdpa", True) else "eager"


def loading_place(method: str, fsdp: bool, rank: int, rank0_only: bool = True) -> str:
    """Where a process builds its copy of the base model. Under FSDP, loading it whole on every rank
    would need one GPU to hold all of it before sharding (Llama-3.1-70B in bf16: 141 GB on an 80 GB
    H100), and every rank to read all of it (8 readers of 141 GB on an 8-GPU node, each touching every
    page when FSDP flattens it; a dtype cast makes private copies). So rank 0 alone reads the weights into host
    memory ("cpu"), FSDP moves them to its GPU one wrapped unit at a time, and every other rank builds
    shapes only ("meta"): FSDP materializes each unit there and broadcasts rank 0's values
    (sync_module_states; what accelerate's cpu_ram_efficient_loading does, which transformers 5 no
    longer honours). QLoRA quantizes while loading onto a GPU, so each rank still loads its own.
    rank0_only=False (KUBETUNE_FSDP_RANK0_LOAD=0) is the escape hatch for a model whose code cannot be
    built on meta: every rank reads the weights into host memory, still never whole onto a GPU."""
    if not fsdp or registry.method(method).quantized:  # bitsandbytes quantizes while loading onto the GPU
        return "device"
    return "cpu" if rank == 0 or not rank0_only else "meta"


def build_model(plan, spec, model_dir: Path, device: torch.device, log: Callable[[str], None] = print,
                place: str = "device"):
    """The model ready to train: base loaded in the plan's dtype, method applied, only the right
    parameters trainable. Returns (model, base_model) where base_model is the transformers model.
    place: see loading_place."""
    from transformers import AutoConfig, AutoModelForCausalLM

    on_cuda = device.type == "cuda"
    weight_dtype = DTYPES[plan.weight_dtype] if plan_dtypes_on(on_cuda) else torch.float32
    trust = spec.model.trust_remote_code
    attention = attention_for(model_dir, trust)
    kw: dict = dict(dtype=weight_dtype, attn_implementation=attention, trust_remote_code=trust)

    if registry.method(plan.method).quantized:
        if not bitsandbytes_on(on_cuda):
            raise BadConfig("method.type qlora needs a CUDA GPU (bitsandbytes 4/8-bit kernels); this trainer runs on CPU. "
                            "Use method.type lora, or give the job resources.gpusPerNode >= 1")
        from transformers import BitsAndBytesConfig

        compute = DTYPES[plan.compute_dtype] if plan.compute_dtype != "fp32" else torch.bfloat16
        if plan.quant_bits == 4:
            # FSDP flattens a block's packed 4-bit weights with its norms into one tensor of one dtype:
            # stored as the norms' dtype (same bytes; on a GPU the compute dtype), they can be (the
            # FSDP-QLoRA recipe).
            storage = weight_dtype if plan.sharding == "fsdp" else torch.uint8
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=plan.quant_type or "nf4",
                                   bnb_4bit_use_double_quant=plan.double_quant, bnb_4bit_compute_dtype=compute,
                                   bnb_4bit_quant_storage=storage)
        else:
            q = BitsAndBytesConfig(load_in_8bit=True)
        kw.update(quantization_config=q, device_map={"": device.index or 0} if on_cuda else {"": "cpu"})
    elif place == "device":
        # Straight onto this process's device, tensor by tensor. Read into host memory first, every
        # process of a node would hold the whole model there at once (DDP on 8 GPUs, an 8B model:
        # 8 x 16 GB of host RAM), which is what gets trainer pods OOM-killed before the first step.
        kw["device_map"] = {"": device.index or 0} if on_cuda else {"": "cpu"}

    has_weights = any(p.suffix in WEIGHT_FILES for p in model_dir.iterdir())
    random_init = not has_weights and knobs.current().allow_random_init
    if place != "meta" and not has_weights and not random_init:
        hub = spec.model.uri.startswith("hf://")
        raise ModelLoadFailed(f"{spec.model.uri}: no weight files (*.safetensors or *.bin) beside config.json" + (
            "; from the Hub only *.safetensors are downloaded (a pickled .bin can run code when loaded): use a "
            "revision with safetensors weights, or convert it and give an s3:// copy" if hub else ""))
    try:
        if place == "meta" or random_init:
            cfg = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust)
            if random_init and place != "meta":
                # benchmarks and estimator calibration: real dims, random weights, no download
                log(f"no weight files in {model_dir}: random init from config.json (KUBETUNE_ALLOW_RANDOM_INIT=1)")
            with torch.device("meta" if place == "meta" else "cpu" if place == "cpu" else device):
                model = AutoModelForCausalLM.from_config(cfg, dtype=weight_dtype, attn_implementation=attention,
                                                         trust_remote_code=trust)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kw)
    except (BadConfig, ModelLoadFailed):
        raise
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        if "CUDA" in str(e):
            raise  # a GPU fault, not the model: Error, which the Job retries (maybe on another node)
        try:
            found = weight_problems(model_dir, trust)
        except Exception:  # the diagnosis is a courtesy; transformers' line stands without it
            found = []
        detail = "; ".join(found) if found else _short(e)
        raise ModelLoadFailed(f"cannot load the model from {spec.model.uri}: {detail}") from None
    model.config.use_cache = False
    # Before peft wraps the modules, so the patched norms and MLPs are the ones the adapters sit in.
    model.kubetune_fused_kernels = apply_fused_kernels(model) if plan.fused_kernels and liger_on(on_cuda) else []
    if model.kubetune_fused_kernels:
        log(f"Liger kernels: {', '.join(model.kubetune_fused_kernels)}")
    if registry.method(plan.method).quantized and not on_cuda:
        # bitsandbytes repacks a CPU Linear4bit for inference the first time it runs in eval mode (our
        # evaluations), and its matmul on the repacked weight has no backward: later training steps
        # would stop propagating gradients through the base weights.
        for mod in model.modules():
            if hasattr(mod, "support_avx512bf16_for_cpu"):
                mod.support_avx512bf16_for_cpu = False

    for p in model.parameters():
        p.requires_grad_(False)

    info = registry.method(plan.method)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if info.adapter:
            # inputs of the first checkpointed block must require grad when the embeddings are frozen
            model.enable_input_require_grads()

    if info.trains_all:
        for p in model.parameters():
            p.requires_grad_(True)
        return model, model

    if info.settings == "freeze":
        layers = decoder_layers(model)
        k = plan.trainable_layers or 0
        if k > len(layers):
            raise BadConfig(f"method.freeze.trainableLayers is {k} but the model has only {len(layers)} blocks")
        for layer in list(layers)[len(layers) - k:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        if plan.train_embeddings:
            for mod in (model.get_input_embeddings(), model.get_output_embeddings()):
                if mod is not None:
                    for p in mod.parameters():
                        p.requires_grad_(True)
        return model, model

    from peft import get_peft_model

    if info.peft_type not in PEFT_CONFIGS:
        raise BadConfig(f"method {plan.method!r} names no peft adapter the trainer builds (peft_type {info.peft_type})")
    cfg = PEFT_CONFIGS[info.peft_type](plan)
    try:
        peft_model = get_peft_model(model, cfg, autocast_adapter_dtype=(plan.adapter_dtype == "fp32"))
    except ValueError as e:
        raise BadConfig(f"cannot apply {plan.method}: {_short(e)}") from None
    if info.virtual_tokens_in:
        # peft creates the prompt encoder in the default dtype; the plan says adapters are fp32
        for p in peft_model.parameters():
            if p.requires_grad:
                p.data = p.data.to(DTYPES[plan.adapter_dtype] if plan_dtypes_on(on_cuda) else torch.float32)
    return peft_model, model


def _lora_config(plan):
    from peft import LoraConfig

    targets = list(plan.lora_targets)
    # QLoRA: peft's prepare_model_for_kbit_training would upcast every non-quantized weight to fp32; the
    # plan (and the estimator) keep them in the compute dtype, so only what it needs is done: everything
    # frozen and input grads for checkpointing (build's).
    return LoraConfig(r=plan.lora_rank, lora_alpha=plan.lora_alpha, lora_dropout=plan.lora_dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM",
                      bias="none")


def _prompt_tuning_config(plan):
    from peft import PromptTuningConfig, PromptTuningInit

    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=plan.virtual_tokens,
                              prompt_tuning_init=PromptTuningInit.RANDOM)


def _prefix_tuning_config(plan):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=plan.virtual_tokens)


# The peft config of each adapter method, by the registry's peft_type (kubetune.api.registry.MethodInfo)
PEFT_CONFIGS = {"LORA": _lora_config, "PROMPT_TUNING": _prompt_tuning_config, "PREFIX_TUNING": _prefix_tuning_config}


def materialized_bytes(model) -> int:
    """Bytes this process holds for the model: parameters, buffers and bitsandbytes' quantization
    constants (a 4-bit weight's absmax and nested state, an int8 weight's row scales), which live on
    the weight tensor itself rather than as parameters or buffers. Meta tensors hold none."""
    seen: dict[int, torch.Tensor] = {}  # holds what it saw: as_dict's new tensors must not free their ids
    n = 0

    def add(t) -> None:
        nonlocal n
        if torch.is_tensor(t) and not t.is_meta and id(t) not in seen:
            seen[id(t)] = t
            n += t.numel() * t.element_size()

    for t in (*model.parameters(), *model.buffers()):
        add(t)
        if getattr(t, "quant_state", None) is not None:
            for v in t.quant_state.as_dict(packed=True).values():
                add(v)
        add(getattr(t, "SCB", None))
    return n


def count_params(model) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") or p.dtype == torch.uint8:  # bnb packs 4-bit weights into its storage dtype
            n *= 2 * p.element_size()
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


# ---------------------------------------------------------------------------------------------
# the loss


class _ChunkedLinearCE(torch.autograd.Function):
    """Summed cross-entropy of (h @ W.T + b) without storing the logits: each chunk of rows computes
    its logits, loss and gradients in the forward pass (as Liger does on GPU)."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, chunk_rows: int):
        valid = (labels != IGNORE).nonzero(as_tuple=True)[0]
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.zeros_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, valid.numel(), chunk_rows):
            rows = valid[i:i + chunk_rows]
            hc = h.index_select(0, rows)
            y = labels.index_select(0, rows)
            logits = (hc @ weight.t()).float()
            if bias is not None:
                logits = logits + bias.float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            g = torch.softmax(logits, dim=-1)
            g[torch.arange(rows.numel(), device=h.device), y] -= 1.0
            grad_h.index_copy_(0, rows, (g.to(weight.dtype) @ weight).to(h.dtype))
            if need_w:
                grad_w += g.t() @ hc.float()
            if need_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, *(t for t in (grad_w, grad_b) if t is not None))
        ctx.has = (need_w, need_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad_out
        need_w, need_b = ctx.has
        gw = (saved.pop(0) * grad_out).to(ctx.dtypes[0]) if need_w else None
        gb = (saved.pop(0) * grad_out).to(ctx.dtypes[1]) if need_b else None
        return grad_h, gw, gb, None, None


def chunked_linear_ce(h, weight, bias, labels, chunk_rows: int | None = None):
    if chunk_rows is None:
        chunk_rows = max(16, (256 * 2**20) // (4 * weight.shape[0]))  # ~256 MiB of fp32 logits a chunk
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if needs_grad:
        return _ChunkedLinearCE.apply(h, weight, bias, labels, chunk_rows)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    valid = (labels != IGNORE).nonzero(as_tuple=True)[0]
    for i in range(0, valid.numel(), chunk_rows):
        rows = valid[i:i + chunk_rows]
        logits = (h.index_select(0, rows) @ weight.t()).float()
        if bias is not None:
            logits = logits + bias.float()
        total += F.cross_entropy(logits, labels.index_select(0, rows), reduction="sum")
    return total


class LossHead:
    """Makes ``model(...)`` return the summed token loss in ``.logits`` while ``labels`` is set.

    mode "fused": the output head computes the loss from hidden states (Liger on CUDA, chunked torch
    on CPU); "logits": the head computes full logits and the loss is taken from them (fusedCrossEntropy
    off, an adapted head, or models that transform logits after the head, e.g. soft-capping).

    Under ``computing_sequence_nll(labels)`` the loss is instead a [rows] tensor: each row's summed
    token NLL over its labelled tokens (preference objectives need one log-prob per sequence), still
    without an [rows, tokens, vocab] logits tensor in fused mode.
    """

    def __init__(self, model, base_model, fused: bool, device: torch.device, impl: str | None = None):
        self.labels: torch.Tensor | None = None
        self.per_sequence = False  # loss_from gives [rows] summed NLL instead of one sum
        self.head = base_model.get_output_embeddings()
        softcap = getattr(base_model.config, "final_logit_softcapping", None)
        plain = type(self.head) is torch.nn.Linear
        self.mode = "fused" if fused and plain and softcap is None else "logits"
        impl = impl or os.environ.get("KUBETUNE_FUSED_CE_IMPL") or ("liger" if liger_on(device.type == "cuda") else "torch")
        self.impl = impl if self.mode == "fused" else "none"
        self._liger = None
        self._liger_tokens = None  # reduction="none", for computing_sequence_nll; made on first use
        if self.impl == "liger":
            try:
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

                self._liger = LigerFusedLinearCrossEntropyLoss(reduction="sum", ignore_index=IGNORE)
            except ImportError:
                self.impl = "torch"
        self._orig = self.head.forward
        if self.mode == "fused":
            self.head.forward = self._fused_forward

    def _labels_for(self, hidden_len: int) -> torch.Tensor:
        y = self.labels
        if y.shape[1] < hidden_len:  # prompt tuning prepends virtual tokens
            pad = torch.full((y.shape[0], hidden_len - y.shape[1]), IGNORE, dtype=y.dtype, device=y.device)
            y = torch.cat([pad, y], dim=1)
        return y

    def _fused_forward(self, hidden):
        if self.labels is None:
            return self._orig(hidden)
        if self.per_sequence:
            return self._sequence_nll_fused(hidden)
        y = self._labels_for(hidden.shape[1]).reshape(-1)
        h = hidden.reshape(-1, hidden.shape[-1])
        if self._liger is not None:
            return self._liger(self.head.weight, h, y, self.head.bias)
        return chunked_linear_ce(h, self.head.weight, self.head.bias, y)

    def loss_from(self, output) -> torch.Tensor:
        logits = output.logits if hasattr(output, "logits") else output[0]
        if self.mode == "fused":
            return logits
        y = self._labels_for(logits.shape[1])
        if self.per_sequence:
            tok = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                                  reduction="none")
            return tok.view(y.shape).sum(1)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE, reduction="sum")

    @contextlib.contextmanager
    def computing_loss(self, labels: torch.Tensor):
        self.labels = labels
        try:
            yield
        finally:
            self.labels = None

    @contextlib.contextmanager
    def computing_sequence_nll(self, labels: torch.Tensor):
        """``loss_from`` gives each row's summed NLL over its labelled tokens ([rows], fp32, with grad
        when grad is enabled): a sequence's log-prob is its negative; its token count is (labels != IGNORE)."""
        self.labels, self.per_sequence = labels, True
        try:
            yield
        finally:
            self.labels, self.per_sequence = None, False

    def _sequence_nll_fused(self, hidden) -> torch.Tensor:
        y = self._labels_for(hidden.shape[1])
        rows = y.shape[0]
        h, yy = hidden.reshape(-1, hidden.shape[-1]), y.reshape(-1)
        if self.impl == "liger":
            # Liger >= 0.8.5 recomputes its chunks in the backward for reduction="none", where the
            # per-token upstream gradient is known (an unscaled gradient could not be fixed afterwards).
            if self._liger_tokens is None:
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

                self._liger_tokens = LigerFusedLinearCrossEntropyLoss(reduction="none", ignore_index=IGNORE)
            tok = self._liger_tokens(self.head.weight, h, yy, self.head.bias)
        else:
            tok = chunked_linear_token_nll(h, self.head.weight, self.head.bias, yy)
        return tok.float().view(rows, -1).sum(1)

    @contextlib.contextmanager
    def unpatched(self):
        """The head's own forward for a while: a deep copy of the model must not carry this object's hook."""
        self.restore()
        try:
            yield
        finally:
            if self.mode == "fused":
                self.head.forward = self._fused_forward

    def restore(self) -> None:
        self.head.forward = self._orig


class _ChunkedLinearTokenNLL(torch.autograd.Function):
    """Per-token cross-entropy of (h @ W.T + b), 0 where the label is IGNORE, without storing the logits.

    Unlike _ChunkedLinearCE (one scalar, so its gradients can be finished in the forward), each token's
    upstream gradient differs here (each sequence's log-prob is weighted by its own loss term), and the
    head's weight gradient sums over tokens, so it cannot be rescaled afterwards: the backward recomputes
    each chunk's logits (as Liger does for reduction="none"). One more head matmul per token, no more memory.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, labels, chunk_rows: int):
        out, valid = _token_nll(h, weight, bias, labels, chunk_rows)
        ctx.save_for_backward(h, weight, bias, labels, valid)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, labels, valid = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for i in range(0, valid.numel(), ctx.chunk_rows):
            rows = valid[i:i + ctx.chunk_rows]
            hc = h.index_select(0, rows)
            g = torch.softmax(_chunk_logits(hc, weight, bias), dim=-1)
            g[torch.arange(rows.numel(), device=h.device), labels.index_select(0, rows)] -= 1.0
            g *= grad_out.index_select(0, rows).float()[:, None]
            if need_h:
                grad_h.index_copy_(0, rows, (g.to(weight.dtype) @ weight).to(h.dtype))
            if need_w:
                grad_w += g.t() @ hc.float()
            if need_b:
                grad_b += g.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None)


def _token_nll(h, weight, bias, labels, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    valid = (labels != IGNORE).nonzero(as_tuple=True)[0]
    out = torch.zeros(labels.shape[0], dtype=torch.float32, device=h.device)
    for i in range(0, valid.numel(), chunk_rows):
        rows = valid[i:i + chunk_rows]
        logits = _chunk_logits(h.index_select(0, rows), weight, bias)
        y = labels.index_select(0, rows)
        out.index_copy_(0, rows, torch.logsumexp(logits, -1) - logits.gather(1, y[:, None]).squeeze(1))
    return out, valid


def _chunk_logits(hc, weight, bias):
    logits = (hc @ weight.t()).float()
    return logits + bias.float() if bias is not None else logits


def chunked_linear_token_nll(h, weight, bias, labels, chunk_rows: int | None = None):
    """[tokens] NLL of each labelled token (0 elsewhere); gradients flow to h, weight and bias."""
    if chunk_rows is None:
        chunk_rows = max(16, (256 * 2**20) // (4 * weight.shape[0]))  # ~256 MiB of fp32 logits a chunk, as above
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if needs_grad:
        return _ChunkedLinearTokenNLL.apply(h, weight, bias, labels, chunk_rows)
    with torch.no_grad():
        return _token_nll(h, weight, bias, labels, chunk_rows)[0]
