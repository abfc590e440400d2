"""DMPO's distribution-matching term (integrations/torch/dmpo.py): its weights are the gradient of
lambda * L_DM (Eqs. 5-9) with respect to the mean log-probs, and GRPO + DMPO trained through gradproj
equals the float64 brute force -- alone and under proma / intra_proma, groups spanning microbatches."""

import pytest
import torch

import gradproj
from gradproj.integrations.torch import dmpo_loss, dmpo_weights, policy_loss, token_logprobs
from helpers import TinyLM, float64_exact_norms, padded_batch, rel_err, tiny_full, trainable
from test_intra_proma import BruteStep


def l_dm(rewards, phi, group_ids, alpha, weight):
    """lambda * mean over groups of (1/G) sum_i (softmax(r/alpha)_i - softmax(phi)_i)^2, written out."""
    total, groups = 0.0, sorted(set(group_ids))
    for g in groups:
        rows = [i for i, gid in enumerate(group_ids) if gid == g]
        p = torch.exp(rewards[rows] / alpha) / torch.exp(rewards[rows] / alpha).sum()
        q = torch.exp(phi[rows]) / torch.exp(phi[rows]).sum()
        total = total + ((p - q) ** 2).sum() / len(rows)
    return weight * total / len(groups)


@pytest.mark.parametrize("seed", range(4))
def test_weights_are_the_gradient_of_the_loss(seed):
    g = torch.Generator().manual_seed(seed)
    group_ids = [2, 0, 1, 0, 2, 1, 0, 2, 2]  # groups of 3, 2, 4 in any order
    rewards = torch.randint(0, 3, (9,), generator=g).double() / 2
    phi = -torch.rand(9, generator=g, dtype=torch.float64) * 3
    phi.requires_grad_(True)
    (want,) = torch.autograd.grad(l_dm(rewards, phi, group_ids, 0.3, 1.7), phi)
    got = dmpo_weights(rewards, phi.detach(), group_ids, alpha=0.3, weight=1.7)
    assert rel_err(got, want) <= 1e-12
    assert abs(float(got.sum())) < 1e-14  # softmax is shift invariant: the weights sum to 0 per group


def test_settings_are_checked():
    with pytest.raises(ValueError, match="one reward"):
        dmpo_weights(torch.zeros(3), torch.zeros(2), [0, 0, 0])
    with pytest.raises(ValueError, match="alpha"):
        dmpo_weights(torch.zeros(2), torch.zeros(2), [0, 0], alpha=0)
    with pytest.raises(ValueError, match="finite"):
        dmpo_weights(torch.tensor([0.0, float("nan")]), torch.zeros(2), [0, 0])


@pytest.mark.parametrize("strategy", ["none", "proma", "intra_proma"])
@pytest.mark.parametrize("model_kind", ["tiny", "llama"])
def test_grpo_plus_dmpo_is_exact(strategy, model_kind):
    with float64_exact_norms():
        model = TinyLM(seed=5) if model_kind == "tiny" else tiny_full("llama", seed=5)
        options = {"rank": 2} if strategy == "intra_proma" else {}
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy, **options)
        # 2 prompt groups of 4, shuffled over 2 microbatches of 4
        batches = [padded_batch(4, [2, 3, 1, 2], [4, 3, 5, 2], seed=20 + m) for m in range(2)]
        group_ids = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
        rewards = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
        advantages = torch.tensor([0.4, -0.6, 0.9, 0.1, -0.6, -1.2, 0.4, 0.9], dtype=torch.float64)
        rows = [torch.arange(4), torch.arange(4, 8)]
        with torch.no_grad():  # the sampling policy's mean log-probs (the current one: on-policy)
            phi = torch.cat([(token_logprobs(model, ids, attn) * mask).sum(1) / mask.sum(1) for ids, attn, mask in batches])
        weights = dmpo_weights(rewards, phi, group_ids, alpha=0.25, weight=2.0)

        # the brute force: the whole step's loss in one graph (L_DM through the live mean log-probs)
        with opt.paused():
            logps = [token_logprobs(model, ids, attn) for ids, attn, _ in batches]
            live_phi = torch.cat([(lp * m).sum(1) / m.sum(1) for lp, (_, _, m) in zip(logps, batches)])
            total = sum(policy_loss(lp, m, advantages[r], scale=0.5) for lp, (_, _, m), r in zip(logps, batches, rows))
            total = total + l_dm(rewards, live_phi, group_ids.tolist(), 0.25, 2.0)
            coefficient_grads = torch.autograd.grad(total, logps)
        brute = BruteStep(model, strategy)
        for (ids, attn, mask), grad in zip(batches, coefficient_grads):
            c = grad.sum(1) / mask.sum(1)  # constant along each row's valid tokens:
            assert torch.allclose(grad * mask, c[:, None] * mask, rtol=0, atol=1e-15)
            with opt.paused():
                brute.add(ids, attn, mask, c)

        for (ids, attn, mask), r in zip(batches, rows):
            logp = token_logprobs(model, ids, attn)
            with opt.microbatch(logp, mask):
                loss = policy_loss(logp, mask, advantages[r], scale=0.5) + dmpo_loss(logp, mask, weights[r])
                loss.backward()
        brute.check()
        opt.detach()
