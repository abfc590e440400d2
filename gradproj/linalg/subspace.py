"""Dominant subspaces of token-level factors, without a d x d eigendecomposition, in two phases.

The basis ``U`` (d x r) of the top-r right singular vectors of ``X`` (N tokens x d features) --
the top-r left singular vectors of ``X^T`` -- is found in two steps, so that a backward pass never
waits for the host:

1. `sketch_subspace` (per layer, inside the backward): the passes over ``X`` that reduce it to
   a small `PendingSubspace` -- a Gram to eigendecompose and the rows that span the basis.
   Only matrix products and masks: no value is read on the host.
2. `resolve_subspaces` (once for everything pending, e.g. when the microbatch closes): one
   batched eigendecomposition per shape class, then the bases. torch reads the error codes of an
   eigendecomposition on the host, so this is where intra_proma's one synchronisation happens.

Routes:

* ``exact``: the eigendecomposition of the smaller Gram, ``X X^T`` (N x N, kept as the span) or
  ``X^T X`` (d x d), in float64; ``U = X^T V / sigma`` on the N x N route.
* ``randomized``: a randomised range finder (Halko et al. 2011) with ``niter`` power iterations and
  ``oversample`` extra columns. Between passes the sketch is whitened through a regularised
  Cholesky factor of its q x q Gram (any well-conditioned basis of its span will do there); the
  last sketch ``z = y^T x`` is kept, and at resolve its span is orthonormalised through the
  eigendecomposition of ``y^T y`` (null directions dropped), so the basis ``z^T mix`` is
  orthonormal to float64 rounding by construction. The test matrix is fixed per shape (no global
  RNG is touched, and the result does not depend on the history of the run).
* ``auto``: exact while the smaller Gram side is at most `EXACT_MAX`, randomized above.

The rank is ``rank`` (capped by the numerical rank of X), or with ``energy`` the smallest r whose
top singular values hold that fraction of ``||X||_F^2`` (at most ``rank``). Since the rank depends
on the data, a basis always has ``min(rank, ...)`` columns, those beyond the chosen rank zero (a
zero column projects nothing): the shapes never depend on values. ``PendingSubspace.rank`` holds
the chosen rank as a device tensor. Rows outside ``keep`` count as zero; without ``keep``, the
non-zero rows of X are kept. A factor with NaN/inf entries gets an all-NaN basis, so whatever is
projected with it is non-finite too and the engine drops the microbatch.
"""

from __future__ import annotations

import torch

__all__ = [
    "PendingSubspace",
    "sketch_subspace",
    "resolve_subspaces",
    "top_subspace",
    "top_subspaces",
    "EXACT_MAX",
    "RANK_RTOL",
]

#: ``solver="auto"`` uses the exact route while min(N, d) is at most this.
EXACT_MAX = 64
#: Singular values below ``RANK_RTOL * sigma_max`` count as zero (numerical rank).
RANK_RTOL = 1e-6
#: The whitening between power iterations adds this fraction of the sketch Gram's mean eigenvalue
#: to its diagonal (so its Cholesky factor always exists, also for a rank-deficient sketch).
WHITEN_RIDGE = 1e-10
#: Eigenvalues of the last sketch's Gram below this fraction of the largest are null directions.
NULL_RTOL = 1e-12

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


class PendingSubspace:
    """One factor's subspace between `sketch_subspace` and `resolve_subspaces`.

    Attributes:
        keep: (N, 1) bool, the rows that count.
        basis: (d, width) basis once resolved (``None`` before): orthonormal columns up to the
            chosen rank, zero columns after it.
        rank: the chosen rank (0-dim int64 device tensor) once resolved.
    """

    __slots__ = ("route", "keep", "dtype", "width", "gram", "span", "total", "basis", "rank")

    def __init__(self, route: str, keep: torch.Tensor, dtype: torch.dtype, width: int, gram=None, span=None, total=None) -> None:
        self.route = route  # "rows" / "cols" (exact), "sketch" (randomized), "empty"
        self.keep = keep
        self.dtype = dtype
        self.width = width  # columns of the basis
        self.gram = gram  # float64 Gram to eigendecompose
        self.span = span  # rows spanning the basis: float64 kept rows of x ("rows"), the last sketch z ("sketch")
        self.total = total  # ||x_kept||_F^2 (float64, randomized route with energy)
        self.basis: torch.Tensor | None = None
        self.rank: torch.Tensor | None = None

    @property
    def resolved(self) -> bool:
        """Whether the basis is there."""
        return self.basis is not None

    def nbytes(self) -> int:
        """Memory held until resolved."""
        return sum(t.numel() * t.element_size() for t in (self.gram, self.span) if t is not None)

    def group(self) -> tuple:
        """Pending subspaces with equal groups are resolved with one batched eigendecomposition (two
        for the randomized route): one group per route and device. The smaller Grams (and spans) of
        a group are padded with zeros to the largest -- zero eigenvalues, never kept -- so factors of
        any size, e.g. the experts of an MoE layer with their different token counts, share a call."""
        return (self.route, self.gram.device)


