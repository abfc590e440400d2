"""The per-step KL between the policy before and after an update, from two sets of log-probs."""

from __future__ import annotations

import torch

from gradproj.errors import InputError

__all__ = ["policy_kl"]


def policy_kl(logp_before: torch.Tensor, logp_after: torch.Tensor, mask: torch.Tensor | None = None,
              estimator: str = "k3") -> float:
    """``KL(pi_before || pi_after)`` per token, averaged over the valid tokens.

    Args:
        logp_before: (B, T) log-probs of the sampled tokens under the policy that sampled them
            (before the update), or (B, T, V) full log-distributions.
        logp_after: the same under the updated policy (same shape).
        mask: (B, T) valid tokens (``None``: all).
        estimator: for sampled-token log-probs (2-D inputs): ``"k1"`` (``logp_before - logp_after``,
            unbiased, can be negative) or ``"k3"`` (``exp(r) - 1 - r`` with ``r = logp_after -
            logp_before``: unbiased, non-negative, low variance). With 3-D inputs the KL is exact
            (``sum_v p_before (log p_before - log p_after)``) and ``estimator`` is ignored.

    Returns:
        The token-mean KL as a float (0.0 when no token is valid).
    """
    if not isinstance(logp_before, torch.Tensor) or not isinstance(logp_after, torch.Tensor):
        raise InputError("policy_kl: logp_before and logp_after must be tensors")
    if logp_before.shape != logp_after.shape or logp_before.dim() not in (2, 3):
        raise InputError(
            f"policy_kl: logp_before {tuple(logp_before.shape)} and logp_after {tuple(logp_after.shape)} must "
            "have the same (B, T) or (B, T, V) shape"
        )
    if estimator not in ("k1", "k3"):
        raise InputError(f"policy_kl: estimator must be 'k1' or 'k3', got {estimator!r}")
    before = logp_before.detach().double()
    after = logp_after.detach().double()
    if before.dim() == 3:
        per_token = (before.exp() * (before - after)).sum(dim=-1)
    elif estimator == "k1":
        per_token = before - after
    else:
        ratio = after - before
        per_token = torch.expm1(ratio) - ratio
    if mask is None:
        mask = torch.ones(per_token.shape, dtype=torch.bool, device=per_token.device)
    elif tuple(mask.shape) != tuple(per_token.shape):
        raise InputError(f"policy_kl: mask has shape {tuple(mask.shape)}, expected {tuple(per_token.shape)}")
    mask = mask.to(torch.bool)
    count = int(mask.sum())
    return float((per_token * mask).sum() / count) if count else 0.0
