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

import torch
from pydantic import Field

from gradproj.linalg.device_sums import DeviceSums
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


def isopo_coefficients(gram: torch.Tensor, coefficients: torch.Tensor, variant: str, reg: float) -> torch.Tensor:
    """New coefficients from (L, k, k) Grams and (L, k) coefficients (float64, batched, on their device).

    ``ntk`` without an eigendecomposition: ``rho = reg * trace(K) / k`` (the mean eigenvalue) and
    ``rho (K + rho I)^-1 c`` by one batched solve; ``K = 0`` leaves ``c`` as it is.
    """
    diag = gram.diagonal(dim1=1, dim2=2)
    if variant == "normalize":
        norms = diag.clamp(min=0.0).sqrt()
        return torch.where(norms > 0.0, coefficients / torch.where(norms > 0.0, norms, 1.0), 0.0)
    rho = reg * diag.mean(dim=1)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    live = rho > 0.0
    system = torch.where(live[:, None, None], gram + rho[:, None, None] * eye, eye)
    solved = torch.linalg.solve_ex(system, coefficients.unsqueeze(-1), check_errors=False)[0].squeeze(-1)
    return torch.where(live[:, None], rho[:, None] * solved, coefficients)


class Isopo(CoefficientTransform):
    """Rescale coefficients per layer from the sequence gradients' Gram."""

    options: IsopoOptions

    capabilities = Capabilities(per_layer=True, needs_capture=True)

    def __init__(self, options: IsopoOptions) -> None:
        super().__init__(options)
        self.reset_metrics()

    def reset_metrics(self) -> None:
        """Forget the step's coefficient-norm ratios."""
        self._sums = DeviceSums(2)  # sum of ||c'|| / ||c||, count -- on the device until read

    def _apply(self, gram: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(gram).all(dim=2).all(dim=1)
        eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
        safe = torch.where(finite[:, None, None], gram, eye)
        out = isopo_coefficients(safe, coefficients, self.options.variant, self.options.reg)
        out = torch.where(finite[:, None], out, torch.nan)  # the engine drops the microbatch
        before = torch.linalg.vector_norm(coefficients, dim=1)
        ok = finite & (before > 0)
        ratio = torch.linalg.vector_norm(out, dim=1) / torch.where(ok, before, 1.0)
        self._sums.add(torch.where(ok, ratio, 0.0).sum(), ok.sum(dtype=torch.float64))
        return out

    def transform_layer(self, batch: LayerBatch) -> torch.Tensor:
        """ISOPO coefficients of the batch's tensors (one batched Gram)."""
        gram = batch.grams()
        coeffs = batch.coefficients.to(gram.device).expand(gram.shape[0], gram.shape[1])
        return self._apply(gram, coeffs).to(batch.coefficients.device)

    def step_metrics(self) -> dict[str, float]:
        """``isopo/coefficient_ratio``: mean ||c'|| / ||c|| over layers and microbatches."""
        ratio_sum, count = self._sums.values()
        if not count:
            return {}
        ratio = ratio_sum / count
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
