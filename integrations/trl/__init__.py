"""TRL integration: PROMA and KL-free LoRA GRPO as ``GRPOTrainer`` configuration.

    from gradproj.integrations.trl import GradProjGRPOTrainer, kl_free_lora_grpo

Supported TRL: `SUPPORTED_TRL` (checked at import, with a clear message otherwise).
"""

from gradproj.integrations.trl.version import SUPPORTED_TRL, check_trl_version

check_trl_version()

from gradproj.integrations.trl.presets import KLFreeLoRAGRPO, kl_free_lora_grpo  # noqa: E402
from gradproj.integrations.trl.trainer import (  # noqa: E402
    GradProjGRPOMixin,
    GradProjGRPOTrainer,
    SGRPOSelection,
    check_grpo_config,
    check_sgrpo_config,
)

__all__ = [
    "GradProjGRPOMixin",
    "GradProjGRPOTrainer",
    "SGRPOSelection",
    "check_grpo_config",
    "check_sgrpo_config",
    "kl_free_lora_grpo",
    "KLFreeLoRAGRPO",
    "SUPPORTED_TRL",
    "check_trl_version",
]
