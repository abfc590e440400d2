"""``isopo``: per-layer normalised sequence gradients (SPEC 2.5; ISOPO, arXiv 2512.23353).

A per-layer coefficient transform. ``variant="normalize"`` gives every sequence the same weight
in each layer's metric::

    c_i <- c_i / ||s_i||          (sequences with s_i = 0 get 0)

``variant="ntk"`` preconditions with the layer's sequence-gradient Gram (the empirical NTK)::

    K = U D U^T,  rho = reg * mean(D),  c <- U diag(rho / (D + rho)) U^T c  =  rho (K + rho I)^-1 c
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from gradproj.plugins.hookspecs import hookimpl
from gradproj.strategies.base import CoefficientTransform, StrategyOptions, StrategySpec
from gradproj.work import Capabilities, LayerBatch


class IsopoOptions(StrategyOptions):
    """Options of ``isopo``.

    Attributes:
        variant: ``"normalize"`` (``c_i / ||s_i||``) or ``"ntk"`` (``rho (K + rho I)^-1 c``).
        reg: ``rho = reg * mean eigenvalue of K`` (``variant="ntk"`` only).
    """

    variant: Literal["normalize", "ntk"] = "normalize"
    reg: float = Field(default=1.0, gt=0.0)


def isopo_coefficients(gram: np.ndarray, coefficients: np.ndarray, variant: str, reg: float) -> np.ndarray:
    """New coefficients from (L, k, k) Grams and (L, k) coefficients (float64, batched)."""
    if variant == "normalize":
        norms = np.sqrt(np.maximum(np.diagonal(gram, axis1=1, axis2=2), 0.0))
        safe = np.where(norms > 0.0, norms, 1.0)
        return np.where(norms > 0.0, coefficients / safe, 0.0)
    eigvals, eigvecs = np.linalg.eigh(gram)
    eigvals = np.maximum(eigvals, 0.0)
    rho = reg * eigvals.mean(axis=1, keepdims=True)
    factor = np.where(rho > 0.0, rho / np.where(rho > 0.0, eigvals + rho, 1.0), 1.0)
    projected = np.einsum("lji,lj->li", eigvecs, coefficients)
    return np.einsum("lij,lj->li", eigvecs, factor * projected)


class Isopo(CoefficientTransform):
    """Rescale coefficients per layer from the sequence gradients' Gram."""

    options: IsopoOptions

    capabilities = Capabilities(per_layer=True, needs_capture=True)

    def __init__(self, options: IsopoOptions) -> None:
        super().__init__(options)
        self.reset_metrics()

    def reset_metrics(self) -> None:
        """Forget the step's coefficient-norm ratios."""
        self._ratio_sum = 0.0
        self._count = 0

    def _apply(self, gram: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
        finite = np.isfinite(gram).all(axis=(1, 2))
        safe = np.where(finite[:, None, None], gram, np.eye(gram.shape[1]))
        out = isopo_coefficients(safe, coefficients, self.options.variant, self.options.reg)
        out[~finite] = np.nan  # the engine drops the microbatch
        before = np.linalg.norm(coefficients, axis=1)
        ok = finite & (before > 0)
        self._ratio_sum += float((np.linalg.norm(out[ok], axis=1) / before[ok]).sum())
        self._count += int(ok.sum())
        return out

    def transform_layer(self, batch: LayerBatch) -> torch.Tensor:
        """ISOPO coefficients of the batch's tensors (one batched Gram)."""
        gram = batch.grams().cpu().numpy()
        coeffs = np.broadcast_to(batch.host_coefficients(), gram.shape[:2])
        return torch.from_numpy(self._apply(gram, np.ascontiguousarray(coeffs))).to(batch.coefficients.device)

    def step_metrics(self) -> dict[str, float]:
        """``isopo/coefficient_ratio``: mean ||c'|| / ||c|| over layers and microbatches."""
        if not self._count:
            return {}
        ratio = self._ratio_sum / self._count
        return {"isopo/coefficient_ratio": ratio if math.isfinite(ratio) else 0.0}


@hookimpl
def gradproj_strategies():
    """Register ``isopo``."""
    return [
        StrategySpec(
            "isopo",
            Isopo,
            IsopoOptions,
            summary="per-layer normalised sequence gradients (ISOPO), optionally NTK-preconditioned",
        )
    ]
