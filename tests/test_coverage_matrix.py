"""The coverage matrix: every model family people RL-train that transformers ships, full fine-tuning
and peft LoRA (``all-linear``), ``none`` / ``proma`` / ``intra_proma`` against a float64 brute force.

Tiny random models (tests/helpers.py ``family_model``): padded batches (left and right padding) with
a zero-advantage row, several microbatches. HF rounds norms and routers through float32 even in
float64 models; ``exact_norms`` / ``float64_routers`` keep them in float64 so the brute force (one
backward per sequence) really is float64. docs/coverage.md lists the same matrix.
"""

import re
from pathlib import Path

import pytest
import torch

import gradproj
from gradproj.errors import CoverageError
from helpers import (
    FAMILIES,
    MOE_ARCHS,
    exact_norms,
    family_lora,
    family_model,
    float64_routers,
    make_microbatches,
    run_microbatches,
    trainable,
)


def _model(family, params):
    return family_model(family, seed=1) if params == "full" else family_lora(family, seed=1)


@pytest.mark.parametrize("strategy", ["none", "proma"])
@pytest.mark.parametrize("params", ["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matrix_single_pass_rules(family, params, strategy):
    model = _model(family, params)
    with exact_norms(model), float64_routers():
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy)
        errors = run_microbatches(model, opt, make_microbatches(3, 4, seed=2), ref=dict(strategy=strategy))
        opt.detach()
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-10, (worst, errors[worst])
    if params == "full":  # nothing left out: every parameter but the routing statistics
        assert all(p.requires_grad for n, p in model.named_parameters() if "e_score_correction" not in n)


@pytest.mark.parametrize("params", ["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matrix_intra_proma(family, params):
    from test_intra_proma import run

    model = _model(family, params)
    if family in MOE_ARCHS and params == "full":
        # Intra-PROMA keeps the positions whose output-gradient row is not identically zero; a
        # sequence's first-token query gradient is mathematically zero and round-off leaves it at
        # ~1e-17 or 0 depending on the order of the sums upstream, which differs between the brute
        # force's HF expert loop and the captured experts (tests/test_moe.py explains).
        for name, p in model.named_parameters():
            if "q_proj" in name or "q_norm" in name:
                p.requires_grad_(False)
    with exact_norms(model), float64_routers():
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "intra_proma", rank=2)
        errors, changed = run(model, opt, make_microbatches(2, 3, seed=4), rank=2)
        opt.detach()
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-10, (worst, errors[worst])
    assert max(changed.values()) > 1e-3  # the projection did something
    experts = [n for n in changed if "experts" in n]
    if experts:  # the expert blocks (or their adapters) were projected too
        assert max(changed[n] for n in experts) > 1e-3


def test_attention_sinks_used_otherwise_are_refused_in_the_forward():
    """A per-head vector that an attention module uses other than as transformers' eager attention
    joins its sinks (here: scaling the output) is refused in the forward, before any gradient exists."""
    from types import SimpleNamespace

    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_attention_heads=2)
            self.proj = nn.Linear(4, 4).double()
            self.sinks = nn.Parameter(torch.ones(2, dtype=torch.float64))

        def forward(self, x):
            return self.proj(x) * self.sinks.sum()

    model = nn.Sequential(Attention())
    opt = gradproj.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, "proma")
    with pytest.raises(CoverageError, match=r"sinks.*eager"):
        model(torch.randn(2, 3, 4, dtype=torch.float64))
    assert all(p.grad is None for p in model.parameters())
    opt.detach()


def test_docs_list_the_matrix():
    """docs/coverage.md names every family the matrix tests."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "coverage.md").read_text()
    rows = set(re.findall(r"^\| `([a-z0-9_]+)` \|", page, flags=re.M))
    assert rows == set(FAMILIES)
