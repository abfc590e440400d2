"""S-GRPO (arXiv 2504.20834): the token selection rule, and the loss on the selected tokens is exact
under every strategy against the float64 brute force (one backward per sequence)."""

import pytest
import torch

import gradproj
from gradproj.integrations.torch import policy_loss, sgrpo_token_mask, token_logprobs
from helpers import TinyLM, float64_exact_norms, padded_batch, tiny_full, trainable
from test_intra_proma import BruteStep


def response_positions(mask):
    return torch.cumsum(mask.long(), dim=1) - 1


@pytest.mark.parametrize("seed", range(5))
def test_the_selection_rule(seed):
    g = torch.Generator().manual_seed(seed)
    # rows with different response starts and lengths (left- or right-aligned layouts alike)
    mask = torch.zeros(6, 30, dtype=torch.bool)
    for i, (start, length) in enumerate([(0, 30), (5, 20), (10, 3), (2, 0), (20, 10), (1, 12)]):
        mask[i, start : start + length] = True
    alpha, k, p = 4, 9, 0.5
    selected = sgrpo_token_mask(mask, alpha, p, k, generator=torch.Generator().manual_seed(seed))
    assert selected.dtype == torch.bool and not (selected & ~mask).any()
    position = response_positions(mask)
    for i in range(6):
        n = int(mask[i].sum())
        chosen = position[i][selected[i]].tolist()
        assert chosen[: min(alpha, n)] == list(range(min(alpha, n)))  # the first alpha always
        assert len(chosen) <= k
    # reproducible with the same generator; p=1 takes the first k, p=0 the first alpha
    again = sgrpo_token_mask(mask, alpha, p, k, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(selected, again)
    first_k = sgrpo_token_mask(mask, alpha, 1.0, k, generator=g)
    assert torch.equal(first_k, mask & (position < k))
    first_alpha = sgrpo_token_mask(mask, alpha, 0.0, k, generator=g)
    assert torch.equal(first_alpha, mask & (position < alpha))


def test_later_tokens_are_kept_with_probability_p():
    mask = torch.ones(4000, 12, dtype=torch.bool)
    selected = sgrpo_token_mask(mask, alpha=2, p=0.3, k=100, generator=torch.Generator().manual_seed(0))
    later = selected[:, 2:].double().mean()
    assert abs(float(later) - 0.3) < 0.01


def test_invalid_settings_are_refused():
    mask = torch.ones(2, 5, dtype=torch.bool)
    for alpha, p, k in [(-1, 0.5, 3), (4, 0.5, 3), (1, 1.5, 3)]:
        with pytest.raises(ValueError, match="S-GRPO needs"):
            sgrpo_token_mask(mask, alpha, p, k)
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(torch.zeros(2, 5), mask, torch.zeros(2), aggregation="median")


@pytest.mark.parametrize("strategy", ["none", "proma", "intra_proma"])
@pytest.mark.parametrize("model_kind", ["tiny", "llama"])
def test_sgrpo_is_exact_under_every_strategy(strategy, model_kind):
    with float64_exact_norms():
        model = TinyLM(seed=2) if model_kind == "tiny" else tiny_full("llama", seed=2)
        options = {"rank": 2} if strategy == "intra_proma" else {}
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy, **options)
        brute = BruteStep(model, strategy)
        microbatches = []
        for m in range(2):
            ids, attn, mask = padded_batch(4, [2, 3, 1, 2], [5, 4, 6, 3], seed=10 + m)
            microbatches.append((ids, attn, mask, torch.randn(4, generator=torch.Generator().manual_seed(m), dtype=torch.float64)))
        scale = 1 / len(microbatches)
        for m, (ids, attn, mask, adv) in enumerate(microbatches):
            selected = sgrpo_token_mask(mask, alpha=1, p=0.5, k=3, generator=torch.Generator().manual_seed(m))
            assert (selected.sum(1) < mask.sum(1)).any()  # a real subset
            # the brute force: c_i = -A_i * scale / (|T_i| B), sequence gradients over the selected tokens
            c = -adv.double() * scale / (selected.sum(1).clamp(min=1).double() * ids.shape[0])
            with opt.paused():
                brute.add(ids, attn, selected, c)
            logp = token_logprobs(model, ids, attn)
            with opt.microbatch(logp, selected):
                policy_loss(logp, selected, adv, scale=scale, aggregation="sequence_mean").backward()
        brute.check()
        opt.detach()
