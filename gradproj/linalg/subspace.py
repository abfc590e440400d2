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

__all__ = ["top_subspace", "top_subspaces", "EXACT_MAX", "RANK_RTOL"]

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


def _nan_basis(x: torch.Tensor) -> torch.Tensor:
    """The "basis" of a factor with NaN/inf entries: one NaN column, so whatever is projected with
    it is non-finite too and the engine drops the microbatch (LAPACK would raise instead)."""
    return torch.full((x.shape[1], 1), float("nan"), dtype=x.dtype, device=x.device)


def _stack(tensors: list) -> torch.Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _exact_batch(xs: list, keeps: list, rank: int, energy: float | None) -> list:
    """Exact route for factors of one shape, dtype and device: their float64 Grams (the smaller
    side) stacked and eigendecomposed in one call."""
    n, d = xs[0].shape
    x64 = _stack(xs).double()
    derived = [s for s, keep in enumerate(keeps) if keep is None]
    if derived:  # the non-zero rows
        flags = (x64[derived] != 0).any(dim=2, keepdim=True)
        for j, s in enumerate(derived):
            keeps[s] = flags[j]
    if len(derived) < len(xs):  # rows outside `keep` count as zero
        x64 = x64 * _stack(keeps)
    gram = (x64 @ x64.transpose(1, 2)) if n <= d else (x64.transpose(1, 2) @ x64)
    finite = np.isfinite(gram.cpu().numpy()).all(axis=(1, 2))
    out = [(_nan_basis(x), keep) for x, keep in zip(xs, keeps)]
    live = np.flatnonzero(finite).tolist()
    if not live:
        return out
    # torch's eigh: NumPy's OpenBLAS would start its own thread pool, which then spins against
    # torch's threads for the rest of the backward (a 20x slowdown measured on 2 cores)
    values, vectors = torch.linalg.eigh(gram[live] if len(live) < len(xs) else gram)
    host = np.maximum(values.cpu().numpy()[:, ::-1], 0.0)
    for j, s in enumerate(live):
        r = _choose_rank(host[j], float(host[j].sum()), rank, energy)
        top = vectors[j].flip(1)[:, :r]
        if n <= d:
            top = x64[s].T @ (top / torch.from_numpy(np.sqrt(host[j, :r])).to(top.device))
        out[s] = (top.to(xs[s].dtype), keeps[s])
    return out


#: Cholesky whitening only while the sketch's Gram has min/max pivot ratio above this (its
#: condition number below ~1e8): the sketch stays orthonormal to ~1e-8 in float64.
_CHOLESKY_MIN_PIVOT = 1e-4


def _cholesky_whitener(gram: np.ndarray) -> np.ndarray | None:
    """``T = L^-T`` from the Cholesky factor of a well-conditioned q x q Gram, else ``None``."""
    try:
        chol = np.linalg.cholesky(gram)
    except np.linalg.LinAlgError:
        return None
    pivots = np.diagonal(chol)
    return np.linalg.inv(chol).T if pivots.min() > _CHOLESKY_MIN_PIVOT * pivots.max() else None


def _eigen_whitener(gram: np.ndarray) -> np.ndarray:
    """``T = V diag(mu^-1/2)`` over the Gram's non-null directions; the other columns are zero."""
    mu, v = np.linalg.eigh(gram)
    mu, v = np.maximum(mu[::-1], 0.0), v[:, ::-1]
    kept = mu > 1e-12 * mu[0] if mu.size and mu[0] > 0 else np.zeros(mu.shape, dtype=bool)
    out = np.zeros_like(gram)
    out[:, : int(kept.sum())] = v[:, kept] / np.sqrt(mu[kept])
    return out


def _whiteners(ys: torch.Tensor, live: np.ndarray) -> np.ndarray:
    """T (S, q, q) with ``ys[s] @ T[s]`` orthonormal, from the q x q Grams (float64).

    Cholesky (``T = L^-T``) where the Gram is well conditioned -- the usual case, one batched
    factorisation -- else ``T = V diag(mu^-1/2)`` from its eigendecomposition, which drops a
    rank-deficient sketch's null directions (fewer kept tokens than columns, or a low-rank factor);
    the dropped columns of T are zero. Sides whose Gram is not finite are marked dead in ``live``.
    """
    if ys.shape[0] == 1:  # one factor: 2-D calls (NumPy's stacked routines cost more per call)
        grams = (ys[0].T @ ys[0]).double().cpu().numpy()[None]
    else:
        grams = torch.bmm(ys.transpose(1, 2), ys).double().cpu().numpy()
    live &= np.isfinite(grams).all(axis=(1, 2))
    if len(grams) > 1 and live.all():
        try:
            chol = np.linalg.cholesky(grams)
        except np.linalg.LinAlgError:
            chol = None
        if chol is not None:
            pivots = np.diagonal(chol, axis1=1, axis2=2)
            if (pivots.min(axis=1) > _CHOLESKY_MIN_PIVOT * pivots.max(axis=1)).all():
                return np.linalg.inv(chol).transpose(0, 2, 1)
    out = np.zeros_like(grams)
    for s in np.flatnonzero(live):  # one by one: a single factor, or some Gram needs the fallback
        t = _cholesky_whitener(grams[s])
        out[s] = _eigen_whitener(grams[s]) if t is None else t
    return out


