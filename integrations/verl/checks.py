"""Start-up checks: a verl configuration gradproj cannot honour fails before the first step.

Each message names the config key and the fix (keys as written in ``ppo_trainer.yaml``, under
``actor_rollout_ref.actor``).
"""

from __future__ import annotations

from gradproj.config import GradProjConfig
from gradproj.errors import ConfigError

__all__ = [
    "LOSS_MODE",
    "SGRPO_AGGREGATION",
    "check_engine_config",
    "check_actor_config",
    "check_sgrpo_config",
    "check_trainer_config",
    "check_optimizer_steps",
    "requested_gradproj",
]

#: the policy loss gradproj registers with verl (REINFORCE on the advantages, no ratio clipping)
LOSS_MODE = "gradproj"

#: the aggregation S-GRPO's loss is: each response's mean over its selected tokens, then the mean
SGRPO_AGGREGATION = "seq-mean-token-mean"

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


def _get(node, path: str, default=None):
    """``node.a.b.c`` of an OmegaConf node, a dataclass or a dict; ``default`` where a key is missing."""
    for key in path.split("."):
        if node is None:
            return default
        node = node.get(key, None) if hasattr(node, "get") and not hasattr(node, "__dataclass_fields__") else getattr(node, key, None)
    return default if node is None else node


def requested_gradproj(actor_config) -> tuple[GradProjConfig | None, bool]:
    """From the actor's config: the gradproj config its optimizer asks for (``None`` if it does not
    use gradproj's optimizer), and whether gradproj captures per-sequence gradients -- the setting
    under which every optimizer step must be on-policy (also when only the loss is gradproj's)."""
    from gradproj.integrations.verl.optimizers import gradproj_config, requested_config

    config = None
    if requested_config(_get(actor_config, "optim")):
        config = gradproj_config(_get(actor_config, "optim.override_optimizer_config.gradproj"))
    captures = config is not None and config.needs_capture()
    loss_mode = _get(actor_config, "policy_loss.loss_mode", "vanilla")
    return config, captures or loss_mode == LOSS_MODE


def check_trainer_config(config) -> None:
    """The whole verl configuration, in the trainer process before any worker starts: with gradproj
    capturing, every optimizer step must use rollouts of the current policy.

    gradproj's ``gradproj`` loss is REINFORCE without an importance ratio: it is exact for one
    optimizer step per rollout batch, and would silently train later steps on an older policy's
    samples. Refused, each with the key to change: ``ppo_epochs > 1``, ``ppo_mini_batch_size <
    data.train_batch_size``, the v1 trainer's asynchronous modes and ``parameter_sync_step > 1``, a
    custom replay sampler, and replayed (skipped) rollouts.
    """
    actor = _get(config, "actor_rollout_ref.actor")
    _, captures = requested_gradproj(actor)
    if not captures:
        return
    problems = []
    epochs = int(_get(actor, "ppo_epochs", 1))
    if epochs != 1:
        problems.append(f"{_ACTOR}.ppo_epochs={epochs} reuses each rollout {epochs} times; set ppo_epochs=1")
    mini, train = _get(actor, "ppo_mini_batch_size"), _get(config, "data.train_batch_size")
    if mini is not None and train is not None and int(mini) != int(train):
        problems.append(
            f"{_ACTOR}.ppo_mini_batch_size={mini} < data.train_batch_size={train} takes several optimizer steps per "
            f"rollout; set ppo_mini_batch_size={train} (one step per rollout: gradproj projects across its "
            "micro-batches instead)"
        )
    if bool(_get(config, "trainer.use_v1", True)):
        mode = _get(config, "trainer.v1.trainer_mode", "sync")
        if mode != "sync":
            problems.append(
                f"trainer.v1.trainer_mode={mode} trains on rollouts of older policies; use trainer.v1.trainer_mode=sync"
            )
        sync_step = int(_get(config, f"trainer.v1.{mode}.parameter_sync_step", 1) or 1)
        if sync_step != 1:
            problems.append(
                f"trainer.v1.{mode}.parameter_sync_step={sync_step} takes {sync_step} optimizer steps between weight "
                "syncs to the rollout; set it to 1"
            )
        if _get(config, "trainer.v1.sampler.custom_sampler.path") and _get(config, "trainer.v1.sampler.custom_sampler.name"):
            problems.append(
                "trainer.v1.sampler.custom_sampler may hand the actor rollouts of older policies; remove it"
            )
    for name in ("rollout", "rollout_tq", "async_rollout"):
        if bool(_get(config, f"skip.{name}.enable", False)):
            problems.append(f"skip.{name}.enable=True replays cached rollouts of another policy; set it to False")
    if problems:
        raise ConfigError(
            "gradproj's loss is exact only when every optimizer step uses rollouts of the current policy (it has no "
            "importance ratio); this verl configuration breaks that: " + "; ".join(problems)
        )


def check_optimizer_steps(steps: int) -> None:
    """At an actor update: refuse more than one optimizer step on one rollout batch (before any)."""
    if steps > 1:
        raise ConfigError(
            f"verl is about to take {steps} optimizer steps on one rollout batch (ppo_epochs x mini-batches); "
            "gradproj's loss is exact only for one step per rollout (it has no importance ratio). Set "
            f"{_ACTOR}.ppo_epochs=1 and {_ACTOR}.ppo_mini_batch_size=data.train_batch_size"
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
    epochs = int(getattr(actor_config, "ppo_epochs", 1) or 1)
    if epochs != 1:
        raise ConfigError(
            f"{_ACTOR}.ppo_epochs={epochs} reuses each rollout {epochs} times, so from the second pass on the "
            "policy has moved and gradproj's loss (no importance ratio) would be off-policy; set ppo_epochs=1"
        )
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
    if getattr(actor_config, "calculate_entropy", False):
        raise ConfigError(
            f"{_ACTOR}.calculate_entropy=True makes verl add its entropy term to the loss (times entropy_coeff, "
            "even when that is 0), a term computed from the logits outside the log-probs, which gradproj refuses; "
            "set calculate_entropy=False"
        )


def check_sgrpo_config(actor_config, selection) -> None:
    """With ``override_optimizer_config.sgrpo``, the loss must be the ``gradproj`` policy loss (the
    one that applies the selection) aggregated as S-GRPO's: each response's mean over its selected
    tokens, then the mean over responses (``loss_agg_mode=seq-mean-token-mean``)."""
    if selection is None:
        return
    problems = []
    loss_mode = _get(actor_config, "policy_loss.loss_mode", "vanilla")
    if loss_mode != LOSS_MODE:
        problems.append(f"set {_ACTOR}.policy_loss.loss_mode={LOSS_MODE} (got {loss_mode!r}): only gradproj's loss applies "
                        "the selection, any other would train on every token")
    mode = _get(actor_config, "loss_agg_mode", "token-mean")
    if mode != SGRPO_AGGREGATION:
        problems.append(f"set {_ACTOR}.loss_agg_mode={SGRPO_AGGREGATION} (got {mode!r}): S-GRPO averages each response "
                        "over its own selected tokens")
    if problems:
        raise ConfigError("override_optimizer_config.sgrpo (S-GRPO's token selection): " + "; ".join(problems))
