"""Hypothesis: proma equals the brute force for any k, lengths, padding side and mask."""

import torch
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

import gradproj
from gradproj.linalg.sequence_grads import _GRAM_CHUNK, row_gram
from helpers import VOCAB, TinyLM, run_microbatches, trainable


@st.composite
def microbatch_sets(draw):
    count = draw(st.integers(1, 3))
    k = draw(st.integers(1, 6))
    out = []
    for m in range(count):
        T = draw(st.integers(2, 9))
        ids = torch.tensor(draw(st.lists(st.lists(st.integers(1, VOCAB - 1), min_size=T, max_size=T), min_size=k, max_size=k)))
        attn = torch.ones(k, T, dtype=torch.long)
        for i in range(k):
            pad = draw(st.integers(0, T - 2))
            if draw(st.booleans()):  # left padding
                attn[i, :pad] = 0
            else:  # right padding
                attn[i, T - pad :] = 0
        ids = ids * attn
        mask_bits = draw(st.lists(st.lists(st.booleans(), min_size=T - 1, max_size=T - 1), min_size=k, max_size=k))
        mask = torch.tensor(mask_bits) & attn[:, 1:].bool()
        adv = torch.tensor(draw(st.lists(st.sampled_from([0.0, 1.0, -1.0, 0.5, -2.0, 3.25]), min_size=k, max_size=k)), dtype=torch.float64)
        out.append((ids, attn, mask, adv))
    gram = draw(st.sampled_from(["auto", "materialize", "ghost"]))
    projector = draw(st.sampled_from(["solve", "gram_schmidt"]))
    return out, gram, projector


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(microbatch_sets())
def test_proma_equals_brute_force(data):
    batches, gram, projector = data
    model = TinyLM(seed=0)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma", gram=gram, projector=projector)
    try:
        errors = run_microbatches(model, opt, batches, ref={"projector": projector})
    finally:
        opt.detach()
    # Empty masks everywhere give an all-zero gradient on both sides (rel_err of 0 vs 0 is 0).
    assert max(errors.values()) <= 1e-9, errors


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 9), st.integers(1, 5 * _GRAM_CHUNK + 7), st.sampled_from([torch.float32, torch.float64]), st.integers(0, 2**16))
def test_row_gram_equals_the_product(k, width, dtype, seed):
    """The chunked Gram of a short, wide matrix equals ``flat @ flat.T`` (below, at and above the chunk)."""
    flat = torch.randn(k, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = flat @ flat.T
    got = row_gram(flat.to(dtype))
    assert got.dtype == torch.float64 and got.shape == (k, k)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(got, expected, rtol=tol, atol=tol * float(expected.abs().max()))
