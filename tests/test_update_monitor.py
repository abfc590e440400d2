"""Monitoring without a reference model (gradproj/diagnostics/update_monitor.py).

* ``gradproj/entropy`` is the mean surprisal of the valid tokens, over the step's applied microbatches;
* ``gradproj/kl_estimate/*`` equals its formula, 1/2 mean_i <s_i, dtheta>^2 with the brute-force
  sequence gradients (float64, one backward per sequence) and the previous update read off the
  parameters -- for every strategy, LoRA and full fine-tuning, padded and packed;
* it tracks the exact per-step KL from two forwards over sampled sequences;
* dropped and failed microbatches count nowhere; a skipped step leaves no estimate behind.
"""

from __future__ import annotations

import pytest
import torch

import gradproj
from gradproj.integrations.torch import token_logprobs
from helpers import (
    TinyLM, float64_exact_norms, grpo_loss, make_microbatches, rel_err, sequence_gradients, tiny_full, trainable,
    with_lora,
)

KL_KEYS = ("gradproj/kl_estimate/per_token", "gradproj/kl_estimate/per_sequence")


def run_step(model, opt, microbatches, groups=False):
    """One optimizer step; ``groups``: each microbatch is one prompt group (for variance_scaling)."""
    if groups:
        opt.set_groups([m for m, mb in enumerate(microbatches) for _ in range(mb[0].shape[0])],
                       torch.cat([mb[3] for mb in microbatches]))
    for m, (ids, attn, mask, adv) in enumerate(microbatches):
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask, group_ids=[m] * ids.shape[0] if groups else None):
            grpo_loss(logp, mask, adv, 1 / len(microbatches)).backward()
    opt.step()
    opt.zero_grad()
    return opt.metrics()


def expected_entropy(model, microbatches):
    with torch.no_grad():
        surprisal = tokens = 0.0
        for ids, attn, mask, _ in microbatches:
            logp = token_logprobs(model, ids, attn)
            surprisal += float(-(logp * mask).sum())
            tokens += float(mask.sum())
    return surprisal / tokens


def expected_kl(model, microbatches, delta):
    """1/2 mean_i <s_i, dtheta>^2 over the microbatches' sequences, and per valid token."""
    squares, sequences, tokens = 0.0, 0, 0.0
    for ids, attn, mask, _ in microbatches:
        S = sequence_gradients(model, token_logprobs(model, ids, attn), mask)
        dots = sum(S[name] @ delta[name].reshape(-1).double() for name in S)
        squares += float((dots**2).sum())
        sequences += ids.shape[0]
        tokens += float(mask.sum())
    return 0.5 * squares / tokens, 0.5 * squares / sequences


@pytest.mark.parametrize("strategy", ["none", "proma", "intra_proma"])
def test_entropy_is_the_mean_surprisal_of_the_valid_tokens(strategy):
    model = TinyLM(seed=1)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy)
    microbatches = make_microbatches(count=2, k=3, seed=2)
    want = expected_entropy(model, microbatches)
    metrics = run_step(model, opt, microbatches)
    assert metrics["gradproj/entropy"] == pytest.approx(want, rel=1e-12)
    assert not any(key in metrics for key in KL_KEYS)  # only with kl_estimate=True


@pytest.mark.parametrize("strategy", ["none", "proma", "intra_proma", ["variance_scaling", "proma"]])
@pytest.mark.parametrize("setup", ["tiny", "lora", "full"])
def test_kl_estimate_equals_its_formula(strategy, setup):
    with float64_exact_norms():
        if setup == "tiny":
            model = TinyLM(seed=3)
        elif setup == "lora":
            model = with_lora(tiny_full("llama", seed=3), r=2, seed=4)
        else:
            model = tiny_full("llama", seed=3)
        params = dict(trainable(model))
        opt = gradproj.wrap(torch.optim.AdamW(list(params.values()), lr=1e-2), model, strategy, kl_estimate=True)
        groups = "variance_scaling" in strategy
        first = make_microbatches(count=2, k=3, seed=5)
        before = {n: p.detach().clone() for n, p in params.items()}
        metrics = run_step(model, opt, first, groups)
        assert not any(key in metrics for key in KL_KEYS)  # no previous update at the first step
        delta = {n: p.detach() - before[n] for n, p in params.items()}
        assert max(float(d.abs().max()) for d in delta.values()) > 0
        second = make_microbatches(count=2, k=3, seed=6)
        with opt.paused():
            per_token, per_sequence = expected_kl(model, second, delta)
        metrics = run_step(model, opt, second, groups)
        assert rel_err(torch.tensor(metrics["gradproj/kl_estimate/per_token"]), torch.tensor(per_token)) <= 1e-10
        assert rel_err(torch.tensor(metrics["gradproj/kl_estimate/per_sequence"]), torch.tensor(per_sequence)) <= 1e-10
        assert per_token > 0


def test_dropped_and_failed_microbatches_count_nowhere():
    model = TinyLM(seed=8)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma", kl_estimate=True)
    run_step(model, opt, make_microbatches(count=1, k=3, seed=9))
    good = make_microbatches(count=1, k=3, seed=10)
    # a failed microbatch: the caller's code raises inside the block
    ids, attn, mask, adv = make_microbatches(count=1, k=3, seed=11)[0]
    logp = token_logprobs(model, ids, attn)
    with pytest.raises(RuntimeError, match="boom"), opt.microbatch(logp, mask):
        grpo_loss(logp, mask, adv, 1.0).backward()
        raise RuntimeError("boom")
    # a non-finite microbatch: dropped
    logp = token_logprobs(model, ids, attn)
    with opt.microbatch(logp, mask):
        (grpo_loss(logp, mask, adv, 1.0) * float("nan")).backward()
    want_entropy = expected_entropy(model, good)
    metrics = run_step(model, opt, good)
    assert metrics["gradproj/dropped_microbatches"] == 1
    assert metrics["gradproj/entropy"] == pytest.approx(want_entropy, rel=1e-12)
    assert metrics["gradproj/kl_estimate/per_sequence"] > 0


