"""Strategies: how a microbatch's sequence gradients change the running gradient.

A strategy is a class described by a :class:`StrategySpec` that a plugin returns from its
``gradproj_strategies`` hook. Built-ins: ``none`` (plain accumulation), ``proma`` (exact PROMA)
and the ``proma_reference`` preset.
"""

from gradproj.strategies.base import LayerStep, Strategy, StrategyOptions, StrategySpec

__all__ = ["Strategy", "StrategyOptions", "StrategySpec", "LayerStep"]
