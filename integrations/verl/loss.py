"""The ``gradproj`` policy loss: REINFORCE on verl's advantages, no ratio clipping.

``actor_rollout_ref.actor.policy_loss.loss_mode=gradproj``. The loss is
``agg_loss(-A * log_prob, response_mask, loss_agg_mode)`` -- every aggregation mode verl has
(token-mean, token-sum, seq-mean-token-sum, seq-mean-token-mean, ...) scales each sequence's
log-probs by one constant, which is what gradproj needs -- and it opens ``opt.microbatch(log_prob,
response_mask)`` for the micro-batch, closed by the engine patch after verl's backward. PROMA's
projection takes the place of PPO's clipping; the old log-probs are used only for the
``actor/ppo_kl`` metric.
"""

from __future__ import annotations

from typing import Any

import torch

from gradproj.errors import ConfigError
from gradproj.integrations.verl.checks import LOSS_MODE
from gradproj.integrations.verl.microbatches import current_slot

__all__ = ["compute_policy_loss_gradproj", "register"]


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
    mask = response_mask.to(log_prob.dtype)
    info = dict(getattr(config, "global_batch_info", None) or {}) if config is not None else {}
    loss = agg_loss(loss_mat=-weights * log_prob, loss_mask=mask, loss_agg_mode=loss_agg_mode, **info)
    metrics = {"actor/ppo_kl": masked_mean((old_log_prob - log_prob).detach(), mask).item()}
    if torch.is_grad_enabled() and log_prob.requires_grad:
        slot = current_slot()
        if slot is None:
            raise ConfigError(
                f"policy_loss.loss_mode={LOSS_MODE} trains through gradproj's optimizer: set "
                "actor_rollout_ref.actor.optim.optimizer_impl=gradproj.integrations.verl (optimizer=AdamW, and "
                "+actor_rollout_ref.actor.optim.override_optimizer_config.gradproj.strategy=proma)"
            )
        slot.open(log_prob, response_mask)
    return loss, metrics


def register() -> None:
    """Register `compute_policy_loss_gradproj` under ``loss_mode=gradproj`` (idempotent)."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    register_policy_loss(LOSS_MODE)(compute_policy_loss_gradproj)
