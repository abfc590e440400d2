"""DMPO's distribution-matching term (Distribution-Matching Policy Optimization, "Beyond Mode
Collapse: Distribution Matching for Diverse Reasoning", arXiv 2605.19461) as per-sequence weights.

For each prompt group ``O = {o_1..o_G}``, a target distribution over the group from the rewards and
the policy's distribution over the group from its length-normalised log-likelihoods (Eqs. 5-7)::

    p_i = softmax_i(r_i / alpha)                     (target, Boltzmann in the rewards)
    phi_i = (1 / |o_i|) sum_t log pi(o_i,t | o_i,<t)  (mean token log-prob)
    q_i = softmax_i(phi_i)                           (the policy's group distribution)
    L_DM = (1 / G) sum_i (p_i - q_i)^2               (Eq. 8: squared error, for bounded gradients)

added to the GRPO loss as ``L_GRPO + lambda * L_DM`` (Eq. 9), averaged over the step's groups.
Its gradient is one weight per sequence on the gradient of ``phi_j``::

    d(lambda L_DM)/d phi_j = lambda / n_groups * (2 / G) * q_j * (d_j - sum_i q_i d_i),  d = q - p

so the term is a coefficient constant along each response (``w_j / |o_j|`` on each of its valid
tokens) and every gradproj strategy stays exact. `dmpo_weights` computes ``w`` for the whole step
from the rewards and the sequences' mean log-probs under the sampling policy (groups may span
microbatches), and `dmpo_loss` is the matching loss term of one microbatch.

(Provenance: the project could read only the paper's abstract; the equations above are the paper's
Eqs. 5-9 as quoted by secondary sources and public re-implementations, which also give the defaults
``lambda = 2.0``, ``alpha = 1/15``.)
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

__all__ = ["dmpo_weights", "dmpo_loss"]


def dmpo_weights(
    rewards: torch.Tensor, sequence_logp: torch.Tensor, group_ids: torch.Tensor | Sequence[Hashable],
    alpha: float = 1 / 15, weight: float = 2.0,
) -> torch.Tensor:
    """Per-sequence weights ``w_j = d(lambda L_DM)/d phi_j`` of one optimizer step (float64).

    Args:
        rewards: (B,) the step's rewards.
        sequence_logp: (B,) each response's mean token log-prob ``phi_j`` under the policy that
            sampled it (on-policy: the current policy at the step's start), e.g.
            ``(logp * mask).sum(1) / mask.sum(1)`` of a no-grad forward.
        group_ids: (B,) the prompt group of each sequence (any order; groups may span microbatches).
        alpha: temperature of the reward target (paper default 1/15).
        weight: lambda, the weight of the term next to the GRPO loss (paper default 2.0).

    Returns:
        (B,) float64 weights; ``sum_j w_j phi_j(theta)`` has the gradient of ``lambda * L_DM``
        (averaged over the step's groups).
    """
    r = torch.as_tensor(rewards).detach().to("cpu", torch.float64).reshape(-1)
    phi = torch.as_tensor(sequence_logp).detach().to("cpu", torch.float64).reshape(-1)
    ids = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    if not (r.numel() == phi.numel() == len(ids)) or r.numel() == 0:
        raise ValueError(f"dmpo_weights needs one reward, sequence_logp and group id per sequence, got "
                         f"{r.numel()}, {phi.numel()} and {len(ids)}")
    if not (torch.isfinite(r).all() and torch.isfinite(phi).all()):
        raise ValueError("dmpo_weights: rewards and sequence_logp must be finite (an empty response gives a NaN "
                         "mean log-prob: drop it or give it at least one token)")
    if not alpha > 0:
        raise ValueError(f"dmpo_weights: alpha must be positive, got {alpha}")
    members: dict = {}
    for index, gid in enumerate(ids):
        members.setdefault(gid, []).append(index)
    w = torch.zeros_like(r)
    for rows in members.values():
        index = torch.tensor(rows)
        size = len(rows)
        p = torch.softmax(r[index] / alpha, 0)
        q = torch.softmax(phi[index], 0)
        d = q - p
        w[index] = (2.0 / size) * q * (d - (q * d).sum())
    return w * (weight / len(members))


def dmpo_loss(logp: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The distribution-matching term of one microbatch: ``sum_j w_j phi_j`` with
    ``phi_j = sum_t logp mask / sum_t mask`` -- add it to the microbatch's policy loss (no
    gradient-accumulation scale: each sequence of the step enters once).

    Args:
        logp: (k, T) token log-probs of the current policy, with grad.
        mask: (k, T) the response tokens (the mask ``phi`` was computed over).
        weights: (k,) these rows' entries of `dmpo_weights`.
    """
    mask = mask.to(logp.dtype)
    phi = (logp * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return (weights.to(device=logp.device, dtype=logp.dtype) * phi).sum()
