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
from gradproj.linalg.sequence_grads import SequenceGradients

__all__ = ["StrategyOptions", "Strategy", "CoefficientTransform", "StrategySpec", "LayerStep"]


class StrategyOptions(BaseModel):
    """Base of every strategy's options model (pydantic v2, unknown fields forbidden)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class LayerStep:
    """One parameter tensor in one microbatch, as seen by a strategy.

    Attributes:
        name: the parameter's qualified name in the model (``"model.layers.0.mlp.up_proj.weight"``).
        param: the parameter itself.
        grad: the running gradient ``G`` before this microbatch (``param.grad``; ``None`` = 0).
        coefficients: float64 (k,) per-sequence loss coefficients ``c_i = dL/dlogp`` on row i.
        seq: the microbatch's sequence gradients of this tensor (gram / inner / combine); valid
            only during the strategy call (it may live in a shared scratch buffer).
        out: a scratch tensor the update may be written into (or ``None``); use :meth:`combine`.
        finite: a strategy may set this to True when it has established that its update is
            finite (e.g. from a finite Gram of the sequence gradients); the engine then skips its
            own non-finite check of that update.
        deferrable: set by the engine when the returned update is applied only after
            :meth:`Strategy.finish_microbatch` (staged by reference, or under direct writes held for
            a rule with ``may_defer``): the strategy may then finish it in place until that call
            (e.g. to batch small work across layers).
        deferred: set by the strategy when it returned such an unfinished update (only allowed if
            ``deferrable``); :meth:`Strategy.finish_microbatch` then vouches for its finiteness.
    """

    name: str
    param: torch.Tensor
    grad: torch.Tensor | None
    coefficients: torch.Tensor
    seq: SequenceGradients
    out: torch.Tensor | None = None
    finite: bool = False
    deferrable: bool = False
    deferred: bool = False

    def host_coefficients(self):
        """``coefficients`` as a float64 NumPy array on the host."""
        return self.coefficients.cpu().numpy()

    def combine(self, gamma: torch.Tensor) -> torch.Tensor:
        """``sum_i gamma_i s_i`` -- the usual way for a strategy to build its update."""
        return self.seq.combine(gamma, self.out)


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

    def accumulate_batch(self, batch) -> torch.Tensor:
        """Updates of several same-shaped small tensors at once, as a (L, numel) tensor.

        ``batch`` is a :class:`gradproj.capture.batching.LayerBatch`. The default calls
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

    def validate_microbatch(self, context) -> None:
        """Check, when ``opt.microbatch(...)`` opens, that the pipeline supplied what is needed.

        ``context`` is the :class:`gradproj.capture.microbatch.Microbatch` (``k``, ``group_ids``,
        ``step_groups``, ``where``). Raise a :class:`gradproj.GradProjError` to refuse it.
        """

    def transform_microbatch(self, coefficients: torch.Tensor, context) -> torch.Tensor:
        """New (k,) float64 coefficients for the whole microbatch (identity by default)."""
        return coefficients

    def transform_layer(self, step: LayerStep) -> torch.Tensor:
        """New (k,) float64 coefficients for one parameter tensor (identity by default)."""
        return step.coefficients

    def transform_batch(self, batch) -> torch.Tensor:
        """New (L, k) coefficients for a :class:`gradproj.capture.batching.LayerBatch`.

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
