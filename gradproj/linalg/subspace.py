"""Dominant subspaces of token-level factors, without a d x d eigendecomposition.

``top_subspace(X, ...)`` returns an orthonormal basis ``U`` (d x r) of the span of the top-r right
singular vectors of ``X`` (N tokens x d features), i.e. the top-r left singular vectors of ``X^T``:

* ``exact``: from the eigendecomposition of the smaller Gram, ``X X^T`` (N x N) or ``X^T X``
  (d x d), in float64; ``U = X^T V / sigma`` on the N x N route.
* ``randomized``: a randomised range finder (Halko et al. 2011) with ``niter`` power iterations and
  ``oversample`` extra columns; the sketch is orthonormalised through its q x q Gram in float64
  (no tall QR, which is slow on CPU). The test matrix is fixed per shape (no global RNG is touched,
  and the result does not depend on the history of the run).
* ``auto``: exact while the smaller Gram side is at most :data:`EXACT_MAX`, randomized above.

The rank is ``rank`` (capped by the numerical rank of X), or with ``energy`` the smallest r whose
top singular values hold that fraction of ``||X||_F^2`` (at most ``rank``).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["top_subspace", "EXACT_MAX", "RANK_RTOL"]

#: ``solver="auto"`` uses the exact route while min(N, d) is at most this.
EXACT_MAX = 64
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


def _choose_rank(values: np.ndarray, total: float, rank: int, energy: float | None) -> int:
    """Rank from descending squared singular values ``values`` (float64)."""
    if values.size == 0 or values[0] <= 0.0:
        return 0
    keep = int((values > (RANK_RTOL**2) * values[0]).sum())
    r = min(rank, keep)
    if energy is not None and total > 0.0:
        cumulative = np.cumsum(values) / total
        r = min(r, int(np.searchsorted(cumulative, energy - 1e-15)) + 1)
    return r


def _descending_eigh(matrix: np.ndarray):
    values, vectors = np.linalg.eigh(matrix)
    return np.maximum(values[::-1], 0.0), vectors[:, ::-1]


def _exact(x: torch.Tensor, rank: int, energy: float | None) -> torch.Tensor:
    n, d = x.shape
    x64 = x.double()
    gram = (x64 @ x64.T) if n <= d else (x64.T @ x64)
    host = gram.cpu().numpy()
    if not np.isfinite(host).all():
        return _nan_basis(x)
    # torch's eigh: NumPy's OpenBLAS would start its own thread pool, which then spins against
    # torch's threads for the rest of the backward (a 20x slowdown measured on 2 cores). The rest
    # is small host work: inside a backward every extra tensor operation costs tens of microseconds.
    values, vectors = torch.linalg.eigh(gram)
    values = np.maximum(values.cpu().numpy()[::-1], 0.0)
    r = _choose_rank(values, float(values.sum()), rank, energy)
    top = vectors.flip(1)[:, :r]
    if n <= d:
        top = x64.T @ (top / torch.from_numpy(np.sqrt(values[:r])).to(top.device))
    return top.to(x.dtype)


def _nan_basis(x: torch.Tensor) -> torch.Tensor:
    """The "basis" of a factor with NaN/inf entries: one NaN column, so whatever is projected with
    it is non-finite too and the engine drops the microbatch (LAPACK would raise instead)."""
    return torch.full((x.shape[1], 1), float("nan"), dtype=x.dtype, device=x.device)


def _whitener(y: torch.Tensor) -> np.ndarray | None:
    """T (q x q') with ``y @ T`` orthonormal, from the q x q Gram ``y^T y`` (float64).

    Cholesky (``T = L^-T``) when the Gram is well conditioned -- one small factorisation -- else
    ``T = V diag(mu^-1/2)`` from its eigendecomposition, which also drops a rank-deficient sketch's
    null directions (fewer kept tokens than columns, or a low-rank factor). ``None`` if the
    sketch is not finite.
    """
    gram = (y.T @ y).double().cpu().numpy()
    if not np.isfinite(gram).all():
        return None
    chol = _cholesky(gram)
    if chol is not None:
        return np.linalg.inv(chol).T
    mu, v = _descending_eigh(gram)
    keep = mu > 1e-12 * mu[0] if mu.size and mu[0] > 0 else np.zeros(mu.shape, dtype=bool)
    return v[:, keep] / np.sqrt(mu[keep])


#: Cholesky whitening only while the sketch's Gram has min/max pivot ratio above this (its
#: condition number below ~1e8): the sketch stays orthonormal to ~1e-8 in float64.
_CHOLESKY_MIN_PIVOT = 1e-4


def _cholesky(gram: np.ndarray) -> np.ndarray | None:
    """Lower Cholesky factor of a well-conditioned Gram, else ``None``."""
    try:
        chol = np.linalg.cholesky(gram)
    except np.linalg.LinAlgError:
        return None
    pivots = np.diagonal(chol)
    if pivots.size == 0 or not pivots.min() > _CHOLESKY_MIN_PIVOT * pivots.max():
        return None
    return chol


def _randomized(x, rank, energy, oversample, niter, keep) -> tuple[torch.Tensor, torch.Tensor]:
    """Range finder without a tall QR (the sketch is whitened through its q x q Gram, in float64).

    Passes over ``x``: ``2 + 2 * niter`` skinny matmuls; everything else is q x q or q x d. The
    last sketch ``z = y^T x`` (q x d) is taken to float64 before the small products, so the basis
    ``z^T mix`` is orthonormal to float64 rounding by construction (``mix^T z z^T mix = I``) and
    needs no re-orthonormalisation after the cast back to the factor's dtype.
    """
    n, d = x.shape
    q = min(rank + oversample, n, d)
    y = x @ _test_matrix(d, q, x.dtype, x.device)  # (N, q): sketch of the token space
    masked = keep is not None
    if masked:
        y = y * keep
    else:  # a row is zero iff its sketch is (almost surely); zero rows of x stay zero in every y
        keep = (y != 0).any(dim=1, keepdim=True)
    for _ in range(niter):
        z = y.T @ x  # (q, d)
        t = _whitener(y)
        if t is None:
            return _nan_basis(x), keep
        y = x @ (z.T @ torch.from_numpy(t).to(device=x.device, dtype=x.dtype))
        if masked:
            y = y * keep
    t = _whitener(y)
    if t is None:
        return _nan_basis(x), keep
    z = (y.T @ x).double()  # rows of X at dropped positions meet zero rows of y
    zz = (z @ z.T).cpu().numpy()
    if not np.isfinite(zz).all():
        return _nan_basis(x), keep
    values, vectors = _descending_eigh(t.T @ zz @ t)  # B B^T for B = Q^T X, Q = y T orthonormal
    total = float(torch.linalg.vector_norm(x * keep, dtype=torch.float64) ** 2) if energy is not None else 0.0
    r = _choose_rank(values, total, rank, energy)
    mix = t @ (vectors[:, :r] / np.sqrt(values[:r]))  # (q, r): mix^T zz mix = I
    basis = z.T @ torch.from_numpy(mix).to(z.device)
    return basis.to(x.dtype), keep


def top_subspace(
    x: torch.Tensor,
    rank: int,
    energy: float | None = None,
    solver: str = "auto",
    oversample: int = 4,
    niter: int = 1,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal (d, r) basis of the dominant row space of ``x`` (N, d); see the module doc.

    ``keep`` (N, 1) bool: the rows that count (others are treated as zero). Returns
    ``(basis, keep)``; without ``keep`` given, the returned one marks the non-zero rows of ``x``.
    """
    n, d = x.shape
    if n == 0 or d == 0 or rank <= 0:
        return x.new_zeros(d, 0), torch.ones(n, 1, dtype=torch.bool, device=x.device) if keep is None else keep
    if solver == "exact" or (solver == "auto" and min(n, d) <= EXACT_MAX):
        if keep is None:
            keep = (x != 0).any(dim=1, keepdim=True)
        else:
            x = x * keep
        return _exact(x, rank, energy), keep
    return _randomized(x, rank, energy, oversample, niter, keep)
