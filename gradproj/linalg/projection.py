"""Projection coefficients from k x k Gram matrices, batched over layers, on the Grams' device.

All functions take float64 tensors with a leading batch dimension L (one row per parameter tensor)
and return ``alpha`` (shape (L, k)) such that the part of ``G`` the projector removes is
``sum_i alpha_i s_i``; they never touch a parameter-sized tensor. They run inside the backward,
once per large layer, so they make no decision on the host: no branch on a value, no ``.item()``,
no LAPACK call whose error codes torch would read back (``solve_ex``/``solve_triangular`` without
error checks; degenerate layers are masked with ``torch.where``). The one exception is the
pseudo-inverse of ``damping=0`` (an eigendecomposition: torch checks its error codes on the host,
one synchronisation per call on a GPU).
"""

from __future__ import annotations

import torch

__all__ = ["solve_coefficients", "gram_schmidt_coefficients"]


def _eye_like(gram: torch.Tensor) -> torch.Tensor:
    return torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)


def solve_coefficients(gram: torch.Tensor, inner: torch.Tensor, damping: float | None) -> torch.Tensor:
    """``beta = (K + damping I)^-1 b`` per layer; ``damping=None``: ``1e-6 * mean(diag K)``.

    Args:
        gram: (L, k, k) Gram matrices (float64).
        inner: (L, k) inner products with the running gradient.
        damping: ridge; ``0`` uses the pseudo-inverse (exact projector onto the span, also when
            K is singular: duplicate or zero sequence gradients).

    Layers whose sequence gradients are all zero get ``alpha = 0``.
    """
    diag = gram.diagonal(dim1=1, dim2=2)
    active = diag.amax(dim=1) > 0.0  # layers with at least one non-zero s_i
    eye = _eye_like(gram)
    if damping is None or damping > 0.0:
        lam = 1e-6 * diag.mean(dim=1) if damping is None else torch.full_like(diag[:, 0], float(damping))
        system = torch.where(active[:, None, None], gram + lam[:, None, None] * eye, eye)
        alpha = torch.linalg.solve_ex(system, inner.unsqueeze(-1), check_errors=False)[0].squeeze(-1)
        return torch.where(active[:, None], alpha, 0.0)
    # damping=0: the exact pseudo-inverse through an eigendecomposition (one host check per call on a GPU)
    evals, evecs = torch.linalg.eigh(torch.where(active[:, None, None], gram, eye))
    k = gram.shape[-1]
    cutoff = evals.abs().amax(dim=1, keepdim=True) * k * torch.finfo(torch.float64).eps * 10
    keep = (evals > cutoff) & active[:, None]
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, 1.0), 0.0)
    coords = torch.einsum("lij,li->lj", evecs, inner)
    return torch.einsum("lij,lj->li", evecs, inv * coords)


def gram_schmidt_coefficients(gram: torch.Tensor, inner: torch.Tensor, sweeps: int) -> torch.Tensor:
    """Coefficients of sequential Gram-Schmidt over the normalised ``s_j / ||s_j||``, per layer.

    Reproduces ``for sweep: for j: G <- G - <G, s^_j> s^_j`` exactly, in coefficient space: with
    ``G_cur = G - sum_l alpha_l s_l``, ``<G_cur, s^_j> = (b_j - (K alpha)_j) / ||s_j||``, and the
    sequential updates of one sweep are one Gauss-Seidel step on ``K alpha = b``: a lower-triangular
    solve with ``D + L`` (the diagonal and strict lower part of ``K``). Zero sequence gradients are
    skipped (their row and column of ``K`` are zero; a unit diagonal keeps the solve defined).
    """
    diag = gram.diagonal(dim1=1, dim2=2)
    lower = torch.tril(gram, diagonal=-1) + torch.diag_embed(torch.where(diag > 0.0, diag, 1.0))
    alpha = torch.zeros_like(inner)
    target = inner.unsqueeze(-1)
    for _ in range(sweeps):
        residual = target - gram @ alpha.unsqueeze(-1)
        alpha = alpha + torch.linalg.solve_triangular(lower, residual, upper=False).squeeze(-1)
    return alpha
