"""Plain-PyTorch helpers against manual computations (log-probs, advantages, losses, rollouts, tasks)."""

import math

import pytest
import torch

import gradproj

from gradproj.integrations.torch import group_advantages, policy_loss, token_kl, token_logprobs
from helpers import TinyLM, padded_batch, tiny_char_model


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


def test_clipped_loss_matches_manual_ppo():
    from gradproj.demo.grpo_loop import clipped_loss

    logp = torch.tensor([[-1.0, -0.5], [-2.0, -0.1]])
    old = torch.tensor([[-1.5, -0.5], [-1.0, -0.3]])
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -2.0])
    terms = []
    for i, t in [(0, 0), (0, 1), (1, 0)]:
        r = math.exp(float(logp[i, t] - old[i, t]))
        a = float(adv[i])
        terms.append(-min(r * a, min(max(r, 0.8), 1.2) * a))
    assert float(clipped_loss(logp, old, mask, adv, 0.2, 0.5)) == pytest.approx(sum(terms) / 3 * 0.5, rel=1e-6)
    # at ratio 1 PPO-clip has the REINFORCE gradient
    lp = logp.clone().requires_grad_(True)
    clipped_loss(lp, lp.detach(), mask, adv, 0.2, 1.0).backward()
    lp2 = logp.clone().requires_grad_(True)
    policy_loss(lp2, mask, adv).backward()
    assert torch.allclose(lp.grad, lp2.grad)


def test_rollout_masks_and_rewards():
    from gradproj.demo.adder import build_tokenizer
    from gradproj.demo.rollout import sample_rollout

    tok = build_tokenizer()
    model = tiny_char_model(tok)
    problems = [("12+3=", "15"), ("7+8=", "15")]
    roll = sample_rollout(model, tok, problems, group_size=3, max_new_tokens=4, temperature=1.0, seed=0,
                          reward_fn=lambda c, a: float(c.strip() == a))
    assert roll.ids.shape[0] == 6 and roll.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    prompt_len = roll.ids.shape[1] - 4
    assert roll.response_mask.shape == (6, roll.ids.shape[1] - 1)
    assert not roll.response_mask[:, : prompt_len - 1].any()
    for i in range(6):
        response = roll.ids[i, prompt_len:].tolist()
        valid = roll.response_mask[i, prompt_len - 1 :].tolist()
        if tok.eos_token_id in response:
            cut = response.index(tok.eos_token_id) + 1  # EOS is a response token
            assert valid == [True] * cut + [False] * (4 - cut)
        else:
            assert all(valid)
        assert roll.attention_mask[i, prompt_len:].tolist() == [int(v) for v in valid]
        assert roll.rewards[i] == float(roll.completions[i].strip() == problems[i // 3][1])
    again = sample_rollout(model, tok, problems, 3, 4, 1.0, seed=0, reward_fn=lambda c, a: 0.0)
    assert torch.equal(again.ids, roll.ids)  # same seed, same samples


def test_task_rewards():
    from gradproj.demo.tasks import AdditionTask, make_task

    task = AdditionTask()
    assert task.reward(" 15\nxyz", "15") == 1.0 and task.reward("16", "15") == 0.0
    assert task.train_problems(3, 4, seed=1) == task.train_problems(3, 4, seed=1)
    assert task.train_problems(3, 4, seed=1) != task.train_problems(4, 4, seed=1)
    assert len(task.eval_problems()) == 200
    with pytest.raises(gradproj.ConfigError, match="unknown task"):
        make_task("chess")


def test_adder_policy_is_cached_and_deterministic(tmp_path):
    from gradproj.demo.adder import AdderPolicyConfig, adder_policy

    cfg = AdderPolicyConfig(hidden=16, layers=1, heads=2, batch=8, max_steps=6, eval_every=3, eval_problems=8)
    first = adder_policy(cfg, progress=False, cache=tmp_path / "a")
    second = adder_policy(cfg, progress=False, cache=tmp_path / "b")
    from safetensors.torch import load_file

    wa, wb = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert adder_policy(cfg, progress=False, cache=tmp_path / "a") == first  # loaded, not retrained
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
