"""No host synchronisation in the backward (issue 21): on a GPU each one would stop the autograd
engine's queue, once per layer. Counted on the CPU by `gradproj.diagnostics.count_host_syncs`,
which records every operation that would synchronise on a GPU.

Per microbatch, for every strategy, LoRA and full fine-tuning, padded and packed, with and without
gradient checkpointing: the backward holds exactly the one documented read (the check of the loss's
per-token weights at the log-prob hook), the close a bounded number (the all-or-nothing finiteness
decision, and intra_proma's batched eigendecompositions, one per shape class) -- and both counts are
the same for a model with three times the layers.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import gradproj
import gradproj.linalg.factored as factored
from gradproj.diagnostics.host_sync import count_host_syncs
from gradproj.integrations.torch import token_logprobs
from helpers import VOCAB, grpo_loss, make_microbatches, with_lora
from test_packed_hf import packed_logprobs
from test_packed_layout import pack

#: reads at the close: one for the finiteness of the microbatch's updates, plus (intra_proma) one
#: eigendecomposition per shape class of pending subspaces, two for the randomized route's
CLOSE_MAX = 6

STRATEGIES = {
    "none": ("none", {}),
    "proma": ("proma", {}),
    "proma_reference": ("proma_reference", {}),
    "proma_bounded": ("proma", {"relative_bound": 0.5, "shrinkage": 0.5}),
    "intra_proma": ("intra_proma", {"rank": 3}),
    "intra_proma_randomized": ("intra_proma", {"rank": 3, "solver": "randomized", "projector": "kron", "energy": 0.9}),
    "isopo_ntk+proma": (["isopo", "proma"], {"variant": "ntk"}),
    "variance_scaling+proma": (["variance_scaling", "proma"], {}),
    # the per-step KL estimate: counted in the second step, where it has an update to measure
    "none+kl_estimate": ("none", {"kl_estimate": True}),
    "proma+kl_estimate": ("proma", {"kl_estimate": True}),
}

SETUPS = [("lora", "padded", False), ("full", "padded", False), ("full", "packed", False),
          ("lora", "padded", True), ("full", "packed", True)]


def _model(setup: str, layers: int, checkpointing: bool):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0, max_position_embeddings=128,
    )
    config._attn_implementation = "sdpa"
    model = transformers.Qwen2ForCausalLM(config).double()
    if setup == "lora":
        model = with_lora(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _counts(strategy: str, setup: str, layout: str, checkpointing: bool, layers: int) -> tuple[int, int, str]:
    """Host reads in the backward and at the close of a step's second microbatch (the first of a
    step adds g_m to a zero G: no capture there for proma)."""
    name, options = STRATEGIES[strategy]
    model = _model(setup, layers, checkpointing)
    opt = gradproj.wrap(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), model, name, **options)
    microbatches = make_microbatches(count=2, k=4, seed=3)
    if options.get("kl_estimate"):  # a first step, not counted: its update is what the second measures
        for ids, attn, mask, adv in microbatches:
            logp = token_logprobs(model, ids, attn)
            with opt.microbatch(logp, mask):
                grpo_loss(logp, mask, adv, 0.5).backward()
        opt.step()
        opt.zero_grad()
        assert opt.engine.monitor._delta
    if "variance_scaling" in strategy:
        opt.set_groups(torch.tensor([0, 0, 1, 1] * 2), torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0, 1.0, 1.0, 3.0]))
    for index, (ids, attn, mask, adv) in enumerate(microbatches):
        group_ids = torch.tensor([0, 0, 1, 1]) if "variance_scaling" in strategy else None
        if layout == "packed":
            packed, cu, mask = pack(ids, attn, mask)
            logp = packed_logprobs(model, packed, cu)
            block = opt.microbatch(logp, mask, cu_seqlens=cu, group_ids=group_ids)
        else:
            logp = token_logprobs(model, ids, attn)
            block = opt.microbatch(logp, mask, group_ids=group_ids)
        loss = grpo_loss(logp, mask, adv, 0.5)
        with count_host_syncs() as opening:
            block.__enter__()
        with count_host_syncs() as backward:
            loss.backward()
        with count_host_syncs() as close:
            block.__exit__(None, None, None)
    assert opt.metrics() is not None
    opt.step()
    where = f"{backward.summary()}\n--- close\n{close.summary()}\n--- opening (not counted)\n{opening.summary()}"
    return len(backward), len(close), where


@pytest.fixture(autouse=True)
def _device_code_path(monkeypatch):
    """The code path a GPU takes: kept-row masks shared by identity only (on the CPU, gradproj also
    compares their values, which would synchronise on a GPU)."""
    monkeypatch.setattr(factored, "COMPARE_KEEPS_ON_CPU", False)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("setup,layout,checkpointing", SETUPS)
def test_host_syncs_per_microbatch_do_not_grow_with_the_layers(strategy, setup, layout, checkpointing):
    small = _counts(strategy, setup, layout, checkpointing, layers=1)
    large = _counts(strategy, setup, layout, checkpointing, layers=3)
    where = large[2]
    if strategy == "none":
        assert large[:2] == (0, 0), where  # plain accumulation: gradproj reads nothing
    else:
        # the loss's per-token weights, checked once at the log-prob hook; with a trainable
        # embedding table, the distinct ids of its tokens (the shape of its compact gradient)
        tables = 1 if setup == "full" else 0
        assert large[0] == 1 + tables, where
        assert 1 <= large[1] <= CLOSE_MAX, where
    assert small[:2] == large[:2], f"{small[2]}\n=== 3 layers\n{where}"


def test_the_counter_sees_what_would_synchronise():
    """The instrument itself: reads, data-dependent shapes, checked LAPACK calls, host copies."""
    x = torch.randn(5, 5, dtype=torch.float64)
    cases = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.sum() > 0),
        "nonzero": lambda: torch.nonzero(x > 0),
        "mask index": lambda: x[x > 0],
        "unique": lambda: torch.unique(torch.tensor([1, 2, 2])),
        "eigh": lambda: torch.linalg.eigh(x @ x.T),
        "solve": lambda: torch.linalg.solve(x @ x.T + torch.eye(5), x),
        "cpu": lambda: x.cpu(),
        "numpy": lambda: x.numpy(),
        "tolist": lambda: x.tolist(),
    }
    for name, fn in cases.items():
        with count_host_syncs() as syncs:
            fn()
        assert len(syncs) >= 1, name
    with count_host_syncs() as syncs:  # what the hot path uses instead
        torch.linalg.solve_ex(x @ x.T + torch.eye(5), x, check_errors=False)
        torch.linalg.cholesky_ex(x @ x.T + torch.eye(5), check_errors=False)
        torch.where(x > 0, x, 0.0).sum()
    assert len(syncs) == 0, syncs.summary()


def _moe(layers: int):
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=48,
        pad_token_id=0, max_position_embeddings=128, tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    config._experts_implementation = "eager"
    model = transformers.Qwen3MoeForCausalLM(config).double()
    model.model.embed_tokens.weight.requires_grad_(False)
    return model


def _moe_counts(strategy: str, layout: str, layers: int) -> tuple[int, int, str]:
    name, options = STRATEGIES[strategy]
    model = _moe(layers)
    opt = gradproj.wrap(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), model, name, **options)
    for ids, attn, mask, adv in make_microbatches(count=2, k=4, seed=3):
        if layout == "packed":
            packed, cu, mask = pack(ids, attn, mask)
            logp = packed_logprobs(model, packed, cu)
            block = opt.microbatch(logp, mask, cu_seqlens=cu)
        else:
            logp = token_logprobs(model, ids, attn)
            block = opt.microbatch(logp, mask)
        loss = grpo_loss(logp, mask, adv, 0.5)
        block.__enter__()
        with count_host_syncs() as backward:
            loss.backward()
        with count_host_syncs() as close:
            block.__exit__(None, None, None)
    opt.step()
    return len(backward), len(close), f"{backward.summary()}\n--- close\n{close.summary()}"


@pytest.mark.parametrize("strategy", ["proma", "intra_proma"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_moe_experts_host_syncs(strategy, layout):
    """Fused experts read their routing (tokens per expert) in the forward; on a padded layout that
    read also brings each expert's rows per sequence, so the backward reads nothing more. A packed
    layout's sequences are only known in the backward: one read per MoE layer there (documented)."""
    small, large = _moe_counts(strategy, layout, 1), _moe_counts(strategy, layout, 3)
    extra = {"padded": 0, "packed": 1}[layout]
    assert small[0] == 1 + extra * 1, small[2]
    assert large[0] == 1 + extra * 3, large[2]
    assert small[1] == large[1] <= CLOSE_MAX, large[2]
