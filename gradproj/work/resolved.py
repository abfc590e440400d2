"""The strategies of one wrapped optimizer, built from its configuration, as capture runs them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ResolvedStrategies"]


@dataclass
class ResolvedStrategies:
    """Strategy instances built from a config: transforms (in order), then the accumulation rule.

    Attributes:
        specs: the `gradproj.StrategySpec` of each strategy, in order (the rule last).
        transforms: the coefficient transforms (`gradproj.CoefficientTransform`), in order.
        accumulate: the accumulation rule (`gradproj.Strategy`).
    """

    specs: list[Any]
    transforms: list[Any]
    accumulate: Any

    @property
    def names(self) -> list[str]:
        """The strategy names, in order."""
        return [spec.name for spec in self.specs]

    @property
    def all(self) -> list[Any]:
        """Every strategy instance, transforms first."""
        return [*self.transforms, self.accumulate]

    @property
    def needs_capture(self) -> bool:
        """Whether any strategy needs per-sequence gradients (else gradproj stays out of the way)."""
        return any(s.capabilities.needs_capture for s in self.all)

    @property
    def microbatch_transforms(self) -> list[Any]:
        """Transforms applied once per microbatch (layer-independent), in order."""
        return [t for t in self.transforms if not t.capabilities.per_layer]

    @property
    def layer_transforms(self) -> list[Any]:
        """Transforms applied per parameter tensor, in order."""
        return [t for t in self.transforms if t.capabilities.per_layer]

    @property
    def needs_tokens(self) -> bool:
        """Whether a strategy needs token-level factors (no batching of small tensors)."""
        return any(s.capabilities.needs_tokens for s in self.all)
