"""``variance_scaling``: GRPO's reward-std normalisation as a curvature-adaptive step size (SPEC 2.4).

Seed ``grpo-normalization.md``: dividing a prompt group's advantages by its reward std sigma_g is
an adaptive step size (the std is a proxy for the local curvature of that prompt's objective).
As a coefficient transform, given the step's groups and rewards (``opt.set_groups``)::

    c_i <- c_i / (sigma_g(i) + eps) ** power

``power=1`` turns REINFORCE with a group-mean baseline into GRPO's std-normalised gradient;
``power`` in (0, 1) interpolates; ``scope="batch"`` uses the std of all the step's rewards.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from gradproj.plugins.hookspecs import hookimpl
from gradproj.strategies.base import CoefficientTransform, StrategyOptions, StrategySpec
from gradproj.work.groups import require_groups


class VarianceScalingOptions(StrategyOptions):
    """Options of ``variance_scaling``.

    Attributes:
        power: exponent p of ``(sigma + eps) ** p`` (1 = GRPO's normalisation, 0 = none).
        scope: ``"group"`` (each prompt group's reward std) or ``"batch"`` (the step's reward std).
        eps: added to the std (GRPO implementations use 1e-6 (verl) or 1e-4 (TRL)).
        unbiased: Bessel-corrected std (``torch.std``'s default, as TRL and verl use).
    """

    power: float = Field(default=1.0, ge=0.0)
    scope: Literal["group", "batch"] = "group"
    eps: float = Field(default=1e-6, ge=0.0)
    unbiased: bool = True


class VarianceScaling(CoefficientTransform):
    """Divide each sequence's coefficient by its group's reward std (to the power ``power``)."""

    options: VarianceScalingOptions

    def __init__(self, options: VarianceScalingOptions) -> None:
        super().__init__(options)
        self.reset_metrics()

    def reset_metrics(self) -> None:
        """Forget the step's scale statistics."""
        self._scales: list[torch.Tensor] = []

    def validate_microbatch(self, context) -> None:
        """The step's groups (and, for ``scope="group"``, this microbatch's group ids) are required."""
        require_groups(context, "variance_scaling", need_ids=self.options.scope == "group")

    def row_scales(self, context) -> torch.Tensor:
        """(k,) float64 factors ``1 / (sigma + eps) ** power`` for the microbatch's rows."""
        opts: VarianceScalingOptions = self.options
        groups = require_groups(context, "variance_scaling", need_ids=opts.scope == "group")
        if opts.scope == "batch":
            sigma = torch.full((context.k,), groups.batch_std(opts.unbiased), dtype=torch.float64)
        else:
            std = groups.group_std(opts.unbiased)
            sigma = torch.tensor([std[gid] for gid in context.group_ids], dtype=torch.float64)
        return (sigma + opts.eps) ** -opts.power

    def transform_microbatch(self, coefficients: torch.Tensor, context) -> torch.Tensor:
        """``c / (sigma + eps) ** power``."""
        scales = self.row_scales(context)  # built on the host from the step's rewards
        self._scales.append(scales)  # (read at step_metrics(): nothing here waits for the device)
        return coefficients * scales.to(coefficients.device, non_blocking=True)

    def step_metrics(self) -> dict[str, float]:
        """Mean, min and max of the applied scale factors over the step's sequences."""
        if not self._scales:
            return {}
        values = torch.cat(self._scales)
        return {
            "variance_scaling/scale_mean": float(values.mean()),
            "variance_scaling/scale_min": float(values.min()),
            "variance_scaling/scale_max": float(values.max()),
        }


@hookimpl
def gradproj_strategies():
    """Register ``variance_scaling``."""
    return [
        StrategySpec(
            "variance_scaling",
            VarianceScaling,
            VarianceScalingOptions,
            summary="c_i / (reward std of its prompt group + eps)^power (GRPO's normalisation as a step size)",
        )
    ]
