"""GRPO helpers for plain PyTorch loops: group advantages, the policy loss, per-step KL."""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "policy_loss", "token_kl"]


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: reward minus its group's mean, optionally divided by the group's std.

    Args:
        rewards: (B,) rewards, consecutive groups of ``group_size`` completions of one prompt.
        group_size: completions per prompt.
        normalize_std: divide by the group's (unbiased) std + ``eps`` as GRPO does.
        eps: added to the std.

    Returns:
        (B,) advantages (zero for groups whose rewards are all equal).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (B,) with B a multiple of group_size={group_size}, got {tuple(rewards.shape)}")
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if normalize_std:
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        centred = torch.nan_to_num(centred / (std + eps), nan=0.0)  # 0/0 in a constant group -> 0
    return centred.reshape(-1)


def policy_loss(logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """On-policy REINFORCE/GRPO loss, token-mean aggregation: ``-sum(A_i logp mask) / sum(mask) * scale``.

    ``scale`` is usually ``1 / number_of_microbatches`` (gradient accumulation).
    """
    mask = mask.to(logp.dtype)
    return -(advantages[:, None].to(logp.dtype) * logp * mask).sum() / mask.sum().clamp(min=1) * scale


def token_kl(logits_before: torch.Tensor, logits_after: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over masked positions of ``KL(pi_before || pi_after)`` over the whole vocabulary."""
    before = torch.log_softmax(logits_before.double(), -1)
    after = torch.log_softmax(logits_after.double(), -1)
    per_token = (before.exp() * (before - after)).sum(-1)
    mask = mask.to(per_token.dtype)
    return float((per_token * mask).sum() / mask.sum().clamp(min=1))
