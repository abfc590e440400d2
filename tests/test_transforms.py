"""Coefficient transforms (variance_scaling, isopo), alone and stacked, against brute force (float64)."""

import pytest
import torch

import gradproj
from gradproj.integrations.torch.logprobs import token_logprobs
from helpers import (
    grpo_coefficients,
    grpo_loss,
    linear_only,
    padded_batch,
    reference_update,
    rel_err,
    sequence_gradients,
    tiny_hf,
    trainable,
    with_lora,
)

GROUP = 4  # responses per prompt


def grouped_step(prompts=3, per_mb=4, seed=0):
    """A step of ``prompts`` groups of GROUP responses, rows shuffled over microbatches of ``per_mb``.

    Returns (microbatches, group_ids, rewards); each microbatch is
    (ids, attn, mask, centred advantages, normalised advantages, its group ids).
    """
    g = torch.Generator().manual_seed(seed)
    n = prompts * GROUP
    group_ids = torch.arange(prompts).repeat_interleave(GROUP)
    rewards = torch.randint(0, 3, (n,), generator=g).double()
    rewards[:GROUP] = 1.0  # one group with zero std: its advantages are all zero
    means = torch.stack([rewards[group_ids == p].mean() for p in range(prompts)])
    stds = torch.stack([rewards[group_ids == p].std() for p in range(prompts)])
    centred = rewards - means[group_ids]
    normalised = centred / (stds[group_ids] + 1e-6)
    order = torch.randperm(n, generator=g)
    out = []
    for m, start in enumerate(range(0, n, per_mb)):
        rows = order[start : start + per_mb]
        prompt_lens = torch.randint(1, 5, (len(rows),), generator=g).tolist()
        resp_lens = torch.randint(1, 5, (len(rows),), generator=g).tolist()
        ids, attn, mask = padded_batch(len(rows), prompt_lens, resp_lens, seed=seed * 100 + m)
        out.append((ids, attn, mask, centred[rows], normalised[rows], group_ids[rows]))
    return out, group_ids, rewards


def isopo_reference(S, c, variant="normalize", reg=1.0):
    """ISOPO coefficients written independently (float64)."""
    if variant == "normalize":
        norms = S.norm(dim=1)
        return torch.where(norms > 0, c / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(c))
    K = S @ S.T
    rho = reg * K.trace() / K.shape[0]
    if float(rho) == 0.0:
        return c.clone()
    return rho * torch.linalg.solve(K + rho * torch.eye(K.shape[0], dtype=K.dtype), c)


def run_step(model, opt, microbatches, *, use_normalised_in_loss=False, ref=None, isopo=None, pass_groups=True):
    """Run one step through ``opt``; with ``ref`` also the brute force, returning {name: rel err}.

    The loss uses the centred advantages (variance_scaling must turn them into normalised ones);
    the reference uses the normalised ones when ``ref["normalised"]``.
    """
    scale = 1.0 / len(microbatches)
    ref = None if ref is None else dict(ref)
    normalised_ref = ref.pop("normalised", False) if ref is not None else False
    G = {n: None for n, _ in trainable(model)}
    for ids, attn, mask, centred, normalised, gids in microbatches:
        if ref is not None:
            with opt.paused():
                S = sequence_gradients(model, token_logprobs(model, ids, attn), mask)
            c = grpo_coefficients(normalised if normalised_ref else centred, mask, scale)
            for n in G:
                cn = c if isopo is None else isopo_reference(S[n], c, **isopo)
                G[n] = reference_update(G[n], S[n], cn, **ref)
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask, group_ids=gids if pass_groups else None):
            grpo_loss(logp, mask, normalised if use_normalised_in_loss else centred, scale).backward()
    if ref is None:
        return {}
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in trainable(model)}
    return {n: rel_err(grads[n].reshape(-1).double(), G[n]) for n in G}


def build(params, seed=0):
    model = tiny_hf("qwen2", seed=seed)
    return with_lora(model) if params == "lora" else linear_only(model)


def wrapped(model, strategy, **options):
    return gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy, **options)


@pytest.mark.parametrize("params", ["linear", "lora"])
@pytest.mark.parametrize("rule", ["none", "proma"])
def test_variance_scaling_reproduces_grpo_normalisation(params, rule):
    model = build(params)
    microbatches, group_ids, rewards = grouped_step(seed=1)
    opt = wrapped(model, ["variance_scaling", rule])
    opt.set_groups(group_ids, rewards)
    errors = run_step(model, opt, microbatches, ref={"strategy": rule, "normalised": True})
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-10, (worst, errors[worst])
    # not vacuous: the unnormalised gradient differs
    assert max(run_step_reference_only(model, opt, microbatches, rule).values()) > 1e-3


def run_step_reference_only(model, opt, microbatches, rule):
    """Errors of the current .grad against the brute force *without* normalisation."""
    scale = 1.0 / len(microbatches)
    G = {n: None for n, _ in trainable(model)}
    for ids, attn, mask, centred, _normalised, _ in microbatches:
        with opt.paused():
            S = sequence_gradients(model, token_logprobs(model, ids, attn), mask)
        c = grpo_coefficients(centred, mask, scale)
        for n in G:
            G[n] = reference_update(G[n], S[n], c, strategy=rule)
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in trainable(model)}
    return {n: rel_err(grads[n].reshape(-1).double(), G[n]) for n in G}


