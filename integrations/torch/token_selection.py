"""S-GRPO's token selection (Stochastic-GRPO, Lee & Tong, "Token-Efficient RL for LLM Reasoning",
arXiv 2504.20834): train on a small, informative subset of each response's tokens.

For each response, its first ``alpha`` tokens are always selected; later tokens are then considered
in order, each selected with probability ``p``, while fewer than ``k`` tokens are selected::

    t in T_i  <=>  1              if t < alpha
                   Bernoulli(p)   if t >= alpha and |T_i| < k
                   0              otherwise

The loss is GRPO's on the selected tokens, averaged per response (``1/|T_i|``) and then over the
responses: ``policy_loss(logp, selected, advantages, aggregation="sequence_mean")``. Pass the
selection as the mask of ``opt.microbatch`` as well: each sequence's gradient is then the sum over
its selected tokens, its coefficient is constant along them, and every gradproj strategy stays
exact (tested against the float64 brute force).
"""

from __future__ import annotations

import torch

__all__ = ["sgrpo_token_mask"]


def sgrpo_token_mask(
    response_mask: torch.Tensor, alpha: int, p: float, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """S-GRPO's selected tokens: a subset of ``response_mask``.

    Args:
        response_mask: (B, T) the response tokens of each row (aligned with ``token_logprobs``:
            any layout, the response need not start at the same column in every row).
        alpha: the first ``alpha`` response tokens of each row are always selected.
        p: probability of selecting each later token (in [0, 1]).
        k: at most ``k`` tokens are selected per row (the early ones count); ``k >= alpha``.
        generator: a CPU ``torch.Generator`` for the Bernoulli draws (reproducible selections;
            the draws are made on the CPU and moved to the mask's device).

    Returns:
        (B, T) bool mask of the selected tokens.
    """
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be (B, T), got shape {tuple(response_mask.shape)}")
    if alpha < 0 or k < alpha or not 0.0 <= p <= 1.0:
        raise ValueError(f"S-GRPO needs 0 <= alpha <= k and 0 <= p <= 1, got alpha={alpha}, k={k}, p={p}")
    valid = response_mask.bool()
    position = torch.cumsum(valid.long(), dim=1) - 1  # index of each response token within its response
    early = valid & (position < alpha)
    draws = torch.rand(valid.shape, generator=generator, device="cpu").to(valid.device) < p
    later = valid & ~early & draws
    # keep later tokens in order while the running count stays below k
    count = early.long().sum(dim=1, keepdim=True) + torch.cumsum(later.long(), dim=1)
    return early | (later & (count <= k))
