"""Start-up checks: a verl configuration gradproj cannot honour fails before the first step.

Each message names the config key and the fix (keys as written in ``ppo_trainer.yaml``, under
``actor_rollout_ref.actor``).
"""

from __future__ import annotations

from gradproj.config import GradProjConfig
from gradproj.errors import ConfigError

__all__ = ["LOSS_MODE", "check_engine_config", "check_actor_config"]

#: the policy loss gradproj registers with verl (REINFORCE on the advantages, no ratio clipping)
LOSS_MODE = "gradproj"

_ACTOR = "actor_rollout_ref.actor"


def check_engine_config(engine_config, model_config=None) -> None:
    """The FSDP engine must be FSDP2, without sequence parallelism or packed-length padding."""
    strategy = getattr(engine_config, "strategy", None)
    if strategy != "fsdp2":
        raise ConfigError(
            f"gradproj needs verl's FSDP2 engine ({_ACTOR}.strategy=fsdp2), got strategy={strategy!r}: FSDP1 "
            "flattens parameters, so layers cannot hand their per-sequence gradients to the strategy"
        )
    sp = getattr(engine_config, "ulysses_sequence_parallel_size", 1) or 1
    if sp > 1:
        raise ConfigError(
            f"gradproj does not support Ulysses sequence parallelism ({_ACTOR}.ulysses_sequence_parallel_size={sp}): "
            "each rank would see a slice of every sequence; set it to 1"
        )
    if getattr(engine_config, "pad_to_length", False):
        raise ConfigError(
            f"gradproj needs the packed tokens unpadded: set {_ACTOR}.fsdp_config.pad_to_length=False"
        )
    if model_config is not None and getattr(model_config, "use_fused_kernels", False):
        raise ConfigError(
            "verl's fused LM-head kernels (actor_rollout_ref.model.use_fused_kernels=True) compute the log-probs "
            "without running the output layer's forward, which gradproj's capture needs; set use_fused_kernels=False"
        )


def check_actor_config(actor_config, gradproj_config: GradProjConfig, needs_capture: bool = True) -> None:
    """The actor's loss must be the ``gradproj`` policy loss, with nothing whose gradient varies per token.

    With ``needs_capture=False`` (strategy ``none`` without diagnostics, e.g. only the LoRA bound
    monitor) gradproj does not split the gradient per sequence, so any verl loss is accepted.
    """
    needs_groups = [name for name in gradproj_config.strategies if name == "variance_scaling"]
    if needs_groups:
        raise ConfigError(
            "variance_scaling needs the prompt groups and rewards of the whole step, which verl's loss does not "
            "see; verl's GRPO advantage (algorithm.norm_adv_by_std_in_grpo=True) applies the same 1/std per group"
        )
    if not needs_capture:
        return
    policy_loss = getattr(actor_config, "policy_loss", None)
    loss_mode = policy_loss.get("loss_mode", "vanilla") if policy_loss is not None else "vanilla"
    if loss_mode != LOSS_MODE:
        raise ConfigError(
            f"gradproj's optimizer runs with its own policy loss: set {_ACTOR}.policy_loss.loss_mode={LOSS_MODE} "
            f"(got {loss_mode!r}). PPO ratio clipping ('vanilla' and its variants) weights tokens unequally once "
            "the ratio leaves 1; PROMA replaces it (a proximal update without a reference policy or clipping)"
        )
    if getattr(actor_config, "use_kl_loss", False):
        raise ConfigError(
            f"{_ACTOR}.use_kl_loss=True adds a per-token KL gradient that is not a per-sequence multiple of the "
            "log-prob gradient; gradproj's strategies are reference-free: set use_kl_loss=False "
            "(and algorithm.use_kl_in_reward=False for KL-free GRPO without a reference worker)"
        )
    entropy = float(getattr(actor_config, "entropy_coeff", 0.0) or 0.0)
    if entropy != 0.0:
        raise ConfigError(
            f"{_ACTOR}.entropy_coeff={entropy} adds an entropy-bonus gradient that gradproj cannot split per "
            "sequence; set entropy_coeff=0"
        )
