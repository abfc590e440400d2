"""Intra-PROMA's factored projection of one microbatch's gradient (SPEC 2.3).

With token factors ``R`` (N x p) and ``C`` (N x q) of a matrix parameter (token u contributes
``outer(R_u, C_u)``, so ``g = R^T diag(c) C``) and orthonormal bases ``U_R`` (p x r1), ``U_C``
(q x r2) of their dominant subspaces::

    complement:  g' = g - U_R (U_R^T g U_C) U_C^T          (a rank-r correction)
    kron:        g' = (I - U_R U_R^T) g (I - U_C U_C^T)

Vector parameters (biases, norm weights) have per-token rows only: ``g' = (I - U U^T) g`` for both
projectors. An embedding table's row factor is one-hot (token u contributes ``e_{id_u} delta_u^T``):
the dominant row subspace is spanned by the rows of the ``r`` most frequent ids among the tokens
that carry a gradient (ties: lower id first -- the one-hot Gram is diagonal, so this *is* its top-r
eigenspace, with a deterministic choice inside tied eigenvalues). A tied parameter (embedding and
lm_head) concatenates the tokens of all its uses, one-hot rows materialised. Only skinny products with ``g`` and the factors are formed, and no d x d
eigendecomposition (subspaces from :func:`gradproj.linalg.subspace.top_subspace`).
"""

from __future__ import annotations

import torch

from gradproj.linalg.sequence_grads import IndexTokenFactors, TokenFactors, dense_token_factors
from gradproj.linalg.subspace import top_subspace

__all__ = ["project_factored", "top_ids", "SubspaceCache"]


def top_ids(ids: torch.Tensor, keep: torch.Tensor, rank: int, energy: float | None) -> torch.Tensor:
    """The ``rank`` most frequent ids among the kept tokens (ties: lower id first), or fewer with ``energy``."""
    kept = ids[keep.reshape(-1)]
    if kept.numel() == 0:
        return kept
    distinct, counts = torch.unique(kept, return_counts=True)  # ids ascending
    order = torch.sort(-counts, stable=True).indices  # count descending, ties keep ascending ids
    r = min(rank, distinct.numel())
    if energy is not None:
        cumulative = torch.cumsum(counts[order].double(), 0) / kept.numel()
        r = min(r, int((cumulative < energy - 1e-15).sum()) + 1)
    return distinct[order[:r]]


def _project_embedding(g, factors: IndexTokenFactors, projector: str, options: dict):
    keep = (factors.cols != 0).any(dim=1, keepdim=True)
    selected = top_ids(factors.ids, keep, options["rank"], options["energy"])
    basis_c, _ = top_subspace(factors.cols, keep=keep, **options)
    ranks = (selected.numel(), basis_c.shape[1])
    if projector == "complement":  # U_R = one-hot columns of the selected ids
        core = g.index_select(0, selected) @ basis_c
        g.index_add_(0, selected, -(core @ basis_c.T))
        return g, float(core.double().square().sum()), ranks
    before = torch.linalg.vector_norm(g, dtype=torch.float64)
    g.index_fill_(0, selected, 0.0)  # (I - P_R) g
    g.sub_((g @ basis_c) @ basis_c.T)  # ... (I - P_C)
    after = torch.linalg.vector_norm(g, dtype=torch.float64)
    return g, max(float(before**2 - after**2), 0.0), ranks


