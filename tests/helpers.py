"""Test helpers: tiny models, batches, and brute-force references (one backward per sequence)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from gradproj.integrations.torch import token_logprobs

VOCAB = 40


def tiny_hf(arch: str = "qwen2", seed: int = 0, dtype=torch.float64, layers: int = 2, hidden: int = 32):
    """A tiny random Qwen2- or Llama-shaped causal LM (untied lm_head, SDPA attention)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0,
        max_position_embeddings=128,
    )
    if arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    else:
        raise ValueError(arch)
    config._attn_implementation = "sdpa"  # eager gives NaN rows for float64 + left padding (transformers 5.23)
    model = cls(config).to(dtype)
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            _keep_dtype_rmsnorm(module)
    return model


def _keep_dtype_rmsnorm(module):
    """HF RMSNorms round through float32 even in a float64 model; keep the model's dtype so the
    float64 brute force really is float64."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))

    def forward(hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return module.weight * (hidden_states * torch.rsqrt(variance + eps))

    module.forward = forward


def linear_only(model: nn.Module) -> nn.Module:
    """Freeze everything but nn.Linear weights/biases (embeddings and norms frozen)."""
    for module in model.modules():
        trainable = isinstance(module, nn.Linear)
        for p in module.parameters(recurse=False):
            p.requires_grad_(trainable)
    return model


def with_lora(model: nn.Module, r: int = 4, seed: int = 0):
    """peft LoRA on every projection, with random (non-zero) B so every adapter has a gradient."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, cfg)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.float64) if p.dtype != next(model.parameters()).dtype else p.data
    return model


def padded_batch(k: int, prompt_lens, resp_lens, seed: int, device="cpu"):
    """Rows laid out like TRL: left-padded prompt, then response, then right padding.

    Returns input_ids (k, T), attention_mask (k, T), response_mask aligned with logp (k, T-1).
    """
    g = torch.Generator().manual_seed(seed)
    p_max, r_max = max(prompt_lens), max(resp_lens)
    T = p_max + r_max
    ids = torch.zeros(k, T, dtype=torch.long)
    attn = torch.zeros(k, T, dtype=torch.long)
    resp = torch.zeros(k, T, dtype=torch.long)
    for i in range(k):
        p, r = prompt_lens[i], resp_lens[i]
        start = p_max - p
        ids[i, start : p_max + r] = torch.randint(1, VOCAB, (p + r,), generator=g)
        attn[i, start : p_max + r] = 1
        resp[i, p_max : p_max + r] = 1
    return ids, attn, resp[:, 1:].bool()


