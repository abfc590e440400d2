"""``proma``: accumulation-based PROMA, exact (SPEC 2.2; seed ``proma.md``).

Per parameter tensor, before microbatch m's gradient is added, the running gradient ``G`` is
projected onto the orthogonal complement of ``span{s_i : i in microbatch m}``::

    b = <s_i, G>,  K = <s_i, s_j>,  beta = solve(K + damping I, b),  proj = sum_i beta_i s_i
    proj <- proj * min(1, relative_bound ||g_m|| / ||proj||)          (if relative_bound)
    G <- G - shrinkage proj + g_m  =  G + sum_i (c_i - shrinkage beta_i) s_i

so the whole update is one ``combine`` (one matmul) on top of a k x k solve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from gradproj.linalg.device_sums import DeviceSums
from gradproj.linalg.projection import gram_schmidt_coefficients, solve_coefficients
from gradproj.plugins.hookspecs import hookimpl
from gradproj.strategies.base import Strategy, StrategyOptions, StrategySpec
from gradproj.work import Capabilities, LayerBatch, Update


class PromaOptions(StrategyOptions):
    """Options of ``proma``.

    Attributes:
        damping: ridge added to the Gram matrix; ``None`` = ``1e-6 * mean(diag K)`` (an essentially
            exact projector); ``0`` = exact pseudo-inverse projector.
        relative_bound: if set, the removed component is rescaled so that
            ``||proj|| <= relative_bound * ||g_m||``.
        shrinkage: fraction of the projected component removed (1 = full projection).
        projector: ``"solve"`` (least squares with the Gram) or ``"gram_schmidt"`` (sequential sweeps
            over the normalised sequence gradients).
        sweeps: number of Gram-Schmidt sweeps (``projector="gram_schmidt"`` only).
    """

    damping: float | None = Field(default=None, ge=0.0)
    relative_bound: float | None = Field(default=None, gt=0.0)
    shrinkage: float = Field(default=1.0, ge=0.0)
    projector: Literal["solve", "gram_schmidt"] = "solve"
    sweeps: int = Field(default=2, ge=1)


class Proma(Strategy):
    """Project the running gradient off the microbatch's sequence-gradient span, then add ``g_m``."""

    options: PromaOptions

    capabilities = Capabilities(plain_when_no_grad=True)

    def __init__(self, options: PromaOptions) -> None:
        super().__init__(options)
        self.reset_metrics()

    def reset_metrics(self) -> None:
        """Zero the per-step sums behind ``projected_fraction`` and ``bound_hits``."""
        self._sums = DeviceSums(3)  # sum ||proj||^2, sum ||G||^2, bound hits -- on the Grams' device
        self._projections = 0

    def coefficients_removed(self, full: torch.Tensor, coefficients: torch.Tensor, present: Sequence[bool]) -> torch.Tensor:
        """``alpha`` (L, k) with ``proj = sum_i alpha_i s_i``, after the relative bound, before shrinkage.

        Args:
            full: (L, k+1, k+1) float64 Grams of ``[s_1..s_k, G]``.
            coefficients: (k,) or (L, k) float64 per-sequence coefficients ``c`` (same device).
            present: per tensor, whether G is there (False where it was ``None``: nothing to
                project, not counted); known on the host.

        Runs inside the backward, once per large layer, entirely on the Grams' device: layers with
        non-finite Grams get NaN coefficients (the engine then drops the microbatch) by
        ``torch.where``, not by a branch on the host.
        """
        k = full.shape[1] - 1
        has_grad = None if all(present) else torch.tensor(list(present), device=full.device)
        finite = torch.isfinite(full).all(dim=2).all(dim=1)
        full = torch.where(finite[:, None, None], full, torch.eye(k + 1, dtype=full.dtype, device=full.device))
        gram, inner, running_sq = full[:, :k, :k], full[:, :k, k], full[:, k, k]
        opts = self.options
        if opts.projector == "solve":
            alpha = solve_coefficients(gram, inner, opts.damping)
        else:
            alpha = gram_schmidt_coefficients(gram, inner, opts.sweeps)
        proj_sq = torch.einsum("li,lij,lj->l", alpha, gram, alpha).clamp(min=0.0)
        counted = finite if has_grad is None else finite & has_grad
        hits = None
        if opts.relative_bound is not None:
            c = coefficients.expand_as(alpha)
            g_sq = torch.einsum("li,lij,lj->l", c, gram, c).clamp(min=0.0)
            limit = opts.relative_bound * g_sq.sqrt()
            norm = proj_sq.sqrt()
            hit = (norm > limit) & (proj_sq > 0.0)
            scale = torch.where(hit, limit / torch.where(hit, norm, 1.0), 1.0)
            alpha = alpha * scale[:, None]
            proj_sq = proj_sq * scale * scale
            hits = hit if has_grad is None else hit & has_grad
        alpha = torch.where(finite[:, None], alpha, torch.nan)
        zero = proj_sq.new_zeros(())
        self._sums.add(
            torch.where(counted, proj_sq, 0.0).sum(),
            torch.where(counted, running_sq, 0.0).sum(),
            zero if hits is None else hits.sum(dtype=torch.float64),
        )
        self._projections += sum(present)
        return alpha

    def accumulate(self, batch: LayerBatch) -> Update:
        """``sum_i (c_i - shrinkage alpha_i) s_i`` per tensor; just ``g_m`` where ``G`` is still zero.

        A finite Gram of ``[S; G]`` and finite coefficients give a finite update: the rule hands the
        engine that flag (a device tensor, read once when the microbatch closes) instead of having
        it check the update itself."""
        present = [g is not None for g in batch.grads]
        if self.options.shrinkage == 0.0 or not any(present):
            return Update(batch.combine(batch.coefficients))
        full = batch.gram_with_grads()
        coefficients = batch.coefficients.to(full.device)
        alpha = self.coefficients_removed(full, coefficients, present)
        gamma = coefficients - self.options.shrinkage * alpha
        finite = torch.isfinite(gamma).all() if all(present) else False
        return Update(batch.combine(gamma), finite=finite)

    def step_metrics(self) -> dict[str, float]:
        """``proma/projected_fraction`` = sqrt(sum ||proj||^2 / sum ||G||^2) over layers and microbatches
        (the step's sums are read from the device here, once)."""
        proj_sq, running_sq, hits = self._sums.values()
        fraction = math.sqrt(proj_sq / running_sq) if running_sq > 0 else 0.0
        out = {"proma/projected_fraction": fraction, "proma/projections": float(self._projections)}
        if self.options.relative_bound is not None:
            out["proma/bound_hit_fraction"] = hits / self._projections if self._projections else 0.0
        return out


#: The preset reproducing the published verl demonstration of PROMA's author.
PROMA_REFERENCE_DEFAULTS = {"projector": "gram_schmidt", "sweeps": 2, "relative_bound": 0.5, "shrinkage": 1.0}
PROMA_REFERENCE_PIPELINE = {"clip_ratio_low": 1e9, "clip_ratio_high": 1e9, "loss_agg_mode": "token-mean"}


@hookimpl
def gradproj_strategies():
    """Register ``proma`` and the ``proma_reference`` preset."""
    return [
        StrategySpec("proma", Proma, PromaOptions, summary="exact accumulation-based PROMA"),
        StrategySpec(
            "proma_reference",
            Proma,
            PromaOptions,
            defaults=PROMA_REFERENCE_DEFAULTS,
            summary="PROMA as in the author's verl demo: normalised Gram-Schmidt x2, relative bound 0.5",
            pipeline=PROMA_REFERENCE_PIPELINE,
        ),
    ]
