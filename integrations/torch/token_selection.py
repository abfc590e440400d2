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

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from gradproj.errors import ConfigError

__all__ = ["sgrpo_token_mask", "SGRPOSelection", "as_sgrpo_selection"]


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


@dataclass(frozen=True)
class SGRPOSelection:
    """S-GRPO's token selection as a trainer setting: TRL's ``GradProjGRPOTrainer(..., sgrpo=...)``,
    verl's ``override_optimizer_config.sgrpo``.

    Each response's first ``alpha`` tokens are selected, then each later one with probability ``p``
    while fewer than ``k`` are (`sgrpo_token_mask`); the loss is then each response's mean over its
    selected tokens, averaged over the responses. The trainers draw from `generator`, seeded from
    ``seed`` and the batch's place in the run (process, optimizer step, position in the step): the
    same command gives the same selections, and so does a run resumed from a checkpoint.
    """

    alpha: int
    p: float
    k: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, int) and isinstance(self.k, int) and 0 <= self.alpha <= self.k
                and 0.0 <= float(self.p) <= 1.0):
            raise ConfigError(f"sgrpo: S-GRPO needs integers 0 <= alpha <= k and 0 <= p <= 1, got alpha={self.alpha!r}, "
                              f"k={self.k!r}, p={self.p!r}; fix the sgrpo= setting")

    def generator(self, *key: int) -> torch.Generator:
        """A CPU generator seeded from ``(seed, *key)`` (a stable hash, the same in every process run)."""
        digest = hashlib.sha256("/".join(str(int(v)) for v in (self.seed, *key)).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def as_sgrpo_selection(value: Any) -> SGRPOSelection | None:
    """``None``, an `SGRPOSelection` or a dict of its fields -> a selection (or ``None``)."""
    if value is None or isinstance(value, SGRPOSelection):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"alpha", "p", "k", "seed"})
        if unknown or not {"alpha", "p", "k"} <= set(value):
            raise ConfigError(f"sgrpo: give alpha, p, k (and optionally seed), got {sorted(value)}")
        return SGRPOSelection(**value)
    raise ConfigError(f"sgrpo= must be an SGRPOSelection or a dict with alpha, p, k, seed; got {type(value).__name__}")
