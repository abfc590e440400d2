"""Sampling a GRPO step's rollouts with ``generate`` and turning them into training tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Rollout", "sample_rollout"]


@dataclass
class Rollout:
    """One step's sequences.

    Attributes:
        ids: (B, T) prompt (left-padded) + response (right-padded after EOS) token ids.
        attention_mask: (B, T) 1 on real tokens.
        response_mask: (B, T-1) aligned with ``token_logprobs``: position t marks token t+1 as a
            generated token (up to and including EOS).
        rewards: (B,) float64 rewards.
        group_ids: (B,) the prompt index of each row (rows of a group are consecutive).
        completions: the decoded responses.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor
    group_ids: torch.Tensor
    completions: list[str]


@torch.no_grad()
def sample_rollout(model, tok, problems, group_size: int, max_new_tokens: int, temperature: float, seed: int,
                   reward_fn) -> Rollout:
    """Sample ``group_size`` responses per problem (temperature sampling, no top-k/top-p).

    ``problems``: (prompt, answer) pairs; ``reward_fn(completion, answer) -> float``. The global
    torch RNG is seeded with ``seed`` first, so every strategy draws from the same stream.
    """
    prompts = [p for p, _ in problems for _ in range(group_size)]
    answers = [a for _, a in problems for _ in range(group_size)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    out = model.generate(
        **enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    model.train(was_training)
    prompt_len = enc["input_ids"].shape[1]
    response = out[:, prompt_len:]
    is_eos = response == tok.eos_token_id
    after_eos = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0  # strictly after the first EOS
    valid = ~after_eos
    attention = torch.cat([enc["attention_mask"], valid.long()], dim=1)
    response_mask = torch.cat([torch.zeros(len(prompts), prompt_len - 1, dtype=torch.bool), valid], dim=1)
    completions = tok.batch_decode(torch.where(valid, response, tok.pad_token_id), skip_special_tokens=True)
    rewards = torch.tensor([reward_fn(c, a) for c, a in zip(completions, answers)], dtype=torch.float64)
    groups = torch.arange(len(problems)).repeat_interleave(group_size)
    return Rollout(out, attention, response_mask, rewards, groups, completions)
