"""Plain-PyTorch helpers against manual computations, and a smoke run of the quickstart CLI."""

import subprocess
import sys

import pytest
import torch

from gradproj.integrations.torch import group_advantages, policy_loss, token_kl, token_logprobs
from helpers import TinyLM, padded_batch


def test_token_logprobs_match_manual_computation():
    model = TinyLM()
    ids, attn, _ = padded_batch(3, [2, 4, 3], [3, 1, 2], seed=0)
    logp = token_logprobs(model, ids, attn)
    logits = model(input_ids=ids, attention_mask=attn).logits
    for i in range(3):
        for t in range(ids.shape[1] - 1):
            expected = torch.log_softmax(logits[i, t], -1)[ids[i, t + 1]]
            assert torch.allclose(logp[i, t], expected, rtol=0, atol=1e-12)


def test_group_advantages_hand_worked():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0])
    adv = group_advantages(rewards, 2, normalize_std=False)
    assert adv.tolist() == [0.5, -0.5, 0.5, -0.5, 0.0, 0.0]
    adv = group_advantages(rewards, 2, normalize_std=True, eps=0.0)
    std = torch.tensor([1.0, 0.0]).std()  # unbiased std of {1, 0}
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]) / std)
    assert adv[4:].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(rewards, 4)


def test_policy_loss_and_kl():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    mask = torch.tensor([[True, False], [True, True]])
    adv = torch.tensor([2.0, -1.0])
    assert float(policy_loss(logp, mask, adv)) == pytest.approx(-(2 * -1.0 + -1 * -0.5 + -1 * -3.0) / 3)
    logits = torch.randn(2, 2, 5)
    assert token_kl(logits, logits, mask) == pytest.approx(0.0, abs=1e-12)
    other = logits + torch.randn(2, 2, 5)
    p, q = torch.log_softmax(logits.double(), -1), torch.log_softmax(other.double(), -1)
    manual = [(p[i, t].exp() * (p[i, t] - q[i, t])).sum() for i, t in [(0, 0), (1, 0), (1, 1)]]
    assert token_kl(logits, other, mask) == pytest.approx(float(sum(manual) / 3), rel=1e-12)


def test_quickstart_cli_smoke():
    out = subprocess.run(
        [sys.executable, "-m", "gradproj.integrations.torch.cli", "quickstart", "--steps", "2", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "proma" in out.stdout and "mean step KL" in out.stdout


def test_cli_bad_strategy_is_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "gradproj.integrations.torch.cli", "quickstart", "--steps", "1", "--no-progress", "--strategies", "bogus"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2
    assert out.stderr.strip().startswith("gradproj: error: ") and "Traceback" not in out.stderr
