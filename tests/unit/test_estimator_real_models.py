"""The estimator against real (tiny) models that transformers and peft build from the same config.

Parameter and trainable-parameter counts must be exact for every family and method; saved-activation
bytes per token per block must equal what autograd really keeps (measured with saved-tensor hooks on
CPU) for the families whose CPU kernels lay tensors out as CUDA's do. Slow: importing torch,
transformers and peft takes most of the time.
"""
from __future__ import annotations

import pytest

from kubetune.estimator import from_config, plan_from_flags
from kubetune.estimator import memory as M

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]
torch = transformers = peft = None  # imported by the autouse fixture: collection stays fast


@pytest.fixture(scope="module", autouse=True)
def _heavy_imports():
    global torch, transformers, peft
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    transformers.logging.set_verbosity_error()

H = dict(hidden_size=64, num_attention_heads=4, intermediate_size=160, vocab_size=500)
CONFIGS = {
    "llama": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=False, **H),
    "llama-tied-bias": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                            mlp_bias=True, **H),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, **H),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, **H),
    "qwen3": dict(model_type="qwen3", num_key_value_heads=2, head_dim=32, **H),
    "gemma2": dict(model_type="gemma2", num_key_value_heads=2, head_dim=16, **H),
    "gemma3_text": dict(model_type="gemma3_text", num_key_value_heads=2, head_dim=16, **H),
    "phi3": dict(model_type="phi3", num_key_value_heads=2, pad_token_id=0, **H),
    "gpt_neox": dict(model_type="gpt_neox", **H),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_head=4, vocab_size=500, n_positions=128),
    "bert": dict(model_type="bert", is_decoder=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **H),
    "mixtral": dict(model_type="mixtral", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                    hidden_size=64, num_attention_heads=4, intermediate_size=96, vocab_size=500),
    "qwen2_moe": dict(model_type="qwen2_moe", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=48, shared_expert_intermediate_size=80, **H),
    "qwen3_moe": dict(model_type="qwen3_moe", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=48, head_dim=16, **H),
}
LORA_SKIP: set[str] = set()


def _cfg(name: str, layers: int = 2) -> dict:
    d = dict(CONFIGS[name])
    d["n_layer" if name == "gpt2" else "num_hidden_layers"] = layers
    return d


def _build(d: dict):
    cfg = transformers.AutoConfig.for_model(**d)
    torch.manual_seed(0)
    attn = "eager" if d["model_type"] == "gemma2" else "sdpa"
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.bfloat16)
    m.config.use_cache = False  # as the trainer sets it (with a cache, packed rows get no mask)
    return m


def _n(model, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


@pytest.fixture(scope="module")
def models():
    return {n: _build(_cfg(n)) for n in CONFIGS}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_total_params(models, name):
    assert from_config(_cfg(name)).total_params == _n(models[name])


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - LORA_SKIP))
def test_lora_all_linear_and_named_targets(name):
    arch = from_config(_cfg(name))
    pm = peft.get_peft_model(_build(_cfg(name)), peft.LoraConfig(r=4, target_modules="all-linear"))
    assert arch.lora_params(("all-linear",), 4) == _n(pm, trainable=True)
    first = sorted(m.name for _, b in arch.blocks for m in b.linears)[:2]
    pm = peft.get_peft_model(_build(_cfg(name)), peft.LoraConfig(r=8, target_modules=first))
    assert arch.lora_params(tuple(first), 8) == _n(pm, trainable=True)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3_text", "phi3", "gpt_neox", "gpt2", "qwen2_moe"])
def test_freeze_top_k(name):
    d = _cfg(name, layers=3)
    arch = from_config(d)
    p = plan_from_flags(method="freeze", micro_batch_size=1, seq_len=8, trainable_layers=1)
    m = _build(d)
    blocks = [mod for mod in m.modules() if isinstance(mod, torch.nn.ModuleList)][0]
    for prm in m.parameters():
        prm.requires_grad = False
    for prm in blocks[-1].parameters():
        prm.requires_grad = True
    assert M.estimate(arch, p).trainable_params == _n(m, trainable=True)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "phi3", "gpt_neox", "gpt2"])