def _derived_keep(x: torch.Tensor) -> torch.Tensor:
    """The non-zero rows of ``x`` (N, 1)."""
    return (x != 0).any(dim=1, keepdim=True)


def _whitener(y: torch.Tensor) -> torch.Tensor:
    """``T`` (q x q, y's dtype) with ``y T`` well conditioned and spanning ``y``'s columns: the inverse
    transposed Cholesky factor of ``y^T y + ridge I`` (no error check, no host read)."""
    y64 = y.double()
    gram = y64.T @ y64
    q = gram.shape[0]
    scale = gram.diagonal().sum() / q
    ridge = torch.where(scale > 0, WHITEN_RIDGE * scale, 1.0)
    eye = torch.eye(q, dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky_ex(gram + ridge * eye, check_errors=False)[0]
    return torch.linalg.solve_triangular(chol, eye, upper=False).T.to(y.dtype)


def sketch_subspace(
    x: torch.Tensor,
    rank: int,
    energy: float | None = None,
    solver: str = "auto",
    oversample: int = 4,
    niter: int = 1,
    keep: torch.Tensor | None = None,
) -> PendingSubspace:
    """Phase 1: reduce ``x`` (N, d) to what `resolve_subspaces` needs (see the module doc).

    ``keep`` (N, 1) bool: the rows that count (others are treated as zero); ``None``: the non-zero
    rows (on the randomized route, the rows whose sketch is non-zero -- the same, almost surely).
    Reads no value on the host."""
    n, d = x.shape
    if n == 0 or d == 0 or rank <= 0:
        keep = _derived_keep(x) if keep is None else keep
        pending = PendingSubspace("empty", keep, x.dtype, 0)
        pending.basis = x.new_zeros(d, 0)
        pending.rank = torch.zeros((), dtype=torch.int64, device=x.device)
        return pending
    if solver == "exact" or (solver == "auto" and min(n, d) <= EXACT_MAX):
        keep = _derived_keep(x) if keep is None else keep
        x64 = x.double() * keep
        if n <= d:
            return PendingSubspace("rows", keep, x.dtype, min(rank, n), gram=x64 @ x64.T, span=x64)
        return PendingSubspace("cols", keep, x.dtype, min(rank, d), gram=x64.T @ x64)
    q = min(rank + oversample, n, d)
    y = x @ _test_matrix(d, q, x.dtype, x.device)
    if keep is None:  # a row is zero iff its sketch is (almost surely): no pass over x for the mask
        keep = _derived_keep(y)
    y = y * keep
    for _ in range(niter):
        y = (x @ ((y.T @ x).T @ _whitener(y))) * keep
    z = y.T @ x  # (q, d): rows of x at dropped positions meet zero rows of y
    total = torch.linalg.vector_norm(x * keep, dtype=torch.float64) ** 2 if energy is not None else None
    # the Gram of the sketch's actual values, in float64: a low-precision product's rounding would
    # pose as directions of its own (null directions of a low-rank factor's sketch kept, then amplified)
    y64 = y.double()
    return PendingSubspace("sketch", keep, x.dtype, min(rank, q), gram=y64.T @ y64, span=z, total=total)


def _descending_eigh(grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of symmetric (S, m, m) matrices, largest first."""
    values, vectors = torch.linalg.eigh(grams)
    return values.flip(-1).clamp(min=0.0), vectors.flip(-1)


def _kept_columns(values: torch.Tensor, total: torch.Tensor, width: int, energy: float | None) -> torch.Tensor:
    """(S, width) bool: which of the leading eigenpairs the rank rule keeps (a prefix of each row).

    ``values``: (S, m) descending squared singular values; ``total``: (S,) the factors' squared
    norms (the energy rule's denominator)."""
    top = values[:, :width]
    alive = values[:, :1] > 0.0
    keep = alive & (top > (RANK_RTOL**2) * values[:, :1])
    if energy is not None:
        cumulative = torch.cumsum(values, dim=1)[:, :width] / torch.where(total > 0, total, 1.0)[:, None]
        before = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=1)  # cumulative_{j-1}
        first = torch.zeros_like(keep)
        first[:, 0] = True
        keep = keep & (first | (before < energy - 1e-15) | (total <= 0)[:, None])
    return keep


def resolve_subspaces(pending: list[PendingSubspace], energy: float | None = None) -> None:
    """Phase 2: the bases of every unresolved entry of ``pending``, in place -- one batched
    eigendecomposition per shape class (two for the randomized route)."""
    groups: dict = {}
    for item in pending:
        if not item.resolved:
            groups.setdefault(item.group(), []).append(item)
    for items in groups.values():
        if items[0].route == "sketch":
            _resolve_sketches(items, energy)
        else:
            _resolve_exact(items, energy)


def _padded(tensors: list[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """The tensors stacked, each zero-padded to (rows, cols)."""
    if all(t.shape == (rows, cols) for t in tensors):
        return torch.stack(tensors)
    out = tensors[0].new_zeros(len(tensors), rows, cols)
    for index, t in enumerate(tensors):
        out[index, : t.shape[0], : t.shape[1]] = t
    return out


def _finite_grams(grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(finite flags (S,), grams with the non-finite ones replaced by the identity)."""
    finite = torch.isfinite(grams).all(dim=2).all(dim=1)
    eye = torch.eye(grams.shape[-1], dtype=grams.dtype, device=grams.device)
    return finite, torch.where(finite[:, None, None], grams, eye)


def _finish(item: PendingSubspace, basis: torch.Tensor, kept: torch.Tensor, finite: torch.Tensor) -> None:
    item.basis = (basis + torch.where(finite, 0.0, torch.nan)).to(item.dtype)
    item.rank = kept.sum()


def _resolve_exact(items: list[PendingSubspace], energy: float | None) -> None:
    m = max(item.gram.shape[0] for item in items)
    finite, grams = _finite_grams(_padded([item.gram for item in items], m, m))
    values, vectors = _descending_eigh(grams)
    width = max(item.width for item in items)
    kept = _kept_columns(values, values.sum(dim=1), width, energy)
    top = vectors[:, :, :width]
    if items[0].route == "rows":  # U = x^T V / sigma over the kept pairs (padded rows of x are zero)
        scale = torch.where(kept, values[:, :width], 1.0).rsqrt() * kept
        d = max(item.span.shape[1] for item in items)
        spans = _padded([item.span for item in items], m, d)
        bases = spans.transpose(1, 2) @ (top * scale[:, None, :])
    else:  # the eigenvectors of x^T x themselves (padded coordinates: zero)
        bases = top * kept[:, None, :]
    for index, item in enumerate(items):
        size = item.span.shape[1] if item.route == "rows" else item.gram.shape[0]
        _finish(item, bases[index, :size], kept[index], finite[index])
        item.gram = item.span = None


def _resolve_sketches(items: list[PendingSubspace], energy: float | None) -> None:
    q = max(item.gram.shape[0] for item in items)
    finite, grams = _finite_grams(_padded([item.gram for item in items], q, q))
    # T = V diag(mu^-1/2) over the non-null directions of y^T y: y T is orthonormal
    mu, v = _descending_eigh(grams)
    live = (mu > NULL_RTOL * mu[:, :1]) & (mu[:, :1] > 0.0)
    whiten = v * (torch.where(live, mu, 1.0).rsqrt() * live)[:, None, :]
    spans = [item.span.double() for item in items]
    zz = _padded([z @ z.T for z in spans], q, q)
    finite = finite & torch.isfinite(zz).all(dim=2).all(dim=1)
    zz = torch.where(finite[:, None, None], zz, 0.0)
    whiten = torch.where(finite[:, None, None], whiten, 0.0)
    small = whiten.transpose(1, 2) @ zz @ whiten  # B B^T for B = Q^T x, Q = y T orthonormal
    values, vectors = _descending_eigh(small)
    width = max(item.width for item in items)
    if energy is not None:
        total = torch.stack([item.total for item in items])
    else:
        total = values.sum(dim=1)
    kept = _kept_columns(values, total, width, energy)
    scale = torch.where(kept, values[:, :width], 1.0).rsqrt() * kept
    mix = whiten @ (vectors[:, :, :width] * scale[:, None, :])  # (S, q, width): mix^T zz mix = I on kept columns
    for index, (item, z) in enumerate(zip(items, spans)):
        _finish(item, z.T @ mix[index, : z.shape[0]], kept[index], finite[index])
        item.gram = item.span = item.total = None


def top_subspaces(
    items: list,
    rank: int,
    energy: float | None = None,
    solver: str = "auto",
    oversample: int = 4,
    niter: int = 1,
) -> list:
    """`top_subspace` of several factors at once: ``items`` = ``[(x, keep or None), ...]``.

    Returns ``[(basis, keep), ...]`` in the same order, equal to calling `top_subspace` on
    each item (up to rounding); the small algebra of factors with the same shape class runs
    batched. Like `top_subspace`, it reads the chosen ranks on the host (a convenience for
    callers outside the backward; the capture uses `sketch_subspace` and
    `resolve_subspaces`).
    """
    pending = [sketch_subspace(x, rank, energy, solver, oversample, niter, keep=keep) for x, keep in items]
    resolve_subspaces(pending, energy)
    return [(_trimmed(item), item.keep) for item in pending]


def _trimmed(item: PendingSubspace) -> torch.Tensor:
    """The basis without its zero columns (an all-NaN basis keeps one column)."""
    assert item.basis is not None and item.rank is not None
    if item.basis.shape[1] and bool(torch.isnan(item.basis).all()):
        return item.basis[:, :1]
    return item.basis[:, : int(item.rank)]


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
    The chosen rank ``r`` is read on the host (use `sketch_subspace` in a backward pass).
    """
    return top_subspaces([(x, keep)], rank, energy, solver, oversample, niter)[0]