def grpo_coefficients(advantages: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """c_i of the token-mean loss ``-(A_i * logp * mask).sum() / mask.sum() * scale``."""
    return -advantages.double() * scale / mask.sum().clamp(min=1).double()


def grpo_loss(logp, mask, advantages, scale: float):
    """Token-mean REINFORCE/GRPO loss (on-policy: ratio 1, so no clipping effect)."""
    return -(advantages[:, None].to(logp.dtype) * logp * mask).sum() / mask.sum().clamp(min=1) * scale


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def sequence_gradients(model, logp, mask):
    """Brute force: one backward per sequence -> {name: (k, numel) float64}."""
    named = trainable(model)
    params = [p for _, p in named]
    rows = []
    for i in range(logp.shape[0]):
        grads = torch.autograd.grad((logp[i] * mask[i]).sum(), params, retain_graph=True, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
    return {n: torch.stack([r[j].reshape(-1).double() for r in rows]) for j, (n, _) in enumerate(named)}


def reference_update(G, S, c, *, strategy="proma", damping=None, relative_bound=None, shrinkage=1.0,
                     projector="solve", sweeps=2):
    """The SPEC 2.1/2.2 update in flattened float64 space, written independently of gradproj."""
    g_m = c @ S
    if strategy == "none" or G is None:
        return g_m.clone() if G is None else G + g_m
    if projector == "solve":
        K = S @ S.T
        lam = 1e-6 * K.diagonal().mean() if damping is None else damping
        if float(K.diagonal().max()) == 0.0:
            proj = torch.zeros_like(G)
        elif lam > 0:
            beta = torch.linalg.solve(K + lam * torch.eye(len(c), dtype=K.dtype), S @ G)
            proj = S.T @ beta
        else:  # exact orthogonal projector onto span{s_i} via SVD
            U, s, _ = torch.linalg.svd(S.T, full_matrices=False)
            U = U[:, s > s.max() * 1e-10]
            proj = U @ (U.T @ G)
    else:
        cur = G.clone()
        for _ in range(sweeps):
            for j in range(S.shape[0]):
                n = S[j].norm()
                if n > 0:
                    sh = S[j] / n
                    cur = cur - (cur @ sh) * sh
        proj = G - cur
    if relative_bound is not None and proj.norm() > relative_bound * g_m.norm():
        proj = proj * (relative_bound * g_m.norm() / proj.norm())
    return G - shrinkage * proj + g_m


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are exactly zero)."""
    diff = float((a - b).norm())
    return 0.0 if diff == 0.0 else diff / max(float(b.norm()), 1e-300)


class TinyLM(nn.Module):
    """A small causal LM built from plain modules (fast enough for property tests).

    Positions interact through a causal running mean, so every output-gradient row depends on
    later tokens. ``reuse=True`` calls ``fc2`` twice per forward (a module used more than once).
    """

    def __init__(self, d: int = 12, reuse: bool = False, seed: int = 0, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, d)
        self.emb.weight.requires_grad_(False)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, 2 * d, bias=False)
        self.head = nn.Linear(2 * d, VOCAB)
        self.reuse = reuse
        self.to(dtype)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        from types import SimpleNamespace

        x = self.emb(input_ids)
        m = torch.ones_like(input_ids, dtype=x.dtype) if attention_mask is None else attention_mask.to(x.dtype)
        x = torch.cumsum(x * m[..., None], 1) / torch.cumsum(m, 1).clamp(min=1)[..., None]
        return SimpleNamespace(logits=self.head(self.hidden(x)))

    def hidden(self, x):
        """The trainable middle of the network (subclasses change it)."""
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.fc2(h))
        if self.reuse:
            h = h + torch.tanh(self.fc2(h))
        return h


def run_microbatches(model, opt, microbatches, scale=None, ref=None):
    """Run ``microbatches`` through ``opt`` and, if ``ref`` is given, the brute-force reference.

    ``microbatches``: list of (input_ids, attention_mask, response_mask, advantages).
    ``ref``: keyword arguments of `reference_update`. Returns {name: relative error}.
    """
    scale = 1.0 / len(microbatches) if scale is None else scale
    G = {n: None for n, _ in trainable(model)}
    for ids, attn, mask, adv in microbatches:
        if ref is not None:
            with opt.paused():
                S = sequence_gradients(model, token_logprobs(model, ids, attn), mask)
            c = grpo_coefficients(adv, mask, scale)
            for n in G:
                G[n] = reference_update(G[n], S[n], c, **ref)
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, scale).backward()
    if ref is None:
        return {}
    params = dict(trainable(model))
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in params.items()}
    return {n: rel_err(grads[n].reshape(-1).double(), G[n]) for n in G}


def make_microbatches(count=3, k=4, seed=0):
    """Padded microbatches (left and right padding) with some exactly-zero advantages."""
    out = []
    g = torch.Generator().manual_seed(seed)
    for m in range(count):
        prompt = torch.randint(1, 6, (k,), generator=g).tolist()
        resp = torch.randint(1, 6, (k,), generator=g).tolist()
        ids, attn, mask = padded_batch(k, prompt, resp, seed=seed * 100 + m)
        adv = torch.randn(k, generator=g, dtype=torch.float64)
        adv[m % k] = 0.0
        out.append((ids, attn, mask, adv))
    return out


def _rms(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@contextlib.contextmanager
def float64_exact_norms():
    """HF RMSNorms round through float32 even for float64 inputs; patch the *classes* (so the
    handlers still accept the modules) with dtype-preserving forwards for exact brute force."""
    import transformers.models.gemma3.modeling_gemma3 as g3
    import transformers.models.llama.modeling_llama as ll
    import transformers.models.qwen2.modeling_qwen2 as q2
    import transformers.models.qwen3.modeling_qwen3 as q3

    def llama_like(self, hidden_states):
        return self.weight * _rms(hidden_states, self.variance_epsilon)

    def gemma(self, x):
        return _rms(x, self.eps) * (1.0 + self.weight)

    patches = [(ll.LlamaRMSNorm, llama_like), (q2.Qwen2RMSNorm, llama_like), (q3.Qwen3RMSNorm, llama_like),
               (g3.Gemma3RMSNorm, gemma)]
    saved = [(cls, cls.forward) for cls, _ in patches]
    try:
        for cls, fn in patches:
            cls.forward = fn
        yield
    finally:
        for cls, fn in saved:
            cls.forward = fn


def tiny_full(arch: str, seed: int = 0, train_embeddings: bool = False, tie: bool = False):
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=tie, pad_token_id=0, max_position_embeddings=128)
    if arch == "gemma3":
        cfg, cls = transformers.Gemma3TextConfig(head_dim=8, sliding_window=16, **common), transformers.Gemma3ForCausalLM
    elif arch == "qwen3":
        cfg, cls = transformers.Qwen3Config(head_dim=8, **common), transformers.Qwen3ForCausalLM
    elif arch == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif arch in ("mistral", "phi3", "olmo2", "smollm3"):
        names = {"mistral": "Mistral", "phi3": "Phi3", "olmo2": "Olmo2", "smollm3": "SmolLM3"}
        cfg = getattr(transformers, f"{names[arch]}Config")(bos_token_id=1, eos_token_id=2, **common)
        cls = getattr(transformers, f"{names[arch]}ForCausalLM")
    else:
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    cfg._attn_implementation = "sdpa"
    model = cls(cfg).double()
    for name, p in model.named_parameters():
        p.requires_grad_(train_embeddings or "embed_tokens" not in name)  # full fine-tuning
        if "norm" in name:  # non-trivial norm weights (Gemma's start at 0, Llama's at 1)
            with torch.no_grad():
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_char_model(tok, seed: int = 0, hidden: int = 16):
    """A tiny random Llama over the demo's character tokenizer (fast CLI and rollout tests)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


@contextlib.contextmanager
def poisoned_output_grads(module: nn.Module, poison):
    """While open, ``poison(grad)`` replaces the gradient of ``module``'s output in the backward
    (e.g. puts a NaN into one layer's output gradients while the log-prob gradients stay finite)."""

    def on_forward(_module, _inputs, out):
        out.register_hook(poison)  # returns None: the output itself is unchanged

    handle = module.register_forward_hook(on_forward)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def registered_strategy(name: str, cls, options=None):
    """While open, ``cls`` is registered as strategy ``name`` by a plugin module (as a third-party
    package would register it); unregistered afterwards."""
    import types

    import gradproj
    from gradproj.plugins.manager import refresh_registry

    plugin = types.ModuleType(f"gradproj_{name}_plugin")

    @gradproj.hookimpl
    def gradproj_strategies():
        return [gradproj.StrategySpec(name, cls, options or gradproj.StrategyOptions)]

    plugin.gradproj_strategies = gradproj_strategies
    manager = gradproj.get_plugin_manager()
    manager.register(plugin, name=name)
    refresh_registry()
    try:
        yield
    finally:
        manager.unregister(name=name)
        refresh_registry()


@contextlib.contextmanager
def exact_norms(model):
    """HF norms round through float32 even for float64 inputs; while open, the classes of the model's
    recognised norms compute their own form (offset, bias) in the input's dtype, for an exact float64
    brute force -- recognised by structure, as the handler does."""
    from gradproj.capture.norm_probe import normalise, recognise_norm

    forms = {}
    for module in model.modules():
        form = recognise_norm(module) if type(module) is not nn.LayerNorm else None
        if form is not None:
            forms.setdefault(type(module), form)

    def exact(form):
        def forward(self, x):
            out = (normalise(form.kind, x, getattr(self, form.eps)) * (form.offset + self.weight)).to(x.dtype)
            bias = getattr(self, "bias", None)
            return out if bias is None else out + bias

        return forward

    saved = {cls: cls.forward for cls in forms}
    try:
        for cls, form in forms.items():
            cls.forward = exact(form)
        yield forms
    finally:
        for cls, forward in saved.items():
            cls.forward = forward


#: MoE families of transformers used by the MoE tests (tiny configs below)
MOE_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss")


def tiny_moe(arch: str, seed: int = 0, experts: int = 4, top_k: int = 2):
    """A tiny random float64 MoE model of transformers' ``arch`` (fused 3-D experts, eager expert
    loop: torch's grouped_mm has no float64), every parameter trainable except the input embedding
    routers, biases, norms and gpt-oss's attention sinks perturbed so that none is trivial."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  pad_token_id=0, max_position_embeddings=128, tie_word_embeddings=False)
    if arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(head_dim=8, num_experts=experts, num_experts_per_tok=top_k,
                                          moe_intermediate_size=16, intermediate_size=48, **common)
        cls = transformers.Qwen3MoeForCausalLM
    elif arch == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=24, intermediate_size=48, **common)
        cls = transformers.Qwen2MoeForCausalLM
    elif arch == "mixtral":
        cfg = transformers.MixtralConfig(num_local_experts=experts, num_experts_per_tok=top_k, intermediate_size=24, **common)
        cls = transformers.MixtralForCausalLM
    elif arch == "olmoe":
        cfg = transformers.OlmoeConfig(num_experts=experts, num_experts_per_tok=top_k, intermediate_size=24,
                                       bos_token_id=1, eos_token_id=2, **common)
        cls = transformers.OlmoeForCausalLM
    elif arch == "gpt_oss":
        cfg = transformers.GptOssConfig(num_local_experts=experts, num_experts_per_tok=top_k, head_dim=8,
                                        intermediate_size=24, **common)
        cls = transformers.GptOssForCausalLM
    else:
        raise ValueError(arch)
    cfg._attn_implementation = "eager" if arch == "gpt_oss" else "sdpa"  # gpt-oss's sinks need eager
    cfg._experts_implementation = "eager"
    model = cls(cfg).double()
    for name, p in model.named_parameters():
        p.requires_grad_("embed_tokens" not in name)
        if "norm" in name or "bias" in name or "router" in name or name.endswith(("gate.weight", "sinks")):
            with torch.no_grad():
                p.add_(0.1 * torch.randn_like(p))
    return model


def _old_rope() -> bool:
    import transformers

    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    return (major, minor) < (5, 10)


#: whether transformers' RoPE is the matmul form (< 5.10; the torch 2.11 / transformers 5.9 test environment)
OLD_ROPE = _old_rope()


@contextlib.contextmanager
def float64_routers():
    """HF routers round through float32 (``softmax(..., dtype=torch.float)``, ``logits.float()``,
    ``weight.type(torch.float32)``, ``logits.softmax(dim, dtype=torch.float32)``); while open, these keep a float64 input's dtype, so an MoE
    model's brute force is float64 throughout (and, with transformers < 5.10, ``.float()`` of an
    integer tensor is float64)."""
    softmax, to_float, to_type, method = torch.nn.functional.softmax, torch.Tensor.float, torch.Tensor.type, torch.Tensor.softmax

    def exact_softmax(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)

    def exact_float(self, *args, **kwargs):
        if self.dtype == torch.float64:
            return self
        if OLD_ROPE and not (self.is_floating_point() or self.is_complex()):
            # transformers < 5.10's RoPE multiplies ``inv_freq.float() @ position_ids.float()`` (a matmul,
            # which does not promote a float64 buffer and float32 positions): float64 positions there.
            # Newer RoPE multiplies elementwise (which promotes), and keeps float32 positions as before.
            return to_type(self, torch.float64)
        return to_float(self, *args, **kwargs)

    def exact_type(self, *args, **kwargs):
        if self.dtype == torch.float64 and args and args[0] is torch.float32:
            return self
        return to_type(self, *args, **kwargs)

    def exact_method(self, dim, dtype=None):
        return method(self, dim, dtype=None if self.dtype == torch.float64 else dtype)

    torch.nn.functional.softmax, torch.Tensor.float, torch.Tensor.type = exact_softmax, exact_float, exact_type
    torch.Tensor.softmax = exact_method
    try:
        yield
    finally:
        torch.nn.functional.softmax, torch.Tensor.float, torch.Tensor.type = softmax, to_float, to_type
        torch.Tensor.softmax = method


#: further MoE families of transformers: (config/model class prefix, config overrides)
MORE_MOE = {
    "deepseek_v3": ("DeepseekV3", dict(num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=0,
                                        n_group=1, topk_group=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=8,
                                        qk_nope_head_dim=8, v_head_dim=8)),
    "deepseek_v2": ("DeepseekV2", dict(num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=0,
                                        n_group=1, topk_group=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=8,
                                        qk_nope_head_dim=8, v_head_dim=8)),
    "glm4_moe": ("Glm4Moe", dict(n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1)),
    "dots1": ("Dots1", dict(n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1)),
    "ernie4_5_moe": ("Ernie4_5_Moe", dict(num_experts=4, moe_layer_start_index=0, moe_num_shared_experts=1)),
    "hunyuan_moe": ("HunYuanMoEV1", dict(num_experts=4)),
    "granitemoe": ("GraniteMoe", dict(num_local_experts=4)),
    "granitemoe_shared": ("GraniteMoeShared", dict(num_local_experts=4, shared_intermediate_size=16)),
    "minimax": ("MiniMax", dict(num_local_experts=4)),
    "flex_olmo": ("FlexOlmo", dict(num_experts=4)),
}

#: the model families of the coverage matrix (tests/test_coverage_matrix.py, docs/coverage.md)
FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mistral", "mixtral", "gemma2", "gemma3", "phi3",
            "olmo2", "olmoe", "gpt_neox", "gpt2", "smollm3", "gpt_oss", *MORE_MOE)


def more_moe_model(family: str, seed: int = 0):
    """A tiny random float64 model of one of `MORE_MOE` (eager attention and experts)."""
    import transformers

    prefix, overrides = MORE_MOE[family]
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, moe_intermediate_size=16, num_experts_per_tok=2, head_dim=8, pad_token_id=0,
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, max_position_embeddings=128)
    kw.update(overrides)
    cfg = getattr(transformers, prefix + "Config")(**kw)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    model = getattr(transformers, prefix + "ForCausalLM")(cfg).double()
    for name, p in model.named_parameters():
        if "gate" in name or "router" in name or "bias" in name:
            with torch.no_grad():
                p.add_(0.05 * torch.randn_like(p))
    return model


def family_model(family: str, seed: int = 0):
    """A tiny random float64 model of ``family`` with every parameter trainable -- embeddings, norms,
    routers, experts, gpt-oss's attention sinks -- except the routing statistics
    (``e_score_correction_bias``) the models themselves keep frozen."""
    import transformers

    if family in MOE_ARCHS:
        model = tiny_moe(family, seed=seed)
    elif family in MORE_MOE:
        model = more_moe_model(family, seed=seed)
    elif family == "gpt2":
        torch.manual_seed(seed)
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      tie_word_embeddings=False)
        cfg._attn_implementation = "sdpa"
        model = transformers.GPT2LMHeadModel(cfg).double()
    elif family == "gpt_neox":
        torch.manual_seed(seed)
        cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=128, pad_token_id=0,
                                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        cfg._attn_implementation = "sdpa"
        model = transformers.GPTNeoXForCausalLM(cfg).double()
    elif family == "gemma2":
        torch.manual_seed(seed)
        cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
                                        pad_token_id=0, max_position_embeddings=128, tie_word_embeddings=False)
        cfg._attn_implementation = "eager"
        model = transformers.Gemma2ForCausalLM(cfg).double()
    else:
        model = tiny_full(family, seed=seed)
    for name, p in model.named_parameters():
        # trained: everything but the routing statistics models keep frozen
        p.requires_grad_("e_score_correction" not in name)
        if "norm" in name or "ln" in name:  # non-trivial norm weights (Gemma's start at 0, others at 1)
            with torch.no_grad():
                p.add_(0.05 * torch.randn_like(p))
    return model


def peft_lora(base, seed: int = 0, **config):
    """``base`` frozen, with peft LoRA (``LoraConfig(r=2, lora_alpha=4, **config)``, random B so every
    adapter has a gradient), adapters in float64."""
    from peft import LoraConfig, get_peft_model

    for p in base.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **config))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.double()
    return model


def family_lora(family: str, seed: int = 0):
    """``family_model`` with peft LoRA ``target_modules="all-linear"``."""
    return peft_lora(family_model(family, seed=seed), seed=seed + 1, target_modules="all-linear")