def test_variance_scaling_equals_unwrapped_grpo_loss():
    """`variance_scaling` alone (implied `none`) == plain autograd on GRPO's normalised loss."""
    microbatches, group_ids, rewards = grouped_step(seed=2)
    ref_model = build("linear", seed=3)
    for ids, attn, mask, _c, normalised, _ in microbatches:
        logp = token_logprobs(ref_model, ids, attn)
        grpo_loss(logp, mask, normalised, 1.0 / len(microbatches)).backward()
    model = build("linear", seed=3)
    opt = wrapped(model, "variance_scaling")
    assert opt.engine.layers == []  # no capture needed: the log-prob hook rescales the loss weights
    opt.set_groups(group_ids.tolist(), rewards)
    run_step(model, opt, microbatches)
    for (name, p), (_, q) in zip(trainable(model), trainable(ref_model)):
        assert rel_err(p.grad.double().reshape(-1), q.grad.double().reshape(-1)) <= 1e-10, name
    opt.step()
    assert opt.engine.step_groups is None  # cleared with the step
    assert "gradproj/variance_scaling/scale_mean" in opt.metrics()


@pytest.mark.parametrize("power,scope", [(0.5, "group"), (1.0, "batch"), (0.0, "group")])
def test_variance_scaling_power_and_scope(power, scope):
    model = build("lora", seed=4)
    microbatches, group_ids, rewards = grouped_step(seed=5)
    stds = {p: float(rewards[group_ids == p].std()) for p in range(3)}
    batch_std = float(rewards.std())
    fixed = []
    for ids, attn, mask, centred, _n, gids in microbatches:
        sigma = torch.tensor([batch_std if scope == "batch" else stds[int(g)] for g in gids], dtype=torch.float64)
        fixed.append((ids, attn, mask, centred, centred / (sigma + 1e-6) ** power, gids))
    opt = wrapped(model, ["variance_scaling", "proma"], power=power, scope=scope)
    opt.set_groups(group_ids, rewards)
    errors = run_step(model, opt, fixed, ref={"normalised": True}, pass_groups=scope == "group")
    assert max(errors.values()) <= 1e-10


@pytest.mark.parametrize("params", ["linear", "lora"])
@pytest.mark.parametrize("rule", ["none", "proma"])
@pytest.mark.parametrize("variant", ["normalize", "ntk"])
def test_isopo_matches_brute_force(params, rule, variant):
    model = build(params, seed=6)
    microbatches, _, _ = grouped_step(seed=7)
    opt = wrapped(model, ["isopo", rule], variant=variant, reg=0.5)
    errors = run_step(model, opt, microbatches, ref={"strategy": rule}, isopo={"variant": variant, "reg": 0.5})
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-10, (worst, errors[worst])
    assert max(run_step_reference_only(model, opt, microbatches, rule).values()) > 1e-3  # isopo changed it
    opt.step()
    assert opt.metrics()["gradproj/isopo/coefficient_ratio"] > 0


def test_full_stack_variance_scaling_isopo_proma():
    model = build("linear", seed=8)
    microbatches, group_ids, rewards = grouped_step(seed=9)
    opt = wrapped(model, ["variance_scaling", "isopo", "proma"], relative_bound=0.5)
    opt.set_groups(group_ids, rewards)
    errors = run_step(
        model, opt, microbatches, ref={"normalised": True, "relative_bound": 0.5}, isopo={"variant": "normalize"}
    )
    assert max(errors.values()) <= 1e-10


def test_transform_errors_are_clear():
    model = build("lora", seed=0)
    microbatches, group_ids, rewards = grouped_step(seed=0)
    ids, attn, mask, centred, _n, gids = microbatches[0]
    opt = wrapped(model, ["variance_scaling", "proma"])
    logp = token_logprobs(model, ids, attn)
    with pytest.raises(gradproj.ProtocolError, match="set_groups"):
        opt.microbatch(logp, mask, group_ids=gids).__enter__()
    opt.set_groups(group_ids, rewards)
    with pytest.raises(gradproj.ProtocolError, match="group_ids="):
        opt.microbatch(logp, mask).__enter__()
    with pytest.raises(gradproj.InputError, match="not among the step's groups"):
        opt.microbatch(logp, mask, group_ids=gids + 100).__enter__()
    with pytest.raises(gradproj.InputError, match="one per row"):
        opt.microbatch(logp, mask, group_ids=gids[:-1]).__enter__()
    with pytest.raises(gradproj.InputError, match="rewards"):
        opt.set_groups(group_ids, rewards[:-1])
    with pytest.raises(gradproj.InputError, match="NaN"):
        opt.set_groups(group_ids, torch.full_like(rewards, float("nan")))
    assert all(p.grad is None for _, p in trainable(model))
    with pytest.raises(gradproj.ConfigError, match="twice"):
        gradproj.GradProjConfig(strategy=["isopo", "isopo", "proma"])
    with pytest.raises(gradproj.ConfigError, match="must come last"):
        gradproj.GradProjConfig(strategy=["proma", "variance_scaling"])
    with pytest.raises(gradproj.ConfigError, match="scope"):
        gradproj.GradProjConfig(strategy=["variance_scaling", "proma"], scope="prompt")


def test_plain_backward_with_transform_is_refused_at_step():
    model = build("linear", seed=0)
    microbatches, group_ids, rewards = grouped_step(seed=0)
    ids, attn, mask, centred, _n, _g = microbatches[0]
    opt = wrapped(model, "variance_scaling")
    grpo_loss(token_logprobs(model, ids, attn), mask, centred, 1.0).backward()
    before = [p.detach().clone() for _, p in trainable(model)]
    with pytest.raises(gradproj.ProtocolError, match="outside opt.microbatch"):
        opt.step()
    assert all(torch.equal(a, p) for a, (_, p) in zip(before, trainable(model)))
