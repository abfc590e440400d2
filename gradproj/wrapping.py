"""``gradproj.wrap``: validate the optimizer, the model and the config, then attach an engine.

The one place a configuration becomes running objects: the strategies are built from the config
(`gradproj.GradProjConfig.resolve`), the engine gets its plain settings, and the wrapper
shares the inner optimizer's state.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import nn

from gradproj.capture.engine import CaptureEngine
from gradproj.capture.setup import CaptureSettings
from gradproj.config import GradProjConfig
from gradproj.errors import ConfigError
from gradproj.optimizer import GradProjOptimizer

__all__ = ["wrap", "capture_settings"]


def capture_settings(config: GradProjConfig) -> CaptureSettings:
    """The engine's share of ``config``, as a plain value."""
    return CaptureSettings(
        exclude=list(config.exclude), gram=config.gram, nonfinite=config.nonfinite,
        diagnostics=config.diagnostics, lora_bound=config.lora_bound, kl_estimate=config.kl_estimate,
    )


def _optimizer_params(optimizer: torch.optim.Optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def wrap(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    strategy: str | list[str] | GradProjConfig = "proma",
    **options: Any,
) -> GradProjOptimizer:
    """Wrap ``optimizer`` so that ``model``'s gradients are accumulated by a gradproj strategy.

    Args:
        optimizer: any ``torch.optim`` (or ``torch_optimizer``) optimizer over ``model``'s
            trainable parameters.
        model: the policy; the log-probs given to ``opt.microbatch`` must come from it.
        strategy: a strategy name (``"none"``, ``"proma"``, ``"proma_reference"``, ...), a list of
            names (transforms, then one accumulation rule), or a `GradProjConfig`.
        **options: strategy options (``damping=``, ``relative_bound=``, ...) and engine options
            (``exclude=[globs]``, ``gram="auto"|"materialize"|"ghost"``).

    Returns:
        The `GradProjOptimizer`; use it exactly like the inner optimizer, plus
        ``opt.microbatch(logp, mask)`` around each microbatch's backward.

    Raises:
        ConfigError: unknown strategy or option, or invalid values.
        CoverageError: a trainable parameter that no layer handler covers.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"wrap() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, GradProjOptimizer):
        raise ConfigError("this optimizer is already a GradProjOptimizer; wrap the inner optimizer once")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"wrap() needs the model (a torch.nn.Module) as second argument, got {type(model).__name__}")
    if isinstance(strategy, GradProjConfig):
        config = strategy.updated(**options) if options else strategy
    elif isinstance(strategy, (str, list, tuple)):
        config = GradProjConfig(strategy=list(strategy) if isinstance(strategy, tuple) else strategy, **options)
    else:
        raise ConfigError(f"strategy must be a name, a list of names or a GradProjConfig, got {type(strategy).__name__}")

    model_params = {id(p) for p in model.parameters()}
    foreign = [p for p in _optimizer_params(optimizer) if id(p) not in model_params]
    if foreign:
        raise ConfigError(
            f"the optimizer holds {len(foreign)} parameter(s) that are not part of the model; pass the "
            "model whose parameters the optimizer trains (with peft: the PeftModel)"
        )
    in_optimizer = {id(p) for p in _optimizer_params(optimizer)}
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and id(p) not in in_optimizer and not any(fnmatch.fnmatchcase(n, g) for g in config.exclude)
    ]
    if missing:
        names = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ConfigError(
            f"{len(missing)} trainable parameter(s) of the model are not in the optimizer ({names}); "
            "build the optimizer after applying LoRA/PEFT and from the trainable parameters, or freeze "
            "the ones you do not train"
        )

    from gradproj.plugins.manager import get_registry

    registry = get_registry()
    resolved = config.resolve(registry)
    engine = CaptureEngine(model, capture_settings(config), resolved, registry)
    engine.attach()
    return GradProjOptimizer(optimizer, engine, config)