class SubspaceCache:
    """Subspaces computed in this microbatch that a later parameter may reuse.

    Layers fed the same tensor (q/k/v projections, gate/up, LoRA ``lora_A`` of those) share their
    input subspace, and a bias shares its weight's output-gradient subspace, when they also keep
    the same positions. Such parameters run back to back in the backward, so only the ``size`` most
    recently used input-side entries and the last output-side one are kept: an entry holds a
    reference to its tensor, which the allocator could otherwise reuse (holding every layer's
    factors makes the backward allocate fresh memory).
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: list = []
        self._last_output: tuple | None = None

    @staticmethod
    def _key(x: torch.Tensor):
        return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device)

    def get(self, x: torch.Tensor, keep: torch.Tensor):
        """The cached basis of ``x`` with the same kept positions, or ``None``."""
        key = self._key(x)
        last = self._last_output
        if last is not None and last[0] == key and torch.equal(last[1], keep):
            return last[2]
        for index, entry in enumerate(self._entries):
            if entry[0] == key and torch.equal(entry[1], keep):
                self._entries.append(self._entries.pop(index))  # most recently used last
                return entry[2]
        return None

    def put(self, x: torch.Tensor, keep: torch.Tensor, basis: torch.Tensor, output: bool = False) -> None:
        """Remember the basis of ``x`` for these kept positions: as the last output-side entry
        (replacing the previous one), or among the input-side ones (forgetting the oldest)."""
        entry = (self._key(x), keep, basis, x)
        if output:
            self._last_output = entry
            return
        self._entries.append(entry)
        if len(self._entries) > self.size:
            del self._entries[0]

    def clear(self) -> None:
        """Forget everything (end of the microbatch)."""
        self._entries.clear()
        self._last_output = None


def _cached_side(x: torch.Tensor, keep: torch.Tensor, options: dict, cache: SubspaceCache | None):
    if cache is not None:
        basis = cache.get(x, keep)
        if basis is not None:
            return basis
    basis = top_subspace(x, keep=keep, **options)[0]
    if cache is not None:
        cache.put(x, keep, basis)
    return basis


def _output_side(x: torch.Tensor, options: dict, cache: SubspaceCache | None):
    """Subspace of an output-gradient factor and its kept (non-zero) rows; remembered in ``cache``."""
    basis, keep = top_subspace(x, **options)
    if cache is not None:
        cache.put(x, keep, basis, output=True)
    return basis, keep


def project_factored(g: torch.Tensor, factors, *, rank: int, energy: float | None,
                     projector: str, solver: str, oversample: int, niter: int,
                     cache: SubspaceCache | None = None):
    """Project ``g = sum_i c_i s_i`` in place; returns ``(g', removed_sq, ranks)``.

    ``factors``: :class:`TokenFactors`, :class:`IndexTokenFactors`, or a list of them (the uses of
    a tied parameter). ``cache``: share subspaces between parameters whose factor is the same tensor. ``removed_sq`` is ``||g - g'||^2`` (float), ``ranks`` the subspace dimension of
    each side. Token positions whose output-gradient row is zero (padding) are left out of both subspaces.
    """
    options = dict(rank=rank, energy=energy, solver=solver, oversample=oversample, niter=niter)
    if isinstance(factors, IndexTokenFactors):
        return _project_embedding(g, factors, projector, options)
    if isinstance(factors, list):
        rows, cols, keep = dense_token_factors(factors)
        basis_r, _ = top_subspace(rows, keep=keep, **options)
        basis_c, _ = top_subspace(cols, keep=keep, **options)
        return _project_matrix(g, rows.shape[1], cols.shape[1], basis_r, basis_c, projector)
    k, t = factors.rows.shape[:2]
    rows = factors.rows.reshape(k * t, -1)
    cols = None if factors.cols is None else factors.cols.reshape(k * t, -1)
    if factors.out_grads is factors.rows:
        basis_r, keep = _output_side(rows, options, cache)
        basis_c = None if cols is None else _cached_side(cols, keep, options, cache)
    elif factors.out_grads is factors.cols:
        basis_c, keep = _output_side(cols, options, cache)
        basis_r = _cached_side(rows, keep, options, cache)
    else:  # e.g. a bias: its rows are the output gradients its weight already looked at
        keep = (factors.out_grads.reshape(k * t, -1) != 0).any(dim=1, keepdim=True)
        basis_r = _cached_side(rows, keep, options, cache)
        basis_c = None if cols is None else _cached_side(cols, keep, options, cache)
    if basis_c is None:
        flat = g.view(-1)
        inner = basis_r.T @ flat
        flat.sub_(basis_r @ inner)
        return g, float(inner.double().square().sum()), (basis_r.shape[1],)
    return _project_matrix(g, rows.shape[1], cols.shape[1], basis_r, basis_c, projector)


def _project_matrix(g, p: int, q: int, basis_r, basis_c, projector: str):
    g2 = g.view(p, q)
    if projector == "complement":
        core = (basis_r.T @ g2) @ basis_c  # U_R^T g U_C  (r1 x r2)
        g2.addmm_(basis_r, core @ basis_c.T, alpha=-1.0)  # one pass over g
        return g, float(core.double().square().sum()), (basis_r.shape[1], basis_c.shape[1])
    before = torch.linalg.vector_norm(g2, dtype=torch.float64)
    g2.addmm_(basis_r, basis_r.T @ g2, alpha=-1.0)  # (I - P_R) g
    g2.addmm_(g2 @ basis_c, basis_c.T, alpha=-1.0)  # ... (I - P_C)
    after = torch.linalg.vector_norm(g2, dtype=torch.float64)
    # g' is orthogonal to g - g' (both projectors are orthogonal), so ||g - g'||^2 = ||g||^2 - ||g'||^2
    return g, max(float(before**2 - after**2), 0.0), (basis_r.shape[1], basis_c.shape[1])