def _randomized_batch(xs: list, keeps: list, rank, energy, oversample, niter) -> list:
    """Range finder for factors with the same token count, sketch width, dtype and device.

    Per factor: ``2 + 2 * niter`` skinny matmuls over ``x`` (the passes); the q x q algebra of all
    factors (whitenings, eigendecompositions) runs batched, without a tall QR. The last sketch
    ``z = y^T x`` (q x d) is taken to float64 before the small products, so the basis ``z^T mix``
    is orthonormal to float64 rounding by construction (``mix^T z z^T mix = I``).
    """
    n, q = xs[0].shape[0], min(rank + oversample, *(x.shape[1] for x in xs), xs[0].shape[0])
    dtype, device = xs[0].dtype, xs[0].device
    ys = torch.empty(len(xs), n, q, dtype=dtype, device=device)  # sketches of the token space
    for s, x in enumerate(xs):
        torch.mm(x, _test_matrix(x.shape[1], q, dtype, device), out=ys[s])
    derived = [s for s, keep in enumerate(keeps) if keep is None]
    if derived:  # a row is zero iff its sketch is (almost surely); zero rows of x stay zero in every y
        flags = (ys != 0).any(dim=2, keepdim=True)
        for s in derived:
            keeps[s] = flags[s]
    mask = _stack(keeps) if len(derived) < len(xs) else None  # rows outside `keep` count as zero
    if mask is not None:
        ys.mul_(mask)
    live = np.ones(len(xs), dtype=bool)
    for _ in range(niter):
        tw = torch.from_numpy(_whiteners(ys, live)).to(device=device, dtype=dtype)
        for s, x in enumerate(xs):
            torch.mm(x, (ys[s].T @ x).T @ tw[s], out=ys[s])
        if mask is not None:
            ys.mul_(mask)
    t = _whiteners(ys, live)
    zs = [(ys[s].T @ x).double() for s, x in enumerate(xs)]  # rows of x at dropped positions meet zero rows of y
    zz = _stack([z @ z.T for z in zs]).cpu().numpy()
    live &= np.isfinite(zz).all(axis=(1, 2))
    if not live.all():
        zz[~live] = 0.0
    small = t.transpose(0, 2, 1) @ zz @ t  # B B^T for B = Q^T x, Q = y T orthonormal
    values, vectors = np.linalg.eigh(small)
    values, vectors = np.maximum(values[:, ::-1], 0.0), vectors[:, :, ::-1]
    out = []
    for s, x in enumerate(xs):
        if not live[s]:
            out.append((_nan_basis(x), keeps[s]))
            continue
        total = float(torch.linalg.vector_norm(x * keeps[s], dtype=torch.float64) ** 2) if energy is not None else 0.0
        r = _choose_rank(values[s], total, rank, energy)
        mix = t[s] @ (vectors[s, :, :r] / np.sqrt(values[s, :r]))  # (q, r): mix^T zz mix = I
        out.append(((zs[s].T @ torch.from_numpy(mix).to(zs[s].device)).to(dtype), keeps[s]))
    return out


def top_subspaces(
    items: list,
    rank: int,
    energy: float | None = None,
    solver: str = "auto",
    oversample: int = 4,
    niter: int = 1,
) -> list:
    """:func:`top_subspace` of several factors at once: ``items`` = ``[(x, keep or None), ...]``.

    Returns ``[(basis, keep), ...]`` in the same order, equal to calling :func:`top_subspace` on
    each item (up to rounding): factors with the same shape class are computed together, so their
    small q x q algebra runs batched -- inside a backward pass every small operation is costly.
    """
    if not items:
        return []
    out: list = [None] * len(items)
    groups: dict = {}
    for index, (x, keep) in enumerate(items):
        n, d = x.shape
        if n == 0 or d == 0 or rank <= 0:
            out[index] = (x.new_zeros(d, 0), torch.ones(n, 1, dtype=torch.bool, device=x.device) if keep is None else keep)
            continue
        exact = solver == "exact" or (solver == "auto" and min(n, d) <= EXACT_MAX)
        key = ("exact", n, d) if exact else ("randomized", n, min(rank + oversample, n, d))
        groups.setdefault(key + (x.dtype, x.device), []).append(index)
    for key, indices in groups.items():
        xs = [items[i][0] for i in indices]
        keeps = [items[i][1] for i in indices]
        if key[0] == "exact":
            results = _exact_batch(xs, keeps, rank, energy)
        else:
            results = _randomized_batch(xs, keeps, rank, energy, oversample, niter)
        for i, result in zip(indices, results):
            out[i] = result
    return out


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
    return top_subspaces([(x, keep)], rank, energy, solver, oversample, niter)[0]
