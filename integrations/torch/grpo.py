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


def policy_loss(
    logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    scale: float = 1.0,
    old_logp: torch.Tensor | None = None,
    aggregation: str = "token_mean",
    ratio_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """REINFORCE/GRPO loss: ``-sum(A_i logp mask) / sum(mask) * scale`` (token mean).

    Args:
        logp: (B, T) token log-probs of the current policy, with grad.
        mask: (B, T) which tokens count.
        advantages: (B,) one advantage per sequence.
        scale: usually ``1 / number_of_microbatches`` (gradient accumulation).
        old_logp: (B, T) log-probs of the policy that *sampled* the sequences, when it is no longer
            the current one (a second update on the same rollouts). Each sequence is then weighted
            by its importance ratio ``r_i = exp(sum_t mask (logp - old_logp))`` -- the likelihood
            ratio of the whole response, constant along the row, so every gradproj strategy stays
            exact -- which makes the gradient an unbiased estimate of the on-policy gradient at the
            current policy. (Its variance grows with the response length and with how far the policy
            moved.) Without it, reusing rollouts trains on the old policy's samples as if they were
            the current policy's: a biased gradient that gradproj cannot detect.
        aggregation: ``"token_mean"`` (every valid token of the microbatch weighs the same) or
            ``"sequence_mean"`` (each row's mean over its valid tokens, then the mean over the rows:
            ``-mean_i (A_i / |T_i|) sum_t logp mask * scale``, as S-GRPO averages its selected tokens).
        ratio_mask: the tokens the importance ratio runs over (default ``mask``): all of the
            response when the loss covers only some of its tokens (S-GRPO), since the whole
            response was sampled. Used only with ``old_logp``.

    Returns:
        The scalar loss; call ``.backward()`` inside ``opt.microbatch(logp, mask)``.
    """
    mask = mask.to(logp.dtype)
    weights = advantages[:, None].to(logp.dtype)
    if old_logp is not None:
        if old_logp.shape != logp.shape:
            raise ValueError(f"old_logp has shape {tuple(old_logp.shape)} but logp has {tuple(logp.shape)}")
        if ratio_mask is not None and ratio_mask.shape != logp.shape:
            raise ValueError(f"ratio_mask has shape {tuple(ratio_mask.shape)} but logp has {tuple(logp.shape)}")
        over = mask if ratio_mask is None else ratio_mask.to(logp.dtype)
        ratio = torch.exp(((logp.detach() - old_logp.to(logp.dtype)) * over).sum(dim=1))
        weights = weights * ratio[:, None]
    if aggregation == "token_mean":
        return -(weights * logp * mask).sum() / mask.sum().clamp(min=1) * scale
    if aggregation == "sequence_mean":
        per_row = (weights * logp * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return -per_row.mean() * scale
    raise ValueError(f"aggregation must be 'token_mean' or 'sequence_mean', got {aggregation!r}")


def token_kl(logits_before: torch.Tensor, logits_after: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over masked positions of ``KL(pi_before || pi_after)`` over the whole vocabulary."""
    before = torch.log_softmax(logits_before.double(), -1)
    after = torch.log_softmax(logits_after.double(), -1)
    per_token = (before.exp() * (before - after)).sum(-1)
    mask = mask.to(per_token.dtype)
    return float((per_token * mask).sum() / mask.sum().clamp(min=1))
