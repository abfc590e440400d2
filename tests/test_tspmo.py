"""T-SPMO (arXiv 2504.20834): the prefix-matching advantages against a pure-Python reference, the
loss's gradient under strategy="none" against the float64 brute force of the loss over unique
(prefix, token) pairs, and the refusal under a capturing strategy (nothing changed)."""

import copy

import pytest
import torch

import gradproj
from gradproj.integrations.torch import policy_loss, token_logprobs, tspmo_advantages, tspmo_loss, tspmo_weights
from helpers import TinyLM, float64_exact_norms, rel_err, tiny_full, trainable


def responses(ids, mask):
    """Each row's response tokens, in order (pure Python)."""
    return [[int(x) for x, m in zip(row, keep) if m] for row, keep in zip(ids.tolist(), mask.tolist())]


def reference(ids, mask, rewards, group_size):
    """{(row, position in the response): (A, n)} and |Z|, written out from the definition."""
    ys, R = responses(ids, mask), rewards.tolist()
    out, pairs = {}, set()
    for i, y in enumerate(ys):
        group = range(i - i % group_size, i - i % group_size + group_size)
        for t, v in enumerate(y):
            p = y[:t]
            continuing = [j for j in group if len(ys[j]) > t and ys[j][:t] == p]
            choosing = [j for j in continuing if ys[j][t] == v]
            advantage = sum(R[j] for j in choosing) / len(choosing) - sum(R[j] for j in continuing) / len(continuing)
            out[i, t] = (advantage, len(choosing))
            pairs.add((i // group_size, tuple(p), v))
    return out, len(pairs)


def random_batch(g, groups, group_size, width, vocab, layout):
    """Response tokens from a tiny vocabulary (prefixes collide), each row's run placed per ``layout``."""
    B = groups * group_size
    ids = torch.randint(0, 50, (B, width), generator=g)  # what lies off the mask must not matter
    mask = torch.zeros(B, width, dtype=torch.bool)
    for i in range(B):
        length = int(torch.randint(0, width + 1, (1,), generator=g))
        start = 0 if layout == "right" else int(torch.randint(0, width - length + 1, (1,), generator=g))
        mask[i, start : start + length] = True
        ids[i, start : start + length] = torch.randint(7, 7 + vocab, (length,), generator=g)
    rewards = torch.randint(0, 3, (B,), generator=g).double() / 2
    return ids, mask, rewards


@pytest.mark.parametrize("layout", ["right", "any"])
@pytest.mark.parametrize("seed", range(12))
def test_advantages_match_the_definition(seed, layout):
    g = torch.Generator().manual_seed(seed)
    groups, group_size = 1 + seed % 3, [1, 2, 4, 6][seed % 4]
    ids, mask, rewards = random_batch(g, groups, group_size, width=3 + seed % 5, vocab=1 + seed % 3, layout=layout)
    want, pairs = reference(ids, mask, rewards, group_size)
    got = tspmo_advantages(ids, mask, rewards, group_size)
    weights = tspmo_weights(ids, mask, rewards, group_size)
    assert got.dtype == torch.float64 and got.shape == ids.shape
    assert not (got * ~mask).any() and not (weights * ~mask).any()
    position = torch.cumsum(mask.long(), 1) - 1
    for i, t in zip(*torch.nonzero(mask, as_tuple=True)):
        advantage, n = want[int(i), int(position[i, t])]
        assert abs(float(got[i, t]) - advantage) <= 1e-12
        assert abs(float(weights[i, t]) - advantage / (n * pairs)) <= 1e-12
    # each group's advantages are centred per prefix: sum_v n(p, v) A(p, v) = 0, so the total is too
    assert abs(float(got.sum())) <= 1e-10


def test_a_worked_group():
    # a b | a c | a b | d  with rewards 1, 0, 0, 1: prefix () continues with a (3x) or d (1x)
    ids = torch.tensor([[1, 2], [1, 3], [1, 2], [4, 0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]], dtype=torch.bool)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    got = tspmo_advantages(ids, mask, rewards, group_size=4)
    mean = 0.5
    expected = torch.tensor([[1 / 3 - mean, 0.5 - 1 / 3], [1 / 3 - mean, 0 - 1 / 3], [1 / 3 - mean, 0.5 - 1 / 3], [1 - mean, 0]],
                            dtype=torch.float64)
    assert torch.allclose(got, expected, rtol=0, atol=1e-15)
    # Z = {((), a), ((), d), ((a,), b), ((a,), c)}: |Z| = 4
    weights = tspmo_weights(ids, mask, rewards, group_size=4)
    n = torch.tensor([[3, 2], [3, 1], [3, 2], [1, 1]], dtype=torch.float64)  # completions sharing prefix + token
    assert torch.allclose(weights, expected / (n * 4) * mask, rtol=0, atol=1e-15)


def test_equal_rewards_and_single_completions_give_zero_credit():
    g = torch.Generator().manual_seed(0)
    ids, mask, _ = random_batch(g, 2, 4, width=5, vocab=2, layout="right")
    assert not tspmo_advantages(ids, mask, torch.full((8,), 0.7), group_size=4).any()
    ids, mask, rewards = random_batch(g, 5, 1, width=5, vocab=2, layout="any")
    assert not tspmo_advantages(ids, mask, rewards, group_size=1).any()
    empty = torch.zeros(4, 3, dtype=torch.bool)
    assert not tspmo_weights(ids[:4, :3], empty, rewards[:4], group_size=2).any()


def test_settings_are_checked():
    ids, mask = torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="multiple of group_size"):
        tspmo_advantages(ids, mask, torch.zeros(4), group_size=3)
    with pytest.raises(ValueError, match="same"):
        tspmo_advantages(ids, mask[:, :2], torch.zeros(4), group_size=2)
    gaps = mask.clone()
    gaps[2, 1] = False
    with pytest.raises(ValueError, match="row 2 has gaps"):
        tspmo_weights(ids, gaps, torch.zeros(4), group_size=2)
    with pytest.raises(ValueError, match="weights has shape"):
        tspmo_loss(torch.zeros(4, 3), mask, torch.zeros(4, 2))


def group_batch(groups, group_size, seed, vocab=2):
    """One step's rollouts laid out like TRL (left-padded prompt, response, right padding): the
    completions of a group share their prompt, and their responses (tokens from a tiny vocabulary)
    share prefixes. Returns ids (B, T), attention mask (B, T), response mask (B, T-1) (logp-aligned)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 40, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g) for _ in range(groups)]
    lengths = torch.randint(1, 6, (groups * group_size,), generator=g).tolist()
    p_max, r_max = max(len(p) for p in prompts), max(lengths)
    B = groups * group_size
    ids = torch.zeros(B, p_max + r_max, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = torch.zeros(B, p_max + r_max, dtype=torch.bool)
    for i in range(B):
        prompt, length = prompts[i // group_size], lengths[i]
        ids[i, p_max - len(prompt) : p_max] = prompt
        ids[i, p_max : p_max + length] = torch.randint(3, 3 + vocab, (length,), generator=g)
        attn[i, p_max - len(prompt) : p_max + length] = 1
        resp[i, p_max : p_max + length] = True
    return ids, attn, resp[:, 1:]


def unique_pair_loss(logp, ids, mask, rewards, group_size):
    """-(1/|Z|) sum over the unique (prefix, token) pairs of A(p, v) log pi(v | x, p): one
    representative occurrence per pair, from the written-out reference."""
    want, pairs = reference(ids[:, 1:], mask, rewards, group_size)
    ys, seen, total = responses(ids[:, 1:], mask), set(), 0
    columns = [torch.nonzero(row).flatten().tolist() for row in mask]
    for (i, t), (advantage, _) in sorted(want.items()):
        key = (i // group_size, tuple(ys[i][:t]), ys[i][t])
        if key not in seen:
            seen.add(key)
            total = total - advantage * logp[i, columns[i][t]]
    assert len(seen) == pairs < sum(len(y) for y in ys)  # some pairs are shared
    return total / pairs


@pytest.mark.parametrize("model_kind", ["tiny", "llama"])
def test_loss_gradient_equals_the_unique_pair_brute_force(model_kind):
    with float64_exact_norms():
        model = TinyLM(seed=3) if model_kind == "tiny" else tiny_full("llama", seed=3)
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "none")
        ids, attn, mask = group_batch(groups=2, group_size=4, seed=7)
        rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.25], dtype=torch.float64)
        with opt.paused():
            brute = unique_pair_loss(token_logprobs(model, ids, attn), ids, mask, rewards, group_size=4)
            want = torch.autograd.grad(brute, [p for _, p in trainable(model)])
        weights = tspmo_weights(ids[:, 1:], mask, rewards, group_size=4)
        assert ((weights * mask).abs().amax(1) > 0).all()
        for rows in (torch.tensor([0, 5, 2, 7]), torch.tensor([4, 1, 6, 3])):  # groups span microbatches
            logp = token_logprobs(model, ids[rows], attn[rows])
            with opt.microbatch(logp, mask[rows]):
                tspmo_loss(logp, mask[rows], weights[rows]).backward()
        for (name, p), g in zip(trainable(model), want):
            assert rel_err(p.grad.reshape(-1), g.reshape(-1)) <= 1e-10, name
        opt.detach()


def test_clipped_loss_is_the_on_policy_loss_at_ratio_one_and_clips_per_token():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 5, generator=g) < 0.8
    weights = torch.randn(4, 5, generator=g, dtype=torch.float64)
    a = logp.clone().requires_grad_(True)
    b = logp.clone().requires_grad_(True)
    tspmo_loss(a, mask, weights).backward()
    tspmo_loss(b, mask, weights, old_logp=logp).backward()
    assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-15)
    # moved far up: positive weights are clipped (no gradient), negative ones are not
    c = (logp + 1.0).requires_grad_(True)
    tspmo_loss(c, mask, weights, old_logp=logp, clip_eps=0.2).backward()
    assert not (c.grad * (weights > 0)).any()
    assert torch.allclose(c.grad * (weights < 0), -(weights * mask * torch.exp(torch.ones(())) * (weights < 0)))


def test_a_capturing_strategy_refuses_tspmo_and_changes_nothing():
    model = TinyLM(seed=4)
    opt = gradproj.wrap(torch.optim.AdamW([p for _, p in trainable(model)], lr=1e-2), model, "proma")
    ids, attn, mask = group_batch(groups=2, group_size=4, seed=9)
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.25], dtype=torch.float64)
    advantages = rewards - rewards.view(2, 4).mean(1).repeat_interleave(4)
    for _ in range(2):  # a step (optimizer state), then one microbatch of the next
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask):
            policy_loss(logp, mask, advantages).backward()
        if _ == 0:
            opt.step()
    grads = {n: p.grad.clone() for n, p in trainable(model)}
    state = copy.deepcopy(opt.optimizer.state_dict())
    weights = tspmo_weights(ids[:, 1:], mask, rewards, group_size=4)
    logp = token_logprobs(model, ids, attn)
    with pytest.raises(gradproj.CoefficientError, match="strategy='none'") as raised:
        with opt.microbatch(logp, mask):
            tspmo_loss(logp, mask, weights).backward()
    assert "per-token advantages" in str(raised.value)
    assert all(torch.equal(p.grad, grads[n]) for n, p in trainable(model))
    after = opt.optimizer.state_dict()
    assert after["param_groups"] == state["param_groups"]
    assert all(torch.equal(v, after["state"][k][name]) for k, entry in state["state"].items()
               for name, v in entry.items() if isinstance(v, torch.Tensor))
    opt.detach()
