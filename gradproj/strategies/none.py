"""``none``: plain accumulation ``G <- G + g_m`` (SPEC 2.1).

Alone, it installs no capture at all, so the wrapped optimizer is bit-for-bit the unwrapped one.
Stacked after coefficient transforms it accumulates the transformed ``sum_i c_i s_i``.
"""

from __future__ import annotations

from gradproj.plugins.hookspecs import hookimpl
from gradproj.strategies.base import Strategy, StrategyOptions, StrategySpec
from gradproj.work import Capabilities, LayerBatch, Update


class NoneOptions(StrategyOptions):
    """``none`` takes no options."""


class PlainAccumulation(Strategy):
    """``G <- G + sum_i c_i s_i``."""

    capabilities = Capabilities(needs_capture=False, plain_when_no_grad=True)

    def accumulate(self, batch: LayerBatch) -> Update:
        """The microbatch gradient ``g_m``, unchanged."""
        return Update(batch.combine(batch.coefficients))


@hookimpl
def gradproj_strategies():
    """Register ``none``."""
    return [StrategySpec("none", PlainAccumulation, NoneOptions, summary="plain gradient accumulation")]
