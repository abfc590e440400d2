"""Dominant subspaces of token-level factors, without a d x d eigendecomposition.

``top_subspace(X, ...)`` returns an orthonormal basis ``U`` (d x r) of the span of the top-r right
singular vectors of ``X`` (N tokens x d features), i.e. the top-r left singular vectors of ``X^T``:

* ``exact``: from the eigendecomposition of the smaller Gram, ``X X^T`` (N x N) or ``X^T X``
  (d x d), in float64; ``U = X^T V / sigma`` on the N x N route.
* ``randomized``: a randomised range finder (Halko et al. 2011) with ``niter`` power iterations and
  ``oversample`` extra columns. The test matrix is fixed per shape (no global RNG is touched, and the
  result does not depend on the history of the run).
* ``auto``: exact while the smaller Gram side is at most :data:`EXACT_MAX`, randomized above.

The rank is ``rank`` (capped by the numerical rank of X), or with ``energy`` the smallest r whose
top singular values hold that fraction of ``||X||_F^2`` (at most ``rank``).
"""

from __future__ import annotations

import torch

__all__ = ["top_subspace", "EXACT_MAX", "RANK_RTOL"]

#: ``solver="auto"`` uses the exact route while min(N, d) is at most this.
EXACT_MAX = 128
#: Singular values below ``RANK_RTOL * sigma_max`` count as zero (numerical rank).
RANK_RTOL = 1e-6

_TEST_MATRICES: dict = {}


def _test_matrix(d: int, q: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (d, q, dtype, device)
    omega = _TEST_MATRICES.get(key)
    if omega is None:
        gen = torch.Generator(device="cpu").manual_seed(0x9E3779B9 ^ (d * 7919 + q))
        omega = torch.randn(d, q, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        if len(_TEST_MATRICES) > 256:
            _TEST_MATRICES.clear()
        _TEST_MATRICES[key] = omega
    return omega


def _choose_rank(values: torch.Tensor, total: float, rank: int, energy: float | None) -> int:
    """Rank from descending singular values squared ``values`` (float64)."""
    if values.numel() == 0 or float(values[0]) <= 0.0:
        return 0
    keep = int((values > (RANK_RTOL**2) * values[0]).sum())
    r = min(rank, keep)
    if energy is not None and total > 0.0:
        cumulative = torch.cumsum(values, 0) / total
        needed = int(torch.searchsorted(cumulative, torch.tensor([energy], dtype=torch.float64) - 1e-15)) + 1
        r = min(r, needed)
    return r


def _exact(x: torch.Tensor, rank: int, energy: float | None) -> torch.Tensor:
    n, d = x.shape
    x64 = x.double()
    if n <= d:
        values, vectors = torch.linalg.eigh(x64 @ x64.T)
    else:
        values, vectors = torch.linalg.eigh(x64.T @ x64)
    values, vectors = values.flip(0).clamp(min=0.0), vectors.flip(1)
    r = _choose_rank(values, float(values.sum()), rank, energy)
    if n <= d:
        basis = (x64.T @ vectors[:, :r]) / values[:r].sqrt()
    else:
        basis = vectors[:, :r]
    return basis.to(x.dtype)


def _randomized(x: torch.Tensor, rank: int, energy: float | None, oversample: int, niter: int) -> torch.Tensor:
    n, d = x.shape
    q = min(rank + oversample, n, d)
    y = x @ _test_matrix(d, q, x.dtype, x.device)  # (N, q)
    for _ in range(niter):
        y, _ = torch.linalg.qr(y)
        z, _ = torch.linalg.qr(x.T @ y)  # (d, q)
        y = x @ z
    basis_n, _ = torch.linalg.qr(y)
    small = basis_n.T @ x  # (q, d): X ~= basis_n @ small
    _, s, vh = torch.linalg.svd(small.double(), full_matrices=False)
    values = s * s
    total = float(torch.linalg.vector_norm(x, dtype=torch.float64) ** 2)
    r = _choose_rank(values, total, rank, energy)
    return vh[:r].T.to(x.dtype)


def top_subspace(
    x: torch.Tensor,
    rank: int,
    energy: float | None = None,
    solver: str = "auto",
    oversample: int = 8,
    niter: int = 2,
) -> torch.Tensor:
    """Orthonormal (d, r) basis of the dominant row space of ``x`` (N, d); see the module doc."""
    n, d = x.shape
    if n == 0 or d == 0 or rank <= 0:
        return x.new_zeros(d, 0)
    if solver == "exact" or (solver == "auto" and min(n, d) <= EXACT_MAX):
        return _exact(x, rank, energy)
    return _randomized(x, rank, energy, oversample, niter)
