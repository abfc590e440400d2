"""Embedding and Conv1D handlers: full fine-tuning of HF models (Qwen2, Llama, Qwen3 with untied embeddings;
GPT-2 with Conv1D, LayerNorm and position embeddings) equals the brute force; refusals stay clear."""

import pytest
import torch
from torch import nn

import gradproj
from helpers import VOCAB, TinyLM, float64_exact_norms, make_microbatches, run_microbatches, tiny_full, trainable


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


def _force_blocks(monkeypatch, block_numel: int):
    """Every weight goes through its handler (no batching) and any weight with more than
    ``2 * block_numel`` elements is materialised in blocks; returns a list counting them."""
    from gradproj.capture import plan as plan_module
    from gradproj.linalg import linear_grads

    monkeypatch.setattr(plan_module, "BATCH_MAX_NUMEL", 0)
    monkeypatch.setattr(plan_module, "block_numel", lambda params: block_numel)
    built = []
    original = linear_grads.BlockedLinearGrads.__init__

    def counting(self, inputs, out_grads, workspace, block_rows):
        built.append((out_grads.shape[-1], block_rows))  # (rows of the weight, rows per block)
        original(self, inputs, out_grads, workspace, block_rows)

    monkeypatch.setattr(linear_grads.BlockedLinearGrads, "__init__", counting)
    return built


@pytest.mark.parametrize("strategy", ["proma", ["isopo", "proma"], "isopo"])
@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_blocked_materialisation_exact(monkeypatch, arch, strategy):
    """Layers far larger than the rest (here: forced for every weight over 2 x 100 elements) build
    their sequence gradients a block of rows at a time; the result is still the brute force's.
    GPT-2's Conv1D stores its weight transposed (blocks run over its input side)."""
    built = _force_blocks(monkeypatch, 100)
    with float64_exact_norms():
        _check_blocked(monkeypatch, arch, strategy)
    assert built and all(rows >= 1 for _, rows in built)


def _check_blocked(monkeypatch, arch, strategy):
    model = tiny_gpt2(seed=3) if arch == "gpt2" else tiny_full(arch, seed=3)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy)
    ref = {"strategy": strategy} if strategy == "proma" else None
    batches = make_microbatches(count=3, k=4, seed=6)
    if ref is not None:
        errors = run_microbatches(model, opt, batches, ref=ref)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-10, (worst, errors[worst])
    else:  # same gradients as the unblocked path (whose ISOPO is checked against brute force elsewhere)
        run_microbatches(model, opt, batches)
        monkeypatch.undo()
        twin = tiny_gpt2(seed=3) if arch == "gpt2" else tiny_full(arch, seed=3)
        twin_opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(twin)], lr=0.1), twin, strategy)
        run_microbatches(twin, twin_opt, batches)
        for (name, p), (_, q) in zip(trainable(model), trainable(twin)):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14, msg=name)


def test_blocked_linear_grads_match_materialised():
    """Each operation of the blocked form against the materialised one (float64), with a block
    size that does not divide the rows, and gram_with both before and after gram."""
    from gradproj.linalg.linear_grads import BlockedLinearGrads, MaterializedLinearGrads
    from gradproj.linalg.sequence_grads import Workspace

    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    D = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    G = torch.randn(11, 7, generator=g, dtype=torch.float64)
    gamma = torch.randn(3, generator=g, dtype=torch.float64)
    ref = MaterializedLinearGrads(A, D)
    for block_rows in (1, 4, 11, 50):
        fresh = BlockedLinearGrads(A, D, Workspace(), block_rows)
        torch.testing.assert_close(fresh.gram_with(G), ref.gram_with(G), rtol=1e-12, atol=0)
        cached = BlockedLinearGrads(A, D, None, block_rows)
        torch.testing.assert_close(cached.gram(), ref.gram(), rtol=1e-12, atol=0)
        torch.testing.assert_close(cached.gram_with(G), ref.gram_with(G), rtol=1e-12, atol=0)
        torch.testing.assert_close(cached.inner(G), ref.inner(G), rtol=1e-12, atol=0)
        torch.testing.assert_close(cached.combine(gamma), ref.combine(gamma), rtol=1e-12, atol=0)
        ids = torch.tensor([0, 10, 3])
        torch.testing.assert_close(cached.rows(ids), ref.rows(ids), rtol=1e-12, atol=0)