def test_prompt_and_prefix_tuning(name):
    arch = from_config(_cfg(name))
    for method, conf in (("prompt-tuning", peft.PromptTuningConfig), ("prefix-tuning", peft.PrefixTuningConfig)):
        pm = peft.get_peft_model(_build(_cfg(name)), conf(task_type="CAUSAL_LM", num_virtual_tokens=8))
        est = M.estimate(arch, plan_from_flags(method=method, micro_batch_size=1, seq_len=8, virtual_tokens=8))
        assert est.trainable_params == _n(pm, trainable=True), method


# ---- saved activations -------------------------------------------------------------------------------


def _saved_bytes(model, b: int, s: int, autocast: bool, packed: bool = False) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(0, 500, (b, s))
    # packed as the trainer packs: two sequences per row, told apart by position_ids alone
    extra = {"position_ids": torch.cat([torch.arange(s // 2), torch.arange(s - s // 2)]).expand(b, s)} if packed else {}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=ids, labels=ids, **extra)
    return sum(seen.values())


def _two_and_three_layers(name: str, method: str) -> dict:
    built = {}
    for layers in (2, 3):
        m = _build(_cfg(name, layers))
        if method == "lora":
            m = peft.get_peft_model(m, peft.LoraConfig(r=8, target_modules="all-linear"))
        built[layers] = m.train()
    return built


def _per_token_per_block(name: str, method: str, autocast: bool, b: int = 2, s: int = 40,
                         packed: bool = False) -> float:
    """Bytes per token of one more block: differences over layers and over sequence length remove the
    per-model and per-layer constants (embeddings, loss, autocast weight copies)."""
    built = _two_and_three_layers(name, method)
    per = [(_saved_bytes(built[3], b, seq, autocast, packed) - _saved_bytes(built[2], b, seq, autocast, packed))
           / (b * seq) for seq in (s, 2 * s)]
    return 2 * per[1] - per[0]


# CPU autocast casts linear/SDPA like CUDA's; RMSNorm families match exactly. LayerNorm families are
# compared without autocast (CPU autocast does not upcast layer_norm as CUDA's does).
ACTIVATION_CASES = [
    ("llama", "full", True), ("llama", "lora", True), ("llama", "lora", False), ("qwen3", "lora", True),
    ("gemma3_text", "full", True), ("phi3", "lora", True), ("mixtral", "full", True), ("mixtral", "lora", True),
    ("gpt_neox", "lora", False), ("bert", "full", False),
]


@pytest.mark.parametrize("name,method,autocast", ACTIVATION_CASES)
def test_block_activation_bytes_equal_autograd_saved_tensors(name, method, autocast):
    measured = _per_token_per_block(name, method, autocast)
    arch = from_config(_cfg(name))
    plan = plan_from_flags(method=method, micro_batch_size=2, seq_len=40, lora_rank=8)
    blk = arch.blocks[0][1]
    est = M._block_bytes(arch, blk, M._ctx_for(arch, plan, blk, method == "full", autocast))
    # exact but for peft's MoE ParamWrapper (router input handling differs by a few bytes a token)
    tol = 0.01 * measured if (name, method) == ("mixtral", "lora") else 1.0
    assert est == pytest.approx(measured, abs=tol), (name, method, autocast, est, measured)


@pytest.mark.parametrize("name,method", [("llama", "lora"), ("qwen3", "full")])
@pytest.mark.parametrize("s", [40, 80])
def test_packing_saves_what_the_estimate_says(name, method, s):
    """Packed rows carry position_ids and no attention mask; transformers then builds a block-diagonal
    mask, SDPA keeps an additive copy of it per block (s^2, so compared at each length rather than
    extrapolated) and repeats k/v per head (no native GQA). The estimate prices all of it."""
    built = _two_and_three_layers(name, method)
    per_block = {packed: (_saved_bytes(built[3], 2, s, True, packed) - _saved_bytes(built[2], 2, s, True, packed))
                 / (2 * s) for packed in (False, True)}
    assert per_block[True] > per_block[False]
    arch = from_config(_cfg(name))
    blk = arch.blocks[0][1]
    est = {}
    for packed in (False, True):
        plan = plan_from_flags(method=method, micro_batch_size=2, seq_len=s, lora_rank=8, packing=packed)
        est[packed] = M._block_bytes(arch, blk, M._ctx_for(arch, plan, blk, method == "full", True))
    assert est[True] - est[False] == pytest.approx(per_block[True] - per_block[False], abs=1.0), (est, per_block)
