"""Optimizer factories for ``actor_rollout_ref.actor.optim.optimizer_impl=gradproj.integrations.verl``.

verl builds the actor's optimizer as ``getattr(import_module(optimizer_impl), optimizer)(params, lr=...,
weight_decay=..., [betas=...], **override_optimizer_config)``. The factories here build the inner
optimizer and tag it with the gradproj config taken from ``override_optimizer_config.gradproj``;
the engine patch (`gradproj.integrations.verl.patches`) then wraps it around the FSDP module
with `gradproj.wrap` -- the factory alone cannot, verl gives it parameters, not the model.

``override_optimizer_config.sgrpo`` (``{alpha, p, k, seed}``), if given, rides along the same way:
the ``gradproj`` policy loss then trains on S-GRPO's token selection (`gradproj.integrations.verl.loss`).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import Any

import torch

from gradproj.config import GradProjConfig
from gradproj.errors import ConfigError
from gradproj.integrations.torch.token_selection import SGRPOSelection, as_sgrpo_selection

__all__ = ["AdamW", "Adam", "SGD", "Optimizer", "requested_config", "gradproj_config", "sgrpo_selection", "building",
           "CONFIG_ATTR", "SGRPO_ATTR"]

#: attribute of the inner optimizer that carries its `GradProjConfig` until it is wrapped
CONFIG_ATTR = "_gradproj_verl_config"
#: attribute of the inner optimizer that carries its `SGRPOSelection` (or ``None``)
SGRPO_ATTR = "_gradproj_verl_sgrpo"

_building = 0


@contextmanager
def building():
    """Marks the FSDP engine's optimizer build (gradproj's wrapper of ``_build_optimizer``): only
    there is a factory's optimizer wrapped around the model afterwards."""
    global _building
    _building += 1
    try:
        yield
    finally:
        _building -= 1


def gradproj_config(gradproj: Any) -> GradProjConfig:
    """The `GradProjConfig` of ``override_optimizer_config.gradproj`` (a name, a mapping or a config)."""
    return _gradproj_config(gradproj)


def _gradproj_config(gradproj: Any) -> GradProjConfig:
    if gradproj is None:
        raise ConfigError(
            "optim.optimizer_impl=gradproj.integrations.verl needs the strategy: add "
            "'+actor_rollout_ref.actor.optim.override_optimizer_config.gradproj.strategy=proma' (options next to "
            "it, e.g. ...gradproj.damping=1e-6)"
        )
    if isinstance(gradproj, GradProjConfig):
        return gradproj
    if isinstance(gradproj, str):
        return GradProjConfig(strategy=gradproj)
    try:  # an OmegaConf DictConfig from Hydra, or a plain mapping
        from omegaconf import OmegaConf

        if OmegaConf.is_config(gradproj):
            gradproj = OmegaConf.to_container(gradproj, resolve=True)
    except ImportError:  # pragma: no cover - verl depends on omegaconf
        pass
    if not isinstance(gradproj, dict):
        raise ConfigError(
            f"override_optimizer_config.gradproj must be a strategy name or a mapping like "
            f"{{strategy: proma, damping: 1e-6}}, got {type(gradproj).__name__}"
        )
    return GradProjConfig.from_dict(dict(gradproj))


def sgrpo_selection(sgrpo: Any) -> SGRPOSelection | None:
    """The `SGRPOSelection` of ``override_optimizer_config.sgrpo`` (a mapping from Hydra, or ``None``)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(sgrpo):
            sgrpo = OmegaConf.to_container(sgrpo, resolve=True)
    except ImportError:  # pragma: no cover - verl depends on omegaconf
        pass
    try:
        return as_sgrpo_selection(sgrpo)
    except ConfigError as err:
        raise ConfigError(
            f"override_optimizer_config.sgrpo: {err} (e.g. '+actor_rollout_ref.actor.optim.override_optimizer_config."
            "sgrpo={alpha:4,p:0.1,k:16,seed:0}')"
        ) from None


def _tagged(inner: torch.optim.Optimizer, gradproj: Any, sgrpo: Any = None) -> torch.optim.Optimizer:
    config = _gradproj_config(gradproj)
    selection = sgrpo_selection(sgrpo)
    if not _building:
        raise ConfigError(
            "optim.optimizer_impl=gradproj.integrations.verl built an optimizer outside verl's FSDP engine set-up as "
            "gradproj hooks it, so it would train as a plain optimizer. Set "
            "actor_rollout_ref.model.external_lib=gradproj.integrations.verl (it installs gradproj's hooks before the "
            "engine is built) and actor_rollout_ref.actor.strategy=fsdp2 (gradproj supports verl's FSDP2 engine)"
        )
    setattr(inner, CONFIG_ATTR, config)
    setattr(inner, SGRPO_ATTR, selection)
    return inner


def AdamW(params, *, gradproj: Any = None, sgrpo: Any = None, **kwargs: Any) -> torch.optim.Optimizer:
    """``torch.optim.AdamW(params, **kwargs)`` to be wrapped by gradproj with the ``gradproj`` config."""
    return _tagged(torch.optim.AdamW(params, **kwargs), gradproj, sgrpo)


def Adam(params, *, gradproj: Any = None, sgrpo: Any = None, **kwargs: Any) -> torch.optim.Optimizer:
    """``torch.optim.Adam(params, **kwargs)`` to be wrapped by gradproj with the ``gradproj`` config."""
    return _tagged(torch.optim.Adam(params, **kwargs), gradproj, sgrpo)


def SGD(params, *, gradproj: Any = None, sgrpo: Any = None, **kwargs: Any) -> torch.optim.Optimizer:
    """``torch.optim.SGD(params, **kwargs)`` to be wrapped by gradproj with the ``gradproj`` config."""
    return _tagged(torch.optim.SGD(params, **kwargs), gradproj, sgrpo)


def Optimizer(params, *, inner: str = "torch.optim.AdamW", gradproj: Any = None, sgrpo: Any = None,
              **kwargs: Any) -> torch.optim.Optimizer:
    """Any optimizer class by dotted path (``inner="torch_optimizer.Lamb"``), wrapped by gradproj.

    verl passes ``betas`` only when the name ``optimizer`` contains "adam"; give them in
    ``override_optimizer_config`` for this generic factory.
    """
    module_name, _, cls_name = inner.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(
            f"override_optimizer_config.inner={inner!r} is not an importable optimizer class "
            f"(module.Class, e.g. torch.optim.AdamW): {err}"
        ) from None
    return _tagged(cls(params, **kwargs), gradproj, sgrpo)


def requested_config(optimizer_config) -> bool:
    """Whether verl's ``optim`` config selects a gradproj optimizer (``optimizer_impl`` is this package)."""
    impl = getattr(optimizer_config, "optimizer_impl", None) or ""
    return impl == "gradproj.integrations.verl" or impl.startswith("gradproj.integrations.verl.")
