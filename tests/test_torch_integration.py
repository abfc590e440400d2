"""Plain-PyTorch helpers against manual computations (log-probs, advantages, losses, rollouts, tasks)."""

import math

import pytest
import torch

import gradproj

from gradproj.integrations.torch import group_advantages, packed_token_logprobs, policy_loss, token_kl, token_logprobs
from helpers import TinyLM, float64_exact_norms, padded_batch, rel_err, tiny_char_model, tiny_full, tiny_hf


def test_token_logprobs_match_manual_computation():
    model = TinyLM()
    ids, attn, _ = padded_batch(3, [2, 4, 3], [3, 1, 2], seed=0)
    logp = token_logprobs(model, ids, attn)
    logits = model(input_ids=ids, attention_mask=attn).logits
    for i in range(3):
        for t in range(ids.shape[1] - 1):
            expected = torch.log_softmax(logits[i, t], -1)[ids[i, t + 1]]
            assert torch.allclose(logp[i, t], expected, rtol=0, atol=1e-12)


def packed_and_padded(lengths, seed=0):
    """The same sequences packed (1, total) with cu_seqlens, and right-padded (k, L) with a mask."""
    g = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(1, 40, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    padded = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    attn = torch.zeros_like(padded)
    for i, seq in enumerate(sequences):
        padded[i, : len(seq)] = seq
        attn[i, : len(seq)] = 1
    return torch.cat(sequences)[None], cu, padded, attn


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_token_logprobs_equal_each_sequence_alone(arch):
    model = tiny_hf(arch, seed=3)
    packed, cu, padded, attn = packed_and_padded([5, 9, 2, 7])
    rows = packed_token_logprobs(model, packed, cu)
    assert rows.shape == (4, 8)
    for i, n in enumerate([5, 9, 2, 7]):
        alone = token_logprobs(model, padded[i : i + 1, :n])[0]
        assert torch.allclose(rows[i, : n - 1], alone, rtol=0, atol=1e-12), i
        assert torch.all(rows[i, n - 1 :] == 0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_token_logprobs(model, packed, cu[:-1])
    with pytest.raises(ValueError, match=r"\(1, total\)"):
        packed_token_logprobs(model, padded, cu)


def test_packed_token_logprobs_refuse_a_transformers_without_packing(monkeypatch):
    """A transformers release that cannot tell packed sequences apart would mix them silently: refused."""
    import transformers.masking_utils as masking

    from gradproj.errors import InputError

    model = tiny_hf("llama", seed=3)
    packed, cu, _, _ = packed_and_padded([3, 4])
    monkeypatch.delattr(masking, "find_packed_sequence_indices")
    with pytest.raises(InputError, match="does not detect packed sequences"):
        packed_token_logprobs(model, packed, cu)


@pytest.mark.parametrize("strategy", ["none", "proma"])
@float64_exact_norms()
def test_packed_token_logprobs_give_the_padded_gradient(strategy):
    """PROMA over packed microbatches (the helper + cu_seqlens) equals PROMA over the same sequences
    right-padded, to float64 round-off; the running gradient and the metrics agree. (Not intra_proma:
    which token rows it keeps depends on round-off -- a sequence's first query carries a gradient
    that is zero in exact arithmetic, left as 1e-20 or exactly 0 depending on the layout.)"""
    grads, metrics = [], []
    for layout in ("packed", "padded"):
        model = tiny_full("llama", seed=4)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = gradproj.wrap(torch.optim.SGD(params, lr=0.1), model, strategy=strategy)
        for m, lengths in enumerate([[5, 9, 2, 7], [3, 6, 6]]):
            packed, cu, padded, attn = packed_and_padded(lengths, seed=m)
            mask = attn[:, 1:].float()
            advantages = torch.linspace(-1, 1, len(lengths), dtype=torch.float64)
            if layout == "packed":
                logp = packed_token_logprobs(model, packed, cu)
                with opt.microbatch(logp, mask, cu_seqlens=cu):
                    policy_loss(logp, mask, advantages, scale=0.5).backward()
            else:
                logp = token_logprobs(model, padded, attn)
                with opt.microbatch(logp, mask):
                    policy_loss(logp, mask, advantages, scale=0.5).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
        metrics.append(opt.metrics())
        opt.detach()
    assert rel_err(grads[0], grads[1]) <= 1e-10
    assert grads[0].abs().max() > 0
    key = f"gradproj/{strategy}/projected_fraction"
    if key in metrics[0]:
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-9)


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


def test_demo_measurements_see_the_distributions_the_loss_trains():
    """The loop's entropy, old log-probs, per-step KL and drift use the position ids of
    token_logprobs: with left-padded prompts of different lengths, the old log-probs equal
    token_logprobs exactly and the entropy equals the one computed from those distributions (a
    forward without position ids, as the loop once measured, gives other numbers on a model with
    absolute positions, GPT-2 here; rotary models are invariant to the shift)."""
    import torch.nn.functional as F
    import transformers

    from gradproj.demo.adder import build_tokenizer
    from gradproj.demo.grpo_loop import InitialPolicy, _distribution_stats, step_kl
    from gradproj.demo.rollout import sample_rollout
    from gradproj.integrations.torch import token_logprobs

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.generation_config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(50)  # positions that matter (a random init's are tiny)
    problems = [("123+456=", "579"), ("7+8=", "15")]  # different prompt lengths: left padding
    roll = sample_rollout(model, tok, problems, group_size=2, max_new_tokens=4, temperature=1.0, seed=0,
                          reward_fn=lambda c, a: 0.0)
    assert (roll.attention_mask[:, 0] == 0).any()
    chunks = torch.arange(4).chunk(2)
    dists, old, entropy = _distribution_stats(model, roll, chunks, keep=True)
    expected_entropy, count, gap = 0.0, 0, 0.0
    with torch.no_grad():
        for index, rows in enumerate(chunks):
            ids, attn, mask = roll.ids[rows], roll.attention_mask[rows], roll.response_mask[rows]
            assert torch.equal(old[index], token_logprobs(model, ids, attn))
            position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
            logq = F.log_softmax(model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits[:, :-1][mask].double(), -1)
            expected_entropy += float(-(logq.exp() * logq).sum())
            count += logq.shape[0]
            bare = F.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1][mask].double(), -1)
            gap = max(gap, float((bare - logq).abs().max()))
    assert entropy == pytest.approx(expected_entropy / count, rel=1e-12)
    assert gap > 1e-2  # the test can tell the two layouts apart
    # unchanged policy: per-step KL and drift are zero (not the gap between two position layouts)
    assert step_kl(model, roll, chunks, dists, old) == pytest.approx(0.0, abs=1e-12)
    assert InitialPolicy(model, lora=False).kl_from(model, roll, chunks) == pytest.approx(0.0, abs=1e-12)
