"""LayerNorm and HF RMSNorm handlers (Llama, Qwen2, Qwen3, Gemma3): full fine-tuning of every
Linear and norm weight equals the brute force (float64), and outputs match the HF modules."""

import contextlib

import pytest
import torch
from torch import nn

import gradproj
from helpers import VOCAB, make_microbatches, run_microbatches, trainable


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


def tiny(arch: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0, max_position_embeddings=128)
    if arch == "gemma3":
        cfg, cls = transformers.Gemma3TextConfig(head_dim=8, sliding_window=16, **common), transformers.Gemma3ForCausalLM
    elif arch == "qwen3":
        cfg, cls = transformers.Qwen3Config(head_dim=8, **common), transformers.Qwen3ForCausalLM
    elif arch == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    cfg._attn_implementation = "sdpa"
    model = cls(cfg).double()
    for name, p in model.named_parameters():
        p.requires_grad_("embed_tokens" not in name)  # full fine-tuning except the embeddings
        if "norm" in name:  # non-trivial norm weights (Gemma's start at 0, Llama's at 1)
            with torch.no_grad():
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "gemma3"])
def test_full_finetuning_with_norms_exact(arch):
    with float64_exact_norms():
        model = tiny(arch)
        norms = [n for n, _ in trainable(model) if "norm" in n]
        assert norms
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
        covered = {q for layer in opt.engine.layers for _, _, q in layer.params}
        assert set(norms) <= covered
        errors = run_microbatches(model, opt, make_microbatches(count=3, k=4, seed=3), ref={})
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-10, (worst, errors[worst])
        opt.detach()


def test_layernorm_model_exact():
    class LNModel(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(VOCAB, 16)
            self.emb.weight.requires_grad_(False)
            self.fc = nn.Linear(16, 16)
            self.ln = nn.LayerNorm(16)
            with torch.no_grad():
                self.ln.weight.add_(0.1 * torch.randn(16))
                self.ln.bias.add_(0.1 * torch.randn(16))
            self.head = nn.Linear(16, VOCAB)
            self.double()

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            from types import SimpleNamespace

            x = self.emb(input_ids)
            x = torch.cumsum(x, 1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
            return SimpleNamespace(logits=self.head(torch.tanh(self.ln(self.fc(x)))))

    model = LNModel()
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    errors = run_microbatches(model, opt, make_microbatches(count=3, k=4, seed=5), ref={})
    assert max(errors.values()) <= 1e-10


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_norm_forward_matches_hf(arch, dtype):
    """In float32/bf16 the captured forward reproduces the HF module's output bit for bit."""
    model = tiny(arch).to(dtype)
    norm = next(m for m in model.modules() if type(m).__name__.endswith("RMSNorm"))
    x = torch.randn(2, 5, norm.weight.shape[0], dtype=dtype)
    expected = norm(x)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    got = norm(x)
    assert "forward" in norm.__dict__ and got.dtype == expected.dtype
    assert torch.equal(got, expected)
    opt.detach()
