"""LayerNorm and HF RMSNorm handlers (Llama, Qwen2, Qwen3, Gemma3): full fine-tuning of every
Linear and norm weight equals the brute force (float64), and outputs match the HF modules."""

import pytest
import torch
from torch import nn

import gradproj
from helpers import VOCAB, float64_exact_norms, make_microbatches, run_microbatches, tiny_full, trainable


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "gemma3"])
def test_full_finetuning_with_norms_exact(arch):
    with float64_exact_norms():
        model = tiny_full(arch)
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
    model = tiny_full(arch).to(dtype)
    norm = next(m for m in model.modules() if type(m).__name__.endswith("RMSNorm"))
    x = torch.randn(2, 5, norm.weight.shape[0], dtype=dtype)
    expected = norm(x)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    got = norm(x)
    assert "forward" in norm.__dict__ and got.dtype == expected.dtype
    assert torch.equal(got, expected)
    opt.detach()
