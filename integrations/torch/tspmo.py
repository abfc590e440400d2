"""T-SPMO's token-level credit (Token-Specific Prefix Matching Optimization, Lee & Tong,
"Token-Efficient RL for LLM Reasoning", arXiv 2504.20834 -- the paper of S-GRPO too).

For a group of ``G`` completions ``y^1..y^G`` of one prompt with rewards ``R_j``, the token ``v``
that completion ``i`` chose at response position ``t`` after the prefix ``p = y^i_{<t}`` gets the
advantage of choosing ``v`` over the group's other continuations of the same prefix::

    A(p, v) = mean{R_j : y^j_{<t} = p, y^j_t = v}  -  mean{R_j : y^j_{<t} = p, y^j has a token at t}

and the loss runs over the group's *unique* (prefix, token) pairs ``Z`` (on-policy)::

    L = -(1 / |Z|) sum_{(p, v) in Z} A(p, v) log pi(v | x, p)

In per-token form each occurrence gets the weight ``w_{i,t} = A_{i,t} / (n(p, v) |Z|)``, with
``n(p, v)`` the number of completions sharing that prefix and token: they all carry the same
log-prob, so the per-token sum is the sum over unique pairs. `tspmo_weights` computes ``w`` for the
step's rollouts (``Z`` counts the pairs of all the groups passed together), `tspmo_loss` is one
microbatch's loss (optionally PPO-clipped per token against the sampling policy's log-probs).

**Strategy**: the weights vary along a response (each token has its own advantage), so there is no
per-sequence gradient for PROMA, Intra-PROMA or ISOPO to act on: run T-SPMO with
``strategy="none"`` (plain accumulation, exact for any loss). Capturing strategies refuse the loss
with a `gradproj.CoefficientError` in the backward, before ``.grad`` or the optimizer state change.

(Provenance: the paper's full text was not available to this project; the formula follows the
paper's description -- advantages from prefix matching within the group, a loss over the unique
(prefix, token) pairs -- and its constants and normalisation could not be checked against it.)
"""

from __future__ import annotations

import torch

__all__ = ["tspmo_advantages", "tspmo_weights", "tspmo_loss"]


def tspmo_advantages(
    response_ids: torch.Tensor, response_mask: torch.Tensor, rewards: torch.Tensor, group_size: int
) -> torch.Tensor:
    """T-SPMO's per-token advantages ``A(y^i_{<t}, y^i_t)`` (float64, 0 off the mask).

    Args:
        response_ids: (B, T) the token at each position, aligned with ``response_mask`` (and with
            ``token_logprobs``: ``input_ids[:, 1:]``).
        response_mask: (B, T) each row's response tokens, one contiguous run per row (any layout:
            right padding, or a response that starts at a different column in every row).
        rewards: (B,) rewards, consecutive groups of ``group_size`` completions of one prompt.
        group_size: completions per prompt.

    Returns:
        (B, T) float64 advantages on ``response_ids``'s device.
    """
    advantages, _, _ = _credit(response_ids, response_mask, rewards, group_size)
    return advantages


