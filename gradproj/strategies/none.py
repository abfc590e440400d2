"""``none``: plain accumulation ``G <- G + g_m`` (SPEC 2.1).

Alone, it installs no capture at all, so the wrapped optimizer is bit-for-bit the unwrapped one.
Stacked after coefficient transforms it accumulates the transformed ``sum_i c_i s_i``.
"""

from __future__ import annotations

from gradproj.plugins.hookspecs import hookimpl
from gradproj.strategies.base import Strategy, StrategyOptions, StrategySpec
from gradproj.work import LayerStep


class NoneOptions(StrategyOptions):
    """``none`` takes no options."""


class PlainAccumulation(Strategy):
    """``G <- G + sum_i c_i s_i``."""

    role = "accumulate"
    plain_when_no_grad = True
    needs_capture = False

    def accumulate(self, step: LayerStep):
        """The microbatch gradient ``g_m``, unchanged."""
        return step.combine(step.coefficients)

    def accumulate_batch(self, batch):
        """``g_m`` for every member, in one batched product."""
        return batch.combine(batch.coefficients)


@hookimpl
def gradproj_strategies():
    """Register ``none``."""
    return [StrategySpec("none", PlainAccumulation, NoneOptions, summary="plain gradient accumulation")]
