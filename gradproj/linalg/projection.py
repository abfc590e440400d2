"""Projection coefficients from a k x k Gram matrix.

All functions work on small float64 NumPy arrays on the host: the k x k algebra of one layer
is a few microseconds there, against tens of microseconds of dispatch for the same torch ops.
They return ``alpha`` (shape (k,)) such that the part of ``G`` the projector removes is
``sum_i alpha_i s_i``; they never touch a parameter-sized tensor.
"""

from __future__ import annotations

import numpy as np

__all__ = ["solve_coefficients", "gram_schmidt_coefficients", "default_damping"]


def default_damping(gram: np.ndarray) -> float:
    """The default ridge ``1e-6 * mean(diag K)``: an essentially exact projector."""
    return 1e-6 * float(np.mean(np.diagonal(gram))) if gram.size else 0.0


def solve_coefficients(gram: np.ndarray, inner: np.ndarray, damping: float | None) -> np.ndarray:
    """``beta = (K + damping I)^-1 b`` (``damping=None``: :func:`default_damping`).

    With ``damping == 0`` a singular K (duplicate or zero sequence gradients) is handled by the
    pseudo-inverse, i.e. the exact orthogonal projector onto the span.
    """
    k = gram.shape[0]
    diag = np.diagonal(gram)
    if k == 0 or not np.any(diag > 0.0):
        return np.zeros(k)
    lam = default_damping(gram) if damping is None else float(damping)
    if lam > 0.0:
        return np.linalg.solve(gram + lam * np.eye(k), inner)
    evals, evecs = np.linalg.eigh(gram)
    keep = evals > np.abs(evals).max() * k * np.finfo(np.float64).eps * 10
    inv = np.zeros_like(evals)
    inv[keep] = 1.0 / evals[keep]
    return evecs @ (inv * (evecs.T @ inner))


def gram_schmidt_coefficients(gram: np.ndarray, inner: np.ndarray, sweeps: int) -> np.ndarray:
    """Coefficients of sequential Gram-Schmidt over the normalised ``s_j / ||s_j||``.

    Reproduces ``for sweep: for j: G <- G - <G, s^_j> s^_j`` exactly, in coefficient space:
    with ``G_cur = G - sum_l alpha_l s_l``, ``<G_cur, s^_j> = (b_j - (K alpha)_j) / ||s_j||``.
    Zero sequence gradients are skipped.
    """
    k = gram.shape[0]
    alpha = np.zeros(k)
    diag = np.diagonal(gram)
    for _ in range(sweeps):
        for j in range(k):
            if diag[j] > 0.0:
                alpha[j] += (inner[j] - gram[j] @ alpha) / diag[j]
    return alpha