def tspmo_weights(
    response_ids: torch.Tensor, response_mask: torch.Tensor, rewards: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Per-token loss weights ``w_{i,t} = A_{i,t} / (n(p, v) |Z|)`` of one optimizer step (float64).

    ``sum_{i,t} w_{i,t} log pi(y^i_t | x, y^i_{<t})`` is ``(1/|Z|) sum_{(p,v) in Z} A(p,v) log pi(v | x, p)``,
    ``Z`` the unique (prefix, token) pairs of all the groups passed (pass the whole step's rollouts,
    then slice rows per microbatch). Arguments as `tspmo_advantages`.

    Returns:
        (B, T) float64 weights on ``response_ids``'s device (0 off the mask).
    """
    advantages, counts, pairs = _credit(response_ids, response_mask, rewards, group_size)
    return advantages / (counts.clamp(min=1) * max(pairs, 1))


def tspmo_loss(
    logp: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    clip_eps: float = 0.2,
) -> torch.Tensor:
    """One microbatch's T-SPMO loss ``-sum_{i,t} w_{i,t} logp_{i,t}`` over ``mask`` -- no
    gradient-accumulation scale: each token of the step enters once with its `tspmo_weights` entry.
    Call ``.backward()`` inside ``opt.microbatch(logp, mask)`` of a ``strategy="none"`` optimizer.

    Args:
        logp: (k, T) token log-probs of the current policy, with grad.
        mask: (k, T) the response tokens (the mask the weights were computed over).
        weights: (k, T) these rows' entries of `tspmo_weights`.
        old_logp: (k, T) log-probs of the policy that sampled the rollouts, once the policy has
            moved (a second update on the same rollouts): each token is then PPO-clipped,
            ``-sum min(rho w, clip(rho, 1 - clip_eps, 1 + clip_eps) w)`` with
            ``rho = exp(logp - old_logp)``. Without it the loss is on-policy (``rho = 1``).
        clip_eps: the clip range (used only with ``old_logp``).
    """
    mask = mask.to(logp.dtype)
    weights = weights.to(device=logp.device, dtype=logp.dtype)
    if weights.shape != logp.shape:
        raise ValueError(f"weights has shape {tuple(weights.shape)} but logp has {tuple(logp.shape)}")
    if old_logp is None:
        return -(weights * logp * mask).sum()
    if old_logp.shape != logp.shape:
        raise ValueError(f"old_logp has shape {tuple(old_logp.shape)} but logp has {tuple(logp.shape)}")
    ratio = torch.exp(logp - old_logp.to(logp.dtype))
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return -(torch.minimum(ratio * weights, clipped * weights) * mask).sum()


def _credit(response_ids, response_mask, rewards, group_size):
    """(advantages, n(p, v) per token, |Z|) -- exact prefix matching, vectorised.

    Each row's response is moved to the left (``compact``), and the rows are sorted
    lexicographically by (group, tokens, padding): rows sharing a group and a prefix of length
    ``t`` are then contiguous, and the runs are cut where two neighbours' common prefix is shorter.
    The run of a row at length ``t`` identifies its prefix ``y_{<t}``; at length ``t + 1``, its
    (prefix, token) pair. Sums per run come from one ``scatter_add`` per column.
    """
    if response_ids.dim() != 2 or response_mask.shape != response_ids.shape:
        raise ValueError(f"response_ids and response_mask must be the same (B, T) shape, got "
                         f"{tuple(response_ids.shape)} and {tuple(response_mask.shape)}")
    B = response_ids.shape[0]
    if group_size < 1 or B % group_size or rewards.shape != (B,):
        raise ValueError(f"rewards must be (B,) with B={B} a multiple of group_size={group_size}, got "
                         f"{tuple(rewards.shape)}")
    device = response_ids.device
    valid = response_mask.bool()
    before = torch.cat([torch.zeros_like(valid[:, :1]), valid[:, :-1]], 1)
    starts = (valid & ~before).sum(1)  # runs of response tokens per row
    if bool((starts > 1).any()):
        row = int(torch.nonzero(starts > 1).flatten()[0])
        raise ValueError(f"response_mask row {row} has gaps: T-SPMO matches prefixes of the whole response, so each "
                         "row's response must be one contiguous run of tokens (pass the response mask, not a selection)")
    lengths = valid.sum(1)
    L = int(lengths.max()) if B else 0
    if L == 0:
        zeros = torch.zeros(response_ids.shape, dtype=torch.float64, device=device)
        return zeros, zeros.clone(), 0
    # left-aligned responses; padding gets a value below every token id
    position = torch.cumsum(valid.long(), 1) - 1
    pad = response_ids.min() - 1
    compact = torch.full((B, L), 0, dtype=torch.long, device=device) + pad
    rows = torch.arange(B, device=device)[:, None].expand_as(valid)
    compact[rows[valid], position[valid]] = response_ids[valid].long()
    live = torch.arange(L, device=device)[None] < lengths[:, None]  # (B, L) compact validity
    groups = torch.arange(B, device=device) // group_size
    keyed = torch.cat([groups[:, None], compact], 1)  # (B, 1 + L)
    _, inverse = torch.unique(keyed, dim=0, sorted=True, return_inverse=True)  # lexicographic row order
    order = torch.argsort(inverse, stable=True)
    keyed, live_s = keyed[order], live[order]
    reward_s = rewards.detach().to(device=device, dtype=torch.float64)[order]
    # common leading columns (group + tokens) of each row with the previous one in sorted order
    same = (keyed[1:] == keyed[:-1]).long()
    common = torch.cat([torch.zeros(1, dtype=torch.long, device=device), torch.cumprod(same, 1).sum(1)])
    # run[:, t]: the run of rows sharing the group and the first t tokens (t = 0..L), ids 1..B
    run = torch.cumsum((common[:, None] < 1 + torch.arange(L + 1, device=device)[None]).long(), 0)
    weight = live_s.to(torch.float64)
    prefix, pair = run[:, :L], run[:, 1:]

    def run_mean(index):
        total = torch.zeros(B + 1, L, dtype=torch.float64, device=device).scatter_add_(0, index, reward_s[:, None] * weight)
        count = torch.zeros(B + 1, L, dtype=torch.float64, device=device).scatter_add_(0, index, weight)
        return total.gather(0, index) / count.gather(0, index).clamp(min=1), count

    pair_mean, pair_count = run_mean(pair)
    prefix_mean, _ = run_mean(prefix)
    advantage_s = (pair_mean - prefix_mean) * weight
    count_s = pair_count.gather(0, pair) * weight
    pairs = int((pair_count > 0).sum())  # one entry per (position, pair run) that has a token
    # back to the input's row order and layout
    advantage_c, count_c = torch.empty_like(advantage_s), torch.empty_like(count_s)
    advantage_c[order], count_c[order] = advantage_s, count_s
    advantages = torch.zeros(response_ids.shape, dtype=torch.float64, device=device)
    counts = torch.zeros_like(advantages)
    advantages[valid] = advantage_c[rows[valid], position[valid]]
    counts[valid] = count_c[rows[valid], position[valid]]
    return advantages, counts, pairs