def test_a_skipped_step_leaves_no_estimate():
    """Every microbatch dropped: the inner step does not run, so there is no update to measure next."""
    model = TinyLM(seed=12)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma", kl_estimate=True)
    run_step(model, opt, make_microbatches(count=1, k=3, seed=13))
    ids, attn, mask, adv = make_microbatches(count=1, k=3, seed=14)[0]
    logp = token_logprobs(model, ids, attn)
    with opt.microbatch(logp, mask):
        (grpo_loss(logp, mask, adv, 1.0) * float("nan")).backward()
    opt.step()  # skipped
    assert opt.metrics()["gradproj/step_skipped"] == 1
    opt.zero_grad()
    metrics = run_step(model, opt, make_microbatches(count=1, k=3, seed=15))
    assert not any(key in metrics for key in KL_KEYS)


def test_kl_estimate_tracks_the_exact_kl():
    """Against the exact per-step KL: sequences sampled from the updated policy, the token-level KL
    over the whole vocabulary summed along each sequence (two forwards), for updates of growing size.
    The estimate is second order and a Monte Carlo average over the sampled sequences: it matches
    to a few tens of percent here, and its error grows with the update."""
    import copy

    ratios = []
    for lr in (3e-3, 1e-2):
        model = tiny_full("llama", seed=16)
        model.float()
        params = [p for _, p in trainable(model)]
        opt = gradproj.wrap(torch.optim.SGD(params, lr=lr), model, "none", kl_estimate=True)
        gen = torch.Generator().manual_seed(17)
        ids = torch.randint(1, 40, (32, 12), generator=gen)
        mask = torch.zeros(32, 11)
        mask[:, 3:] = 1
        adv = torch.randn(32, generator=gen)
        old = copy.deepcopy(model)
        logp = token_logprobs(model, ids)
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 1.0).backward()
        opt.step()
        opt.zero_grad()
        # this step's sequences: sampled from the updated policy
        torch.manual_seed(18)
        with opt.paused(), torch.no_grad():
            prompts = torch.randint(1, 40, (256, 4), generator=gen)
            sampled = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                     max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
        resp = torch.zeros(256, 11)
        resp[:, 3:] = 1
        with opt.paused(), torch.no_grad():
            new_lp = torch.log_softmax(model(sampled).logits[:, :-1].double(), -1)
            old_lp = torch.log_softmax(old(sampled).logits[:, :-1].double(), -1)
            exact = float(((new_lp.exp() * (new_lp - old_lp)).sum(-1) * resp).sum() / resp.sum())
        for rows in torch.arange(256).chunk(8):
            logp = token_logprobs(model, sampled[rows])
            with opt.microbatch(logp, resp[rows]):
                grpo_loss(logp, resp[rows], torch.zeros(len(rows)), 1.0).backward()
        opt.step()
        estimate = opt.metrics()["gradproj/kl_estimate/per_token"]
        ratios.append(estimate / exact)
        print(f"lr {lr}: exact per-token KL {exact:.3e}, estimate {estimate:.3e}, ratio {estimate / exact:.3f}")
    assert all(0.8 < r < 1.25 for r in ratios), ratios


def test_entropy_ignores_what_the_mask_leaves_out():
    """-inf log-probs outside the mask (a padded position) do not turn the entropy into NaN."""
    model = TinyLM(seed=20)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    ids, attn, mask, adv = make_microbatches(count=1, k=3, seed=21)[0]
    logp = token_logprobs(model, ids, attn)
    outside = ~mask
    logp = torch.where(outside, torch.full_like(logp, float("-inf")), logp)
    want = float(-(logp.detach()[mask]).sum() / mask.sum())
    with opt.microbatch(logp, mask):
        grpo_loss(torch.where(outside, 0.0, logp), mask, adv, 1.0).backward()
    opt.step()
    assert opt.metrics()["gradproj/entropy"] == pytest.approx(want, rel=1e-12)


def test_kl_estimate_with_an_inner_optimizer_without_step_hooks():
    """torch_optimizer's Lookahead bypasses Optimizer.__init__ (no step hooks): the update is still kept."""
    import torch_optimizer

    model = TinyLM(seed=22)
    inner = torch_optimizer.Lookahead(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), k=2)
    opt = gradproj.wrap(inner, model, "proma", kl_estimate=True)
    assert not opt._inner_hooks
    run_step(model, opt, make_microbatches(count=1, k=3, seed=23))
    metrics = run_step(model, opt, make_microbatches(count=1, k=3, seed=24))
    assert metrics["gradproj/kl_estimate/per_token"] > 0


def test_detach_drops_the_kept_update():
    model = TinyLM(seed=25)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma", kl_estimate=True)
    run_step(model, opt, make_microbatches(count=1, k=3, seed=26))
    monitor = opt.engine.monitor
    assert monitor._delta
    opt.detach()
    assert not monitor._delta and monitor._before is None
