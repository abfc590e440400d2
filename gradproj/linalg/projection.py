"""Projection coefficients from a k x k Gram matrix.

Both functions return ``alpha`` (float64, shape (k,)) such that the part of ``G`` that the
projector removes is ``sum_i alpha_i s_i``; they never touch a parameter-sized tensor.
"""

from __future__ import annotations

import torch

__all__ = ["solve_coefficients", "gram_schmidt_coefficients", "default_damping"]


def default_damping(gram: torch.Tensor) -> float:
    """The default ridge ``1e-6 * mean(diag K)``: an essentially exact projector."""
    return 1e-6 * float(gram.diagonal().mean())


def solve_coefficients(gram: torch.Tensor, inner: torch.Tensor, damping: float | None) -> torch.Tensor:
    """``beta = (K + damping I)^-1 b`` (``damping=None``: :func:`default_damping`).

    With ``damping == 0`` a singular K (duplicate or zero sequence gradients) is handled by the
    minimum-norm least-squares solution, i.e. the exact orthogonal projector onto the span.
    """
    k = gram.shape[0]
    scale = float(gram.diagonal().abs().max()) if k else 0.0
    if k == 0 or scale == 0.0:
        return torch.zeros_like(inner)
    lam = default_damping(gram) if damping is None else float(damping)
    if lam > 0.0:
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        return torch.linalg.solve(gram + lam * eye, inner)
    # Exact pseudo-inverse via eigh: discard directions below round-off.
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > evals.abs().max() * k * torch.finfo(gram.dtype).eps * 10
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    return evecs @ (inv * (evecs.T @ inner))


def gram_schmidt_coefficients(gram: torch.Tensor, inner: torch.Tensor, sweeps: int) -> torch.Tensor:
    """Coefficients of sequential Gram-Schmidt over the normalised ``s_j / ||s_j||``.

    Reproduces ``for sweep: for j: G <- G - <G, s^_j> s^_j`` exactly, in coefficient space:
    with ``G_cur = G - sum_l alpha_l s_l``, ``<G_cur, s^_j> = (b_j - (K alpha)_j) / ||s_j||``.
    Zero sequence gradients are skipped.
    """
    k = gram.shape[0]
    K = gram.tolist()
    b = inner.tolist()
    norms = [K[j][j] ** 0.5 if K[j][j] > 0.0 else 0.0 for j in range(k)]
    alpha = [0.0] * k
    for _ in range(sweeps):
        for j in range(k):
            nj = norms[j]
            if nj == 0.0:
                continue
            row = K[j]
            residual = b[j] - sum(row[l] * alpha[l] for l in range(k))
            alpha[j] += residual / (nj * nj)
    return torch.tensor(alpha, dtype=torch.float64, device=inner.device)
