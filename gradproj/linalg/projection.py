"""Projection coefficients from k x k Gram matrices, batched over layers.

All functions work on small float64 NumPy arrays on the host -- the k x k algebra of a layer is a
few microseconds there -- with a leading batch dimension L (one row per parameter tensor). They
return ``alpha`` (shape (L, k)) such that the part of ``G`` the projector removes is
``sum_i alpha_i s_i``; they never touch a parameter-sized tensor.
"""

from __future__ import annotations

import numpy as np

__all__ = ["solve_coefficients", "gram_schmidt_coefficients"]


def solve_coefficients(gram: np.ndarray, inner: np.ndarray, damping: float | None) -> np.ndarray:
    """``beta = (K + damping I)^-1 b`` per layer; ``damping=None``: ``1e-6 * mean(diag K)``.

    Args:
        gram: (L, k, k) Gram matrices.
        inner: (L, k) inner products with the running gradient.
        damping: ridge; ``0`` uses the pseudo-inverse (exact projector onto the span, also when
            K is singular: duplicate or zero sequence gradients).
    """
    L, k = inner.shape
    diag = np.diagonal(gram, axis1=1, axis2=2)
    active = diag.max(axis=1, initial=0.0) > 0.0  # layers with at least one non-zero s_i
    if not active.all():
        alpha = np.zeros((L, k))
        if active.any():
            alpha[active] = solve_coefficients(gram[active], inner[active], damping)
        return alpha
    if damping is None or damping > 0.0:
        lam = 1e-6 * diag.mean(axis=1) if damping is None else np.full(L, float(damping))
        return np.linalg.solve(gram + lam[:, None, None] * np.eye(k), inner[..., None])[..., 0]
    evals, evecs = np.linalg.eigh(gram)
    cutoff = np.abs(evals).max(axis=1, keepdims=True) * k * np.finfo(np.float64).eps * 10
    keep = evals > cutoff
    inv = np.where(keep, 1.0 / np.where(keep, evals, 1.0), 0.0)
    coords = np.einsum("lij,li->lj", evecs, inner)
    return np.einsum("lij,lj->li", evecs, inv * coords)


def gram_schmidt_coefficients(gram: np.ndarray, inner: np.ndarray, sweeps: int) -> np.ndarray:
    """Coefficients of sequential Gram-Schmidt over the normalised ``s_j / ||s_j||``, per layer.

    Reproduces ``for sweep: for j: G <- G - <G, s^_j> s^_j`` exactly, in coefficient space:
    with ``G_cur = G - sum_l alpha_l s_l``, ``<G_cur, s^_j> = (b_j - (K alpha)_j) / ||s_j||``.
    Zero sequence gradients are skipped.
    """
    L, k = inner.shape
    alpha = np.zeros((L, k))
    diag = np.diagonal(gram, axis1=1, axis2=2)
    nonzero = diag > 0.0
    safe = np.where(nonzero, diag, 1.0)
    for _ in range(sweeps):
        for j in range(k):
            residual = inner[:, j] - np.einsum("lk,lk->l", gram[:, j, :], alpha)
            alpha[:, j] += np.where(nonzero[:, j], residual / safe[:, j], 0.0)
    return alpha