def test_only_an_outlier_layer_is_blocked():
    """The block size is the second-largest parameter's (at least BLOCK_MIN_NUMEL): only a weight
    more than twice that is blocked -- a large vocabulary's lm_head, not the decoder's matrices."""
    from gradproj.capture.plan import BLOCK_MIN_NUMEL, block_numel as _block_numel
    from gradproj.linalg.linear_grads import BlockedLinearGrads, MaterializedLinearGrads, linear_weight_grads
    from gradproj.linalg.sequence_grads import Workspace

    head, mlp = torch.empty(4 * BLOCK_MIN_NUMEL), torch.empty(BLOCK_MIN_NUMEL + 1)
    block = _block_numel([head, mlp, mlp, torch.empty(10)])  # a tied tensor counts once
    assert block == BLOCK_MIN_NUMEL + 1
    assert _block_numel([head]) == BLOCK_MIN_NUMEL
    ws = Workspace(block_numel=64)
    A, D = torch.randn(2, 3, 8), torch.randn(2, 3, 17)  # 136 elements > 2 x 64
    blocked = linear_weight_grads(A, D, "auto", ws)
    assert isinstance(blocked, BlockedLinearGrads) and blocked.block_rows == 8
    assert isinstance(linear_weight_grads(A, D[..., :16], "auto", ws), MaterializedLinearGrads)
    assert isinstance(linear_weight_grads(A, D, "materialize", ws), MaterializedLinearGrads)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_blocked_tied_lm_head_exact(monkeypatch, arch):
    """Tied embedding <-> lm_head with the lm_head materialised in blocks: the summed pieces (and
    their cross terms, from rows of the blocked piece) still give the brute force."""
    built = _force_blocks(monkeypatch, 100)
    with float64_exact_norms():
        model = tiny_gpt2(seed=5, tie=True) if arch == "gpt2" else tiny_full(arch, seed=5, train_embeddings=True, tie=True)
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
        assert opt.engine._shared, "the embedding and the lm_head share their weight"
        errors = run_microbatches(model, opt, make_microbatches(count=3, k=4, seed=4), ref={})
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-10, (worst, errors[worst])
    assert any(rows == model.config.vocab_size for rows, _ in built), "the tied lm_head was blocked"


class _MixLM(torch.nn.Module):
    """Embedding -> a linear layer -> causal running mean -> head, over given module classes."""

    def __init__(self, embedding, linear, head, tie=False):
        super().__init__()
        self.emb, self.fc, self.head = embedding, linear, head
        if tie:
            self.head.weight = self.emb.weight
        self.double()

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        from types import SimpleNamespace

        x = self.fc(self.emb(input_ids))
        x = torch.cumsum(x, 1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
        return SimpleNamespace(logits=self.head(torch.tanh(x)))


def test_linear_subclass_with_its_own_forward_is_verified_and_exact():
    """transformers' FalconLinear (``x @ W.T + b``, its own forward) is covered once a probe shows it
    computes F.linear, and exact; a Linear subclass computing something else is refused by name."""
    from transformers.models.falcon.modeling_falcon import FalconLinear

    torch.manual_seed(0)
    model = _MixLM(torch.nn.Embedding(VOCAB, 16), FalconLinear(16, 16), FalconLinear(16, VOCAB, bias=False))
    model.emb.weight.requires_grad_(False)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    assert {type(layer.module).__name__ for layer in opt.engine.layers} == {"FalconLinear"}
    errors = run_microbatches(model, opt, make_microbatches(count=3, k=4, seed=5), ref={})
    assert max(errors.values()) <= 1e-10, errors

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    other = _MixLM(torch.nn.Embedding(VOCAB, 16), Doubled(16, 16), torch.nn.Linear(16, VOCAB))
    other.emb.weight.requires_grad_(False)
    with pytest.raises(gradproj.CoverageError, match=r"fc\.weight \(Doubled\)"):
        gradproj.wrap(torch.optim.SGD([p for _, p in trainable(other)], lr=0.1), other, "proma")


@pytest.mark.parametrize("tie", [False, True])
def test_scaled_word_embedding_verified_and_exact(tie):
    """Gemma2's scaled word embedding (``embedding(ids) * embed_scale``, its own class) is recognised
    by a probe -- no class list -- and exact, also tied to the output head."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2TextScaledWordEmbedding

    torch.manual_seed(0)
    embedding = Gemma2TextScaledWordEmbedding(VOCAB, 16, 0, embed_scale=16**0.5)
    model = _MixLM(embedding, torch.nn.Linear(16, 16), torch.nn.Linear(16, VOCAB, bias=False), tie=tie)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    assert "emb.weight" in {q for layer in opt.engine.layers for _, _, q in layer.params}
    errors = run_microbatches(model, opt, make_microbatches(count=3, k=4, seed=7), ref={})
    assert max(errors.values()) <= 1e-10, errors
