"""Base classes every strategy builds on.

A strategy has a *role*:

* ``"accumulate"`` -- the accumulation rule: given the running gradient ``G`` of one parameter
  tensor and the microbatch's sequence gradients and coefficients, return the update ``U`` so that
  ``G <- G + U``. Exactly one accumulation rule is active.
* ``"transform"`` -- a coefficient transform applied before the accumulation rule (stacking):
  :class:`CoefficientTransform`. Microbatch-level transforms (``per_layer = False``) change the
  per-sequence coefficients once per microbatch, from what the pipeline supplied (e.g. the step's
  rewards and prompt groups); per-layer transforms (``per_layer = True``) change them per parameter
  tensor from that tensor's sequence gradients (e.g. their norms).

Strategies run inside backward hooks, once per parameter tensor and microbatch: they must not call
pluggy or do Python work proportional to the model size there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from gradproj.errors import ProtocolError
from gradproj.work import LayerBatch, LayerStep, MicrobatchContext

__all__ = ["StrategyOptions", "Strategy", "CoefficientTransform", "StrategySpec", "LayerStep"]


class StrategyOptions(BaseModel):
    """Base of every strategy's options model (pydantic v2, unknown fields forbidden)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Strategy:
    """Base class of strategies. Subclasses set ``role`` and implement their hook.

    Args:
        options: the validated options model of this strategy.
    """

    role: ClassVar[str] = "accumulate"
    #: Whether the strategy needs per-sequence gradients (False only for plain accumulation).
    needs_capture: ClassVar[bool] = True
    #: Whether, with ``G = 0`` everywhere (the first microbatch of a step), the update is just
    #: ``g_m``: the engine then lets autograd compute ordinary gradients for that microbatch.
    plain_when_no_grad: ClassVar[bool] = False
    #: Whether the strategy needs the token-level factors of each layer (``step.seq.token_factors()``,
    #: e.g. Intra-PROMA's input/output-gradient subspaces); the engine then does not batch small
    #: parameters into per-sequence rows, which would lose the tokens.
    needs_tokens: ClassVar[bool] = False
    #: Whether the rule may return deferred updates (``step.deferred``) where the engine writes
    #: updates straight into ``.grad`` (``nonfinite="propagate"``): it then gives the rule fresh
    #: update tensors instead of its one-layer scratch buffer, holds the deferred ones, and writes
    #: them after :meth:`finish_microbatch` -- which it then calls whenever the held updates reach
    #: a budget, not only at the close.
    may_defer: ClassVar[bool] = False

    def __init__(self, options: StrategyOptions) -> None:
        self.options = options

    def accumulate(self, step: LayerStep) -> torch.Tensor:
        """Return the update ``U`` (shaped like the parameter) so that ``G <- G + U``."""
        raise NotImplementedError

    def accumulate_batch(self, batch: LayerBatch) -> torch.Tensor:
        """Updates of several same-shaped small tensors at once, as a (L, numel) tensor.

        ``batch`` is a :class:`gradproj.work.LayerBatch`. The default calls
        :meth:`accumulate` per member; override it with batched operations for speed.
        """
        updates = []
        for step in batch.steps():  # not deferrable: the stacked copies are applied
            updates.append(self.accumulate(step).reshape(-1))
            if step.deferred:
                raise ProtocolError(
                    f"strategy {type(self).__name__} deferred the update of {step.name}, a batched "
                    "small parameter (step.deferrable is False); finish it in accumulate()"
                )
        return torch.stack(updates)

    def start_microbatch(self) -> None:
        """Called when a microbatch block opens (per-microbatch caches start here)."""

    def finish_microbatch(self) -> bool:
        """Finish, in place, every update returned with ``step.deferred`` so far.

        Called once the microbatch's backward is over, before its updates are checked and applied
        -- and, for rules with :attr:`may_defer` under direct writes, also during the backward
        whenever the held updates reach the engine's budget. Returns False if a finished update
        came out non-finite (the engine then drops the microbatch)."""
        return True

    def end_microbatch(self) -> None:
        """Called when a microbatch block closes, whatever happened (release per-microbatch caches)."""

    def step_metrics(self) -> dict[str, float]:
        """Metrics gathered since the last optimizer step (keys without the ``gradproj/`` prefix)."""
        return {}

    def reset_metrics(self) -> None:
        """Start gathering metrics for a new optimizer step."""


class CoefficientTransform(Strategy):
    """Base class of coefficient transforms (``role = "transform"``), stacked before the rule.

    Override :meth:`transform_microbatch` (``per_layer = False``) or :meth:`transform_layer`
    (and, for speed, :meth:`transform_batch`; ``per_layer = True``). Transforms return new
    float64 coefficients and never touch gradients themselves.
    """

    role = "transform"
    needs_capture = False
    #: True when the new coefficients depend on the parameter tensor (its sequence gradients).
    per_layer: ClassVar[bool] = False

    def validate_microbatch(self, context: MicrobatchContext) -> None:
        """Check, when ``opt.microbatch(...)`` opens, that the pipeline supplied what is needed.

        ``context`` is a read-only :class:`gradproj.work.MicrobatchContext` (``k``, ``group_ids``,
        ``step_groups``, ``where``). Raise a :class:`gradproj.GradProjError` to refuse it.
        """

    def transform_microbatch(self, coefficients: torch.Tensor, context: MicrobatchContext) -> torch.Tensor:
        """New (k,) float64 coefficients for the whole microbatch (identity by default)."""
        return coefficients

    def transform_layer(self, step: LayerStep) -> torch.Tensor:
        """New (k,) float64 coefficients for one parameter tensor (identity by default)."""
        return step.coefficients

    def transform_batch(self, batch: LayerBatch) -> torch.Tensor:
        """New (L, k) coefficients for a :class:`gradproj.work.LayerBatch`.

        The default calls :meth:`transform_layer` per member.
        """
        return torch.stack([self.transform_layer(step) for step in batch.steps()])


@dataclass(frozen=True)
class StrategySpec:
    """How a plugin announces a strategy.

    Attributes:
        name: the name users pass as ``strategy=``.
        cls: the :class:`Strategy` subclass.
        options: the :class:`StrategyOptions` subclass validating its options.
        defaults: preset values for options (a preset is a spec with defaults).
        summary: one line shown in error messages and docs.
        pipeline: settings the preset expects from the training pipeline (for integrations),
            e.g. ``{"clip_ratio": 1e9, "loss_agg_mode": "token-mean"}``.
    """

    name: str
    cls: type[Strategy]
    options: type[StrategyOptions]
    defaults: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    pipeline: dict[str, Any] = field(default_factory=dict)

    @property
    def role(self) -> str:
        """``"accumulate"`` or ``"transform"`` (from the strategy class)."""
        return self.cls.role

    def option_names(self) -> list[str]:
        """The option names this strategy accepts."""
        return list(self.options.model_fields)

    def build(self, values: dict[str, Any]) -> Strategy:
        """Validate ``values`` (over the preset defaults) and instantiate the strategy."""
        return self.cls(self.options(**{**self.defaults, **values}))
