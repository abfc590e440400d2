"""Base classes every strategy builds on.

A strategy is one of two kinds, each with its own base and one form of each hook:

* `Strategy` -- the accumulation rule: given the running gradients ``G`` of a
  `gradproj.LayerBatch` (one large parameter tensor, or a stack of small ones) and the
  microbatch's sequence gradients and coefficients, return an `gradproj.Update` so that
  ``G <- G + U``. Exactly one rule is active.
* `CoefficientTransform` -- applied before the rule (stacking). Layer-independent transforms
  change the per-sequence coefficients once per microbatch, from what the pipeline supplied (e.g.
  the step's rewards and prompt groups); per-layer ones (``Capabilities(per_layer=True)``) change
  them per batch from its sequence gradients (e.g. their norms).

What a strategy needs and may do is declared once, in its ``capabilities``
(`gradproj.Capabilities`). Strategies run inside backward hooks, once per batch and
microbatch: they must not call pluggy or do Python work proportional to the model size there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from gradproj.work import Capabilities, LayerBatch, MicrobatchContext, Update

__all__ = ["StrategyOptions", "StrategyBase", "Strategy", "CoefficientTransform", "StrategySpec"]


class StrategyOptions(BaseModel):
    """Base of every strategy's options model (pydantic v2, unknown fields forbidden)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StrategyBase:
    """What every strategy has: validated options, declared capabilities, per-microbatch and
    per-step hooks. Subclass `Strategy` (an accumulation rule) or
    `CoefficientTransform`, not this class.

    Args:
        options: the validated options model of this strategy.
    """

    role: ClassVar[str] = ""
    #: what the strategy needs and may do, declared once (`gradproj.Capabilities`)
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, options: StrategyOptions) -> None:
        self.options = options

    def start_microbatch(self) -> None:
        """Called when a microbatch block opens (per-microbatch caches start here)."""

    def end_microbatch(self) -> None:
        """Called when a microbatch block closes, whatever happened (release per-microbatch caches)."""

    def step_metrics(self) -> dict[str, float]:
        """Metrics gathered since the last optimizer step (keys without the ``gradproj/`` prefix)."""
        return {}

    def reset_metrics(self) -> None:
        """Start gathering metrics for a new optimizer step."""


class Strategy(StrategyBase):
    """Base class of accumulation rules: override `accumulate`.

    Exactly one rule is active; it runs once per `gradproj.LayerBatch` -- one large
    parameter tensor during the backward, or a stack of small ones when the microbatch closes.
    """

    role = "accumulate"
    capabilities = Capabilities(needs_capture=True)

    def accumulate(self, batch: LayerBatch) -> Update:
        """The updates ``U`` (``G <- G + U``) of the batch's tensors: ``Update(batch.combine(gamma))``
        for per-member coefficients ``gamma`` (the usual way), plus what the rule vouches for."""
        raise NotImplementedError

    def finish_microbatch(self) -> bool | torch.Tensor:
        """Finish, in place, every update returned with ``Update(deferred=True)`` so far.

        Called once the microbatch's backward is over, before its updates are checked and applied
        -- and, for rules with ``capabilities.may_defer`` under direct writes, also during the
        backward whenever the held updates reach the engine's budget. Returns False if a finished
        update came out non-finite (the engine then drops the microbatch), or that answer as a
        0-dim bool tensor on the device (read when the microbatch closes)."""
        return True


class CoefficientTransform(StrategyBase):
    """Base class of coefficient transforms, stacked before the accumulation rule.

    Override `transform_microbatch` (layer-independent, ``capabilities.per_layer`` False) or
    `transform_layer` (``Capabilities(per_layer=True, needs_capture=True)``). Transforms
    return new float64 coefficients and never touch gradients themselves.
    """

    role = "transform"
    capabilities = Capabilities(needs_capture=False)

    def validate_microbatch(self, context: MicrobatchContext) -> None:
        """Check, when ``opt.microbatch(...)`` opens, that the pipeline supplied what is needed.

        ``context`` is a read-only `gradproj.work.MicrobatchContext` (``k``, ``group_ids``,
        ``step_groups``, ``where``). Raise a `gradproj.GradProjError` to refuse it.
        """

    def transform_microbatch(self, coefficients: torch.Tensor, context: MicrobatchContext) -> torch.Tensor:
        """New (k,) float64 coefficients for the whole microbatch (identity by default)."""
        return coefficients

    def transform_layer(self, batch: LayerBatch) -> torch.Tensor:
        """New (L, k) float64 coefficients for the batch's tensors (identity by default)."""
        return batch.coefficients.expand(len(batch), batch.k)


#: class flags and hooks of the earlier strategy contract, refused rather than silently ignored
LEGACY_FLAGS = frozenset({"needs_capture", "plain_when_no_grad", "needs_tokens", "may_defer", "per_layer"})
LEGACY_HOOKS = frozenset({"accumulate_batch", "transform_batch"})


@dataclass(frozen=True)
class StrategySpec:
    """How a plugin announces a strategy.

    Attributes:
        name: the name users pass as ``strategy=``.
        cls: the `Strategy` or `CoefficientTransform` subclass.
        options: the `StrategyOptions` subclass validating its options.
        defaults: preset values for options (a preset is a spec with defaults).
        summary: one line shown in error messages and docs.
        pipeline: settings the preset expects from the training pipeline (for integrations),
            e.g. ``{"clip_ratio": 1e9, "loss_agg_mode": "token-mean"}``.
    """

    name: str
    cls: type[StrategyBase]
    options: type[StrategyOptions]
    defaults: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    pipeline: dict[str, Any] = field(default_factory=dict)

    @property
    def role(self) -> str:
        """``"accumulate"`` or ``"transform"`` (from the strategy class)."""
        return self.cls.role

    def contract_problems(self) -> list[str]:
        """What in the strategy class does not follow the current contract (empty when it does): a
        class that is neither a `Strategy` nor a `CoefficientTransform`, capabilities
        that are not a `gradproj.Capabilities`, or flags and hooks of the earlier contract
        (``per_layer = True``, ``accumulate_batch``, ...) that gradproj would silently ignore."""
        cls = self.cls
        if not (isinstance(cls, type) and issubclass(cls, (Strategy, CoefficientTransform))):
            return [f"{cls!r} is neither a gradproj.Strategy nor a gradproj.CoefficientTransform subclass"]
        problems = []
        if not isinstance(cls.capabilities, Capabilities):
            problems.append(f"capabilities is {cls.capabilities!r}, not a gradproj.Capabilities(...)")
        for klass in cls.__mro__:
            if klass in (Strategy, CoefficientTransform, StrategyBase, object):
                continue
            flags = sorted(LEGACY_FLAGS & set(vars(klass)))
            if flags:
                problems.append(
                    f"{klass.__name__} sets {', '.join(flags)} as class attributes; declare them once as "
                    f"capabilities = gradproj.Capabilities({', '.join(f + '=...' for f in flags)})"
                )
            hooks = sorted(LEGACY_HOOKS & set(vars(klass)))
            if hooks:
                problems.append(
                    f"{klass.__name__} defines {', '.join(hooks)}, which gradproj no longer calls; "
                    "accumulate(batch) / transform_layer(batch) receive every batch, stacked or single"
                )
        return problems

    def option_names(self) -> list[str]:
        """The option names this strategy accepts."""
        return list(self.options.model_fields)

    def build(self, values: dict[str, Any]) -> StrategyBase:
        """Validate ``values`` (over the preset defaults) and instantiate the strategy."""
        return self.cls(self.options(**{**self.defaults, **values}))
