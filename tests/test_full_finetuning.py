"""Embedding and Conv1D handlers: full fine-tuning of HF models (Qwen2, Llama, Qwen3 with untied embeddings;
GPT-2 with Conv1D, LayerNorm and position embeddings) equals the brute force; refusals stay clear."""

import pytest
import torch
from torch import nn

import gradproj
from helpers import TinyLM, float64_exact_norms, make_microbatches, run_microbatches, tiny_full, trainable


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "gemma3"])
def test_full_finetuning_every_parameter_exact(arch):
    """Embeddings (padding_idx = pad id 0, hit by the padded positions; Gemma3's scaled one), norms
    and Linears."""
    with float64_exact_norms():
        model = tiny_full(arch, train_embeddings=True)
        assert model.get_input_embeddings().padding_idx == 0
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
        assert "model.embed_tokens.weight" in {q for layer in opt.engine.layers for _, _, q in layer.params}
        errors = run_microbatches(model, opt, make_microbatches(count=3, k=4, seed=2), ref={})
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-10, (worst, errors[worst])
        opt.detach()


@pytest.mark.parametrize("projector", ["solve", "gram_schmidt"])
def test_trainable_embedding_small_model(projector):
    model = TinyLM(seed=4)
    model.emb.weight.requires_grad_(True)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma", projector=projector)
    errors = run_microbatches(model, opt, make_microbatches(count=3, k=5, seed=8), ref={"projector": projector})
    assert max(errors.values()) <= 1e-10


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("gram", ["auto", "materialize", "ghost"])
def test_tied_embeddings_exact(gram, arch):
    """Tied embedding <-> lm_head: both modules' sequence gradients are summed (with cross terms)
    before the strategy runs."""
    with float64_exact_norms():
        model = tiny_full(arch, train_embeddings=True, tie=True)
        assert model.lm_head.weight is model.get_input_embeddings().weight
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma", gram=gram)
        assert len(opt.engine._shared) == 1
        errors = run_microbatches(model, opt, make_microbatches(count=3, k=4, seed=6), ref={})
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-10, (worst, errors[worst])
        opt.detach()


def test_sparse_embedding_stays_uncovered():
    model = TinyLM()
    model.emb = nn.Embedding(model.emb.num_embeddings, model.emb.embedding_dim, sparse=True).double()
    with pytest.raises(gradproj.CoverageError, match=r"emb\.weight"):
        gradproj.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, "proma")


def tiny_gpt2(seed: int = 0, tie: bool = False):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # deterministic forwards
    cfg._attn_implementation = "sdpa"
    return transformers.GPT2LMHeadModel(cfg).double()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("gram", ["auto", "ghost"])
def test_gpt2_full_finetuning_exact(gram, tie):
    """GPT-2: Conv1D (transposed weight), LayerNorm, token and position embeddings, head (tied or not)."""
    model = tiny_gpt2(tie=tie)
    assert all(p.requires_grad for p in model.parameters())
    opt = gradproj.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, "proma", gram=gram)
    kinds = {type(layer.module).__name__ for layer in opt.engine.layers}
    assert {"Conv1D", "LayerNorm", "Embedding", "Linear"} <= kinds
    errors = run_microbatches(model, opt, make_microbatches(count=3, k=4, seed=3), ref={})
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-10, (worst, errors[worst])


def test_conv1d_forward_matches_hf():
    model = tiny_gpt2().float()
    conv = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, 32)
    expected = conv(x)
    opt = gradproj.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, "proma")
    assert "forward" in conv.__dict__ and torch.equal(conv(x), expected)
    opt.detach()
