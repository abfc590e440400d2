"""Strategies: how a microbatch's sequence gradients change the running gradient.

A strategy is a class described by a `StrategySpec` that a plugin returns from its
``gradproj_strategies`` hook. Built-ins: the accumulation rules ``none`` (plain accumulation),
``proma`` (exact PROMA, and the ``proma_reference`` preset) and ``intra_proma`` (factored
low-rank projection inside each microbatch); the coefficient transforms ``variance_scaling``
(GRPO's std normalisation as a step size) and ``isopo`` (per-layer normalised sequence gradients).
"""

from gradproj.strategies.base import CoefficientTransform, Strategy, StrategyBase, StrategyOptions, StrategySpec
from gradproj.work import Capabilities, LayerBatch, MicrobatchContext, Update

__all__ = [
    "Strategy",
    "CoefficientTransform",
    "StrategyBase",
    "StrategyOptions",
    "StrategySpec",
    "Capabilities",
    "LayerBatch",
    "Update",
    "MicrobatchContext",
]
