"""verl plugin: PROMA, Intra-PROMA and KL-free LoRA GRPO in verl with config keys only.

Enable it with configuration (Hydra overrides of verl's ``ppo_trainer.yaml``)::

    actor_rollout_ref.model.external_lib=gradproj.integrations.verl
    actor_rollout_ref.actor.strategy=fsdp2
    actor_rollout_ref.actor.optim.optimizer_impl=gradproj.integrations.verl
    actor_rollout_ref.actor.optim.optimizer=AdamW
    +actor_rollout_ref.actor.optim.override_optimizer_config.gradproj.strategy=proma
    actor_rollout_ref.actor.policy_loss.loss_mode=gradproj

Importing this module (verl does it for ``external_lib`` and for ``optimizer_impl``, in every worker
process) checks the verl version, wraps the engine methods listed in
`gradproj.integrations.verl.patches` and registers the ``gradproj`` policy loss. A failure is an
ImportError that verl raises, not a log line. Supported verl: `SUPPORTED_VERL`.
"""

from gradproj.integrations.verl.version import SUPPORTED_VERL, check_verl_version

check_verl_version()

from gradproj.integrations.verl import loss as _loss  # noqa: E402
from gradproj.integrations.verl import patches as _patches  # noqa: E402
from gradproj.integrations.verl.checks import (  # noqa: E402
    LOSS_MODE,
    check_actor_config,
    check_engine_config,
    check_trainer_config,
)
from gradproj.integrations.verl.loss import compute_policy_loss_gradproj  # noqa: E402
from gradproj.integrations.verl.optimizers import SGD, Adam, AdamW, Optimizer  # noqa: E402

_patches.install()
_loss.register()

__all__ = [
    "AdamW",
    "Adam",
    "SGD",
    "Optimizer",
    "LOSS_MODE",
    "compute_policy_loss_gradproj",
    "check_actor_config",
    "check_engine_config",
    "check_trainer_config",
    "SUPPORTED_VERL",
    "check_verl_version",
]
