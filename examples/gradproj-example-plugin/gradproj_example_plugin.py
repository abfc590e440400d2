"""An example third-party gradproj plugin (see docs/guides/write-a-strategy.md).

* ``damped`` -- an accumulation rule: ``G <- decay * G + g_m`` (older microbatches count less).
* ``clip_coefficients`` -- a coefficient transform: ``c_i <- clamp(c_i, -max_abs, max_abs)``.
"""

from __future__ import annotations

import torch
from pydantic import Field

import gradproj


class DampedOptions(gradproj.StrategyOptions):
    """Options of ``damped``."""

    decay: float = Field(default=0.5, gt=0.0, le=1.0)


class Damped(gradproj.Strategy):
    """``G <- decay * G + g_m``, written as the update ``U = (decay - 1) G + sum_i c_i s_i``."""

    def accumulate(self, batch: gradproj.LayerBatch) -> gradproj.Update:
        updates = batch.combine(batch.coefficients)  # g_m = sum_i c_i s_i per tensor (one matmul)
        for update, grad in zip(updates, batch.grads):
            if grad is not None:  # G = None means 0
                update.add_(grad.to(update.dtype), alpha=self.options.decay - 1.0)
        return gradproj.Update(updates)


class ClipOptions(gradproj.StrategyOptions):
    """Options of ``clip_coefficients``."""

    max_abs: float = Field(default=1.0, gt=0.0)


class ClipCoefficients(gradproj.CoefficientTransform):
    """Clamp each sequence's loss coefficient (layer-independent, so no capture is needed)."""

    def transform_microbatch(self, coefficients: torch.Tensor, context: gradproj.MicrobatchContext) -> torch.Tensor:
        return coefficients.clamp(-self.options.max_abs, self.options.max_abs)


@gradproj.hookimpl
def gradproj_strategies():
    """Announce the strategies to gradproj."""
    return [
        gradproj.StrategySpec("damped", Damped, DampedOptions, summary="G <- decay G + g_m"),
        gradproj.StrategySpec("clip_coefficients", ClipCoefficients, ClipOptions, summary="clamp c_i"),
    ]
