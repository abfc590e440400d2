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
from typing import Literal

import numpy as np
import torch
from pydantic import Field

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
        self._proj_sq = 0.0
        self._running_sq = 0.0
        self._projections = 0
        self._bound_hits = 0

    def coefficients_removed(self, full: np.ndarray, coefficients: np.ndarray, has_grad: np.ndarray) -> np.ndarray:
        """``alpha`` (L, k) with ``proj = sum_i alpha_i s_i``, after the relative bound, before shrinkage.

        Args:
            full: (L, k+1, k+1) Grams of ``[s_1..s_k, G]`` (float64).
            coefficients: (k,) or (L, k) per-sequence coefficients ``c``.
            has_grad: (L,) bool, False where G was ``None`` (nothing to project, not counted).

        Every Python/NumPy call here runs inside the backward, once per large layer: the common
        case (all finite) takes no masking detours.
        """
        k = full.shape[1] - 1
        finite = None if np.isfinite(full).all() else np.isfinite(full).all(axis=(1, 2))
        if finite is not None:  # those layers get NaN updates: the engine drops the microbatch
            full = np.where(finite[:, None, None], full, np.eye(k + 1))
        gram, inner, running_sq = full[:, :k, :k], full[:, :k, k], full[:, k, k]
        opts = self.options
        if opts.projector == "solve":
            alpha = solve_coefficients(gram, inner, opts.damping)
        else:
            alpha = gram_schmidt_coefficients(gram, inner, opts.sweeps)
        proj_sq = np.maximum(np.einsum("li,lij,lj->l", alpha, gram, alpha), 0.0)
        if opts.relative_bound is not None:
            c = np.broadcast_to(coefficients, alpha.shape)
            g_sq = np.maximum(np.einsum("li,lij,lj->l", c, gram, c), 0.0)
            limit = opts.relative_bound * np.sqrt(g_sq)
            norm = np.sqrt(proj_sq)
            hit = (norm > limit) & (proj_sq > 0.0)
            if hit.any():
                scale = np.where(hit, limit / np.where(hit, norm, 1.0), 1.0)
                alpha = alpha * scale[:, None]
                proj_sq = proj_sq * scale * scale
                self._bound_hits += int((hit & has_grad).sum())
        counted = has_grad
        if finite is not None:
            alpha[~finite] = np.nan
            counted = has_grad & finite
        self._proj_sq += float(proj_sq[counted].sum())
        self._running_sq += float(running_sq[counted].sum())
        self._projections += int(has_grad.sum())
        return alpha

    def accumulate(self, batch: LayerBatch) -> Update:
        """``sum_i (c_i - shrinkage alpha_i) s_i`` per tensor; just ``g_m`` where ``G`` is still zero.

        A finite Gram of ``[S; G]`` gives finite coefficients, hence a finite update (the engine
        skips its own check)."""
        has_grad = np.array([g is not None for g in batch.grads])
        if self.options.shrinkage == 0.0 or not has_grad.any():
            return Update(batch.combine(batch.coefficients))
        full = batch.gram_with_grads().cpu().numpy()
        host = batch.host_coefficients()
        alpha = self.coefficients_removed(full, host, has_grad)
        finite = bool(np.isfinite(alpha).all()) and bool(has_grad.all())
        return Update(batch.combine(torch.from_numpy(host - self.options.shrinkage * alpha)), finite=finite)

    def step_metrics(self) -> dict[str, float]:
        """``proma/projected_fraction`` = sqrt(sum ||proj||^2 / sum ||G||^2) over layers and microbatches."""
        fraction = math.sqrt(self._proj_sq / self._running_sq) if self._running_sq > 0 else 0.0
        out = {"proma/projected_fraction": fraction, "proma/projections": float(self._projections)}
        if self.options.relative_bound is not None:
            out["proma/bound_hit_fraction"] = self._bound_hits / self._projections if self._projections else 0.0
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
