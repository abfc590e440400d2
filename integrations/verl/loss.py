"""The ``gradproj`` policy loss: REINFORCE on verl's advantages, no ratio clipping.

``actor_rollout_ref.actor.policy_loss.loss_mode=gradproj``. The loss is
``agg_loss(-A * log_prob, response_mask, loss_agg_mode)`` -- every aggregation mode verl has
(token-mean, token-sum, seq-mean-token-sum, seq-mean-token-mean, ...) scales each sequence's
log-probs by one constant, which is what gradproj needs -- and it opens ``opt.microbatch(log_prob,
response_mask)`` for the micro-batch, closed by the engine patch after verl's backward. PROMA's
projection takes the place of PPO's clipping; the old log-probs are used only for the
``actor/ppo_kl`` metric.

With ``override_optimizer_config.sgrpo={alpha, p, k, seed}`` the loss is S-GRPO's: each response's
tokens are narrowed to S-GRPO's selection (`gradproj.integrations.torch.sgrpo_token_mask`), which
is both the loss mask and the mask of ``opt.microbatch``, and ``loss_agg_mode`` must be
``seq-mean-token-mean`` (each response's mean over its selected tokens, then the mean over
responses). The draws are seeded from ``seed``, the data-parallel rank, the optimizer step (saved
in verl's checkpoints with the optimizer) and the micro-batch's place in the step. Each rollout
batch is one optimizer step of one pass under the ``gradproj`` loss, so each response's selection
is drawn once.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from gradproj.errors import ConfigError
from gradproj.integrations.torch.token_selection import SGRPOSelection, sgrpo_token_mask
from gradproj.integrations.verl.checks import LOSS_MODE, SGRPO_AGGREGATION
from gradproj.integrations.verl.microbatches import current_slot
from gradproj.integrations.verl.optimizers import SGRPO_ATTR

__all__ = ["compute_policy_loss_gradproj", "register", "sgrpo_of"]

#: per gradproj optimizer: (optimizer step, index of the last micro-batch drawn in that step)
_DRAWN: weakref.WeakKeyDictionary[Any, tuple[int, int]] = weakref.WeakKeyDictionary()


def sgrpo_of(optimizer) -> SGRPOSelection | None:
    """The S-GRPO selection configured for a gradproj optimizer built by verl (or ``None``)."""
    return getattr(getattr(optimizer, "optimizer", None), SGRPO_ATTR, None)


def _sgrpo_selection(selection: SGRPOSelection, optimizer, response_mask: torch.Tensor) -> torch.Tensor:
    """This micro-batch's S-GRPO selection, drawn from (seed, rank, optimizer step, micro-batch index)."""
    step = optimizer.steps
    last = _DRAWN.get(optimizer)
    index = last[1] + 1 if last is not None and last[0] == step else 0
    _DRAWN[optimizer] = (step, index)
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return sgrpo_token_mask(response_mask.bool(), selection.alpha, selection.p, selection.k,
                            generator=selection.generator(rank, step, index))


def compute_policy_loss_gradproj(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss (signature of ``verl.trainer.ppo.core_algos.PolicyLossFn``).

    Args:
        old_log_prob: (bs, response_length) log-probs at rollout time (metrics only).
        log_prob: (bs, response_length) log-probs of the current policy, with grad.
        advantages: (bs, response_length) advantages (constant along each response for GRPO/RLOO...).
        response_mask: (bs, response_length) which tokens count.
        loss_agg_mode: verl's aggregation mode.
        config: the actor config (its ``global_batch_info`` scales the loss as verl's own losses do).
        rollout_is_weights: optional importance weights; they must be constant along each response
            (sequence-level), or gradproj raises its per-token-weights error.

    Returns:
        ``(loss, metrics)``.
    """
    from verl.trainer.ppo.core_algos import agg_loss
    from verl.utils.torch_functional import masked_mean

    weights = advantages if rollout_is_weights is None else advantages * rollout_is_weights
    training = torch.is_grad_enabled() and log_prob.requires_grad
    slot = current_slot() if training else None
    if training and slot is None:
        raise ConfigError(
            f"policy_loss.loss_mode={LOSS_MODE} trains through gradproj's optimizer: set "
            "actor_rollout_ref.actor.optim.optimizer_impl=gradproj.integrations.verl (optimizer=AdamW, and "
            "+actor_rollout_ref.actor.optim.override_optimizer_config.gradproj.strategy=proma)"
        )
    # metrics as tensors, read in one host transfer at the end
    values = {"actor/ppo_kl": masked_mean((old_log_prob - log_prob).detach(), response_mask.to(log_prob.dtype))}
    selection = sgrpo_of(slot.optimizer) if slot is not None else None
    if selection is not None:
        if loss_agg_mode != SGRPO_AGGREGATION:
            raise ConfigError(
                f"override_optimizer_config.sgrpo (S-GRPO) averages each response over its selected tokens: set "
                f"actor_rollout_ref.actor.loss_agg_mode={SGRPO_AGGREGATION} (got {loss_agg_mode!r})"
            )
        selected = _sgrpo_selection(selection, slot.optimizer, response_mask)
        fraction = selected.sum() / response_mask.sum().clamp(min=1)
        values["actor/gradproj/sgrpo/selected_fraction"] = fraction.to(values["actor/ppo_kl"].dtype)
        response_mask = selected
    mask = response_mask.to(log_prob.dtype)
    info = dict(getattr(config, "global_batch_info", None) or {}) if config is not None else {}
    loss = agg_loss(loss_mat=-weights * log_prob, loss_mask=mask, loss_agg_mode=loss_agg_mode, **info)
    if slot is not None:
        slot.open(log_prob, response_mask)
    metrics: dict[str, Any] = dict(zip(values, torch.stack(list(values.values())).tolist(), strict=True))
    return loss, metrics


def register() -> None:
    """Register `compute_policy_loss_gradproj` under ``loss_mode=gradproj`` (idempotent)."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    register_policy_loss(LOSS_MODE)(compute_policy_loss_gradproj)
