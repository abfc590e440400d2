"""KL-free LoRA GRPO (seed ``lora-implicit-kl``) as one function, with or without PROMA on top."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gradproj.config import GradProjConfig
from gradproj.errors import ConfigError

__all__ = ["KLFreeLoRAGRPO", "kl_free_lora_grpo"]


@dataclass
class KLFreeLoRAGRPO:
    """The configuration triple; ``GradProjGRPOTrainer(model=..., ..., **preset.trainer_kwargs())``."""

    args: Any  # trl.GRPOConfig
    peft_config: Any  # peft.LoraConfig
    gradproj: GradProjConfig | None = None
    notes: list[str] = field(default_factory=list)

    def trainer_kwargs(self) -> dict[str, Any]:
        """``args=``, ``peft_config=`` and ``gradproj=`` for the trainer."""
        return {"args": self.args, "peft_config": self.peft_config, "gradproj": self.gradproj}


def _device_defaults(grpo_kwargs: dict[str, Any]) -> dict[str, Any]:
    """On a machine without a GPU (and nothing said about it): ``use_cpu=True, bf16=False`` --
    TRL's GRPOConfig defaults to bf16, which it refuses without a GPU."""
    import torch

    if torch.cuda.is_available() or any(key in grpo_kwargs for key in ("use_cpu", "bf16", "fp16")):
        return {}
    return {"use_cpu": True, "bf16": False}


def kl_free_lora_grpo(
    output_dir: str,
    *,
    rank: int = 16,
    lora_alpha: int | None = None,
    target_modules: str | list[str] = "all-linear",
    proma: bool = False,
    strategy: str = "proma",
    strategy_options: dict[str, Any] | None = None,
    **grpo_kwargs: Any,
) -> KLFreeLoRAGRPO:
    """GRPOConfig + LoraConfig of KL-free LoRA GRPO: LoRA of rank ``rank``, ``beta=0`` (no KL term,
    so TRL builds no reference model), on-policy (``num_iterations=1``).

    Args:
        output_dir: TRL's output folder.
        rank: LoRA rank (the seed's knob: the implicit KL bound grows with sqrt(rank)).
        lora_alpha: LoRA alpha (default ``2 * rank``).
        target_modules: peft target modules (``"all-linear"`` excludes the output layer).
        proma: put a gradproj strategy on top (``strategy``, default ``"proma"``).
        strategy_options: options of that strategy (``relative_bound=0.5``, ...).
        **grpo_kwargs: any other GRPOConfig field (``learning_rate``, ``num_generations``, ...).
            Without a GPU and without ``use_cpu``/``bf16``/``fp16`` given, ``use_cpu=True,
            bf16=False`` (TRL's bf16 default is refused on a CPU).

    Raises:
        ConfigError: ``beta`` other than 0 (then it is not KL-free), or settings the strategy refuses.
    """
    from peft import LoraConfig
    from trl import GRPOConfig

    from gradproj.integrations.trl.trainer import check_grpo_config

    if grpo_kwargs.get("beta", 0.0) != 0.0:
        raise ConfigError(f"KL-free LoRA GRPO has beta=0 (no KL penalty, no reference model); got beta={grpo_kwargs['beta']}")
    settings = {"beta": 0.0, "num_iterations": 1, "loss_type": "dapo", "scale_rewards": "group", **_device_defaults(grpo_kwargs),
                **grpo_kwargs}
    args = GRPOConfig(output_dir=output_dir, **settings)
    peft_config = LoraConfig(
        r=rank, lora_alpha=lora_alpha or 2 * rank, lora_dropout=0.0, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    config = GradProjConfig(strategy=strategy, **(strategy_options or {})) if proma else None
    if config is not None:
        check_grpo_config(args, config)
    return KLFreeLoRAGRPO(args=args, peft_config=peft_config, gradproj=config)
