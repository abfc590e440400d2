"""none/proma on tiny HF causal LMs equal the brute force (one backward per sequence, float64)."""

import pytest
import torch

import gradproj
from helpers import linear_only, make_microbatches, run_microbatches, tiny_hf, trainable, with_lora

CASES = {
    "none": ("none", {}, {"strategy": "none"}),
    "proma-default": ("proma", {}, {}),
    "proma-damping0": ("proma", {"damping": 0.0}, {"damping": 0.0}),
    "proma-damping1e-2": ("proma", {"damping": 1e-2}, {"damping": 1e-2}),
    "proma-bound": ("proma", {"relative_bound": 0.05}, {"relative_bound": 0.05}),
    "proma-shrink": ("proma", {"shrinkage": 0.5}, {"shrinkage": 0.5}),
    "proma-gs": ("proma", {"projector": "gram_schmidt", "sweeps": 2}, {"projector": "gram_schmidt", "sweeps": 2}),
    "proma-gs1": ("proma", {"projector": "gram_schmidt", "sweeps": 1}, {"projector": "gram_schmidt", "sweeps": 1}),
    "proma_reference": ("proma_reference", {}, {"projector": "gram_schmidt", "sweeps": 2, "relative_bound": 0.5}),
}


def build(arch, params):
    model = tiny_hf(arch)
    return with_lora(model) if params == "lora" else linear_only(model)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("params", ["linear", "lora"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_matches_brute_force(arch, params, case):
    strategy, options, ref = CASES[case]
    model = build(arch, params)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy, **options)
    errors = run_microbatches(model, opt, make_microbatches(count=3, k=4, seed=7), ref=ref)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-10, (worst, errors[worst])
    if strategy != "none":
        assert opt.metrics()["gradproj/microbatches"] == 3


@pytest.mark.parametrize("gram", ["materialize", "ghost"])
def test_both_gram_forms_exact(gram):
    model = linear_only(tiny_hf("qwen2", seed=3))
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma", gram=gram)
    errors = run_microbatches(model, opt, make_microbatches(count=3, k=5, seed=11), ref={})
    assert max(errors.values()) <= 1e-10


def test_projection_changes_the_gradient():
    """Guard against a vacuous comparison: proma's result differs from plain accumulation."""
    model = linear_only(tiny_hf("qwen2", seed=5))
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    errors = run_microbatches(model, opt, make_microbatches(count=3, k=4, seed=2), ref={"strategy": "none"})
    assert max(errors.values()) > 1e-3
    assert opt.metrics()["gradproj/proma/projected_fraction"] > 0.0


def test_single_microbatch_is_plain_gradient():
    model = linear_only(tiny_hf("llama", seed=1))
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    errors = run_microbatches(model, opt, make_microbatches(count=1, k=6, seed=4), ref={"strategy": "none"})
    assert max(errors.values()) <= 1e-12
