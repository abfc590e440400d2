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
eigendecomposition (subspaces from `gradproj.linalg.subspace`).

Two phases, so that the backward never waits for the host (`FactoredProjection`): ``add``
runs per parameter as its layer finishes -- the passes over the factors that reduce them to small
pending subspaces, the embedding's top ids -- and ``finish`` resolves every pending subspace at once
(one batched eigendecomposition per shape class) and projects the gradients. A basis has as many
columns as the rank allows, those beyond the chosen rank zero, so no shape depends on a value.
"""

from __future__ import annotations

from typing import Any

import torch

from gradproj.linalg.expert_grads import ExpertTokenFactors
from gradproj.linalg.sequence_grads import IndexTokenFactors, dense_token_factors
from gradproj.linalg.subspace import PendingSubspace, resolve_subspaces, sketch_subspace

__all__ = ["FactoredProjection", "project_factored", "project_factored_batch", "top_ids", "SubspaceCache"]

#: Whether equal kept-row masks held in different tensors may share a subspace on the CPU, where
#: comparing them reads nothing back from a device. On a GPU only the same mask tensor is shared
#: (comparing values would synchronise); the results are the same either way.
COMPARE_KEEPS_ON_CPU = True


def top_ids(ids: torch.Tensor, keep: torch.Tensor, rank: int, energy: float | None, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank`` most frequent ids among the kept tokens (ties: lower id first), or fewer with
    ``energy``: ``(ids (r,), valid (r,) bool)`` with ``r = min(rank, num_rows)``; ids past the
    chosen number (or never seen) are marked invalid rather than cut, so no shape depends on the data."""
    weights = keep.reshape(-1).to(torch.float64)
    counts = torch.zeros(num_rows, dtype=torch.float64, device=ids.device).index_add_(0, ids.reshape(-1), weights)
    order = torch.sort(-counts, stable=True).indices  # count descending, ties keep ascending ids
    r = min(rank, num_rows)
    selected = order[:r]
    chosen = counts[selected]
    valid = chosen > 0
    if energy is not None:
        total = weights.sum()
        cumulative = torch.cumsum(chosen, 0) / torch.where(total > 0, total, 1.0)
        before = torch.cat([cumulative.new_zeros(1), cumulative[:-1]])
        first = torch.zeros_like(valid)
        first[0] = True
        valid = valid & (first | (before < energy - 1e-15))
    return selected, valid


def _same_keep(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two kept-row masks are the same: the same tensor, or (on the CPU) equal."""
    if a is b:
        return True
    return COMPARE_KEEPS_ON_CPU and a.device.type == "cpu" and b.device.type == "cpu" and torch.equal(a, b)


def _key(x: torch.Tensor):
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device)


class SubspaceCache:
    """Subspaces (pending or resolved) computed in this microbatch that a later parameter may reuse.

    Layers fed the same tensor (q/k/v projections, gate/up, LoRA ``lora_A`` of those) share their
    input subspace, and a bias shares its weight's output-gradient subspace, when they also keep
    the same positions. Such parameters run back to back in the backward, so only the ``size`` most
    recently used input-side entries and the last output-side one are kept: an entry holds a
    reference to its tensor, which the allocator could otherwise reuse (holding every layer's
    factors makes the backward allocate fresh memory). The kept-row mask derived from a tensor's
    non-zero rows is remembered with the output-side entry, so the same mask tensor is handed to
    every parameter that derives it from that tensor (sharing without comparing values).
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: list = []
        self._last_output: tuple | None = None
        self._last_keep: tuple | None = None  # (key, tensor, derived keep)

    @staticmethod
    def _key(x: torch.Tensor):
        return _key(x)

    def keep_of(self, x: torch.Tensor) -> torch.Tensor:
        """The non-zero rows (N, 1) of ``x`` -- the very mask the last output-side subspace of ``x``
        derived, when there is one (no pass over ``x``, and shared by identity)."""
        key = _key(x)
        last = self._last_output
        if last is not None and last[0] == key and last[4]:
            return last[1]
        known = self._last_keep
        if known is not None and known[0] == key:
            return known[2]
        keep = (x != 0).any(dim=1, keepdim=True)
        self._last_keep = (key, x, keep)
        return keep

    def get(self, x: torch.Tensor, keep: torch.Tensor | None):
        """The cached subspace of ``x`` with the same kept positions (``None``: the ones derived from
        ``x`` itself), or ``None``."""
        key = _key(x)
        last = self._last_output
        if keep is None:
            return last[2] if last is not None and last[0] == key and last[4] else None
        if last is not None and last[0] == key and _same_keep(last[1], keep):
            return last[2]
        for index, entry in enumerate(self._entries):
            if entry[0] == key and _same_keep(entry[1], keep):
                self._entries.append(self._entries.pop(index))  # most recently used last
                return entry[2]
        return None

    def put(self, x: torch.Tensor, keep: torch.Tensor, basis, output: bool = False, derived: bool = False) -> None:
        """Remember the subspace of ``x`` for these kept positions: as the last output-side entry
        (replacing the previous one; ``derived``: its mask came from ``x`` itself), or among the
        input-side ones (forgetting the oldest)."""
        entry = (_key(x), keep, basis, x, derived)
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
        self._last_keep = None


class FactoredProjection:
    """Projects microbatch gradients ``g`` in place, in two phases (see the module doc).

    Args:
        rank (int): subspace dimension per side (the cap with ``energy``).
        energy (float | None): the energy rule's fraction, or ``None``.
        projector (str): ``"complement"`` or ``"kron"``.
        solver (str): ``"auto"``, ``"exact"`` or ``"randomized"``.
        oversample (int): extra sketch columns of the randomized route.
        niter (int): power iterations of the randomized route.
        cache (SubspaceCache | None): subspaces shared with earlier parameters of the microbatch.
    """

    def __init__(self, *, rank: int, energy: float | None, projector: str, solver: str, oversample: int,
                 niter: int, cache: SubspaceCache | None = None) -> None:
        self.options: dict[str, Any] = {"rank": rank, "energy": energy, "solver": solver, "oversample": oversample, "niter": niter}
        self.projector = projector
        self.cache = cache
        self._entries: list = []  # (g, [parts], [(view, contiguous copy)])
        self._pending: list[PendingSubspace] = []
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self) -> int:
        """Memory held by the pending subspaces (the gradients themselves are the caller's)."""
        return self._bytes

    # -- phase 1 ------------------------------------------------------------------------------
    def _sketch(self, x: torch.Tensor, keep: torch.Tensor | None, output: bool = False) -> PendingSubspace:
        """The (pending) subspace of ``x`` at ``keep`` (``None``: its non-zero rows), from the cache
        or sketched now."""
        cache = self.cache
        found = cache.get(x, keep) if cache is not None else None
        if found is not None:
            return found
        pending = sketch_subspace(x, keep=keep, **self.options)
        if not pending.resolved:
            self._pending.append(pending)
            self._bytes += pending.nbytes()
        if cache is not None:
            cache.put(x, pending.keep, pending, output=output, derived=keep is None)
        return pending

    def add(self, g: torch.Tensor, factors) -> None:
        """Phase 1 for one parameter: ``factors`` are `TokenFactors`, `IndexTokenFactors`,
        a list of them (a tied parameter's uses) or `ExpertTokenFactors`; ``g`` is projected in
        place by `finish`. The factors are not referenced afterwards."""
        parts: list = []
        copies: list = []
        if isinstance(factors, ExpertTokenFactors):
            blocks = factors.by_expert(g)
            for e, f in factors.blocks:
                view = blocks[e]
                if not view.is_contiguous():  # (peft's lora_B: columns j*E + e) projected in a copy
                    copy = view.contiguous()
                    copies.append((view, copy))
                    view = copy
                parts.append(self._part(view, f))
        else:
            parts.append(self._part(g, factors))
        self._entries.append((g, parts, copies))

    def _keep_of(self, x: torch.Tensor) -> torch.Tensor:
        """The non-zero rows of ``x`` (through the cache: the same mask tensor for the same ``x``)."""
        return self.cache.keep_of(x) if self.cache is not None else (x != 0).any(dim=1, keepdim=True)

    def _part(self, g: torch.Tensor, factors) -> tuple:
        if isinstance(factors, IndexTokenFactors):
            keep = self._keep_of(factors.cols)
            selected, valid = top_ids(factors.ids, keep, self.options["rank"], self.options["energy"], g.shape[0])
            return ("embedding", g, selected, valid, self._sketch(factors.cols, keep))
        if isinstance(factors, list):
            dense_rows, dense_cols, dense_keep = dense_token_factors(factors)
            tied = [sketch_subspace(x, keep=dense_keep, **self.options) for x in (dense_rows, dense_cols)]
            for pending in tied:
                if not pending.resolved:
                    self._pending.append(pending)
                    self._bytes += pending.nbytes()
            return ("matrix", g.view(dense_rows.shape[1], dense_cols.shape[1]), *tied)
        k, t = factors.rows.shape[:2]
        rows = factors.rows.reshape(k * t, -1)
        cols = None if factors.cols is None else factors.cols.reshape(k * t, -1)
        pending_c: PendingSubspace | None
        if factors.out_grads is factors.rows:
            pending_r = self._sketch(rows, None, output=True)
            pending_c = None if cols is None else self._sketch(cols, pending_r.keep)
        elif factors.out_grads is factors.cols:
            assert cols is not None
            pending_c = self._sketch(cols, None, output=True)
            pending_r = self._sketch(rows, pending_c.keep)
        else:  # e.g. a bias, whose rows are the output gradients its weight already looked at
            out = factors.out_grads.reshape(k * t, -1)
            keep = self._keep_of(out)
            pending_r = self._sketch(rows, keep)
            pending_c = None if cols is None else self._sketch(cols, keep)
        if pending_c is None or cols is None:
            return ("vector", g.view(-1), pending_r)
        return ("matrix", g.view(rows.shape[1], cols.shape[1]), pending_r, pending_c)

    # -- phase 2 ------------------------------------------------------------------------------
    def finish(self) -> list:
        """Resolve every pending subspace and project every added ``g`` in place.

        Returns, per added parameter in order, ``(g, removed_sq, total_sq, ranks)``: the squared norm
        removed and ``||g||^2`` before (float64 device scalars), and the rank of each side (device
        scalars; a fused expert parameter lists its slices' ones)."""
        entries, self._entries = self._entries, []
        pending, self._pending, self._bytes = self._pending, [], 0
        if not entries:
            return []
        resolve_subspaces(pending, self.options["energy"])
        norms = torch._foreach_norm([g for g, _, _ in entries])
        out = []
        for (g, parts, copies), norm in zip(entries, norms):
            removed: torch.Tensor | float = 0.0
            ranks: list = []
            for part in parts:
                project: Any = _PROJECT[part[0]]
                _, part_removed, part_ranks = project(*part[1:], self.projector)
                removed = removed + part_removed
                ranks.extend(part_ranks)
            for view, copy in copies:
                view.copy_(copy)
            total = norm.double() ** 2
            out.append((g, torch.as_tensor(removed, dtype=torch.float64, device=total.device), total, ranks))
        return out


def _basis(pending: PendingSubspace) -> torch.Tensor:
    assert pending.basis is not None, "subspace not resolved"
    return pending.basis


def _project_vector(flat: torch.Tensor, pending: PendingSubspace, projector: str):
    basis = _basis(pending)
    inner = basis.T @ flat
    flat.sub_(basis @ inner)
    return flat, inner.double().square().sum(), (pending.rank,)


def _project_embedding(g: torch.Tensor, selected: torch.Tensor, valid: torch.Tensor, pending_c: PendingSubspace, projector: str):
    basis_c = _basis(pending_c)
    ranks = (valid.sum(), pending_c.rank)
    if projector == "complement":  # U_R = one-hot columns of the selected ids
        core = (g.index_select(0, selected) @ basis_c) * valid[:, None]
        g.index_add_(0, selected, -(core @ basis_c.T))
        return g, core.double().square().sum(), ranks
    before = torch.linalg.vector_norm(g, dtype=torch.float64)
    g.index_copy_(0, selected, g.index_select(0, selected) * (~valid)[:, None])  # (I - P_R) g
    g.sub_((g @ basis_c) @ basis_c.T)  # ... (I - P_C)
    after = torch.linalg.vector_norm(g, dtype=torch.float64)
    return g, (before**2 - after**2).clamp(min=0.0), ranks


def _project_pair(g2: torch.Tensor, pending_r: PendingSubspace, pending_c: PendingSubspace, projector: str):
    g, removed, _ = _project_matrix(g2, g2.shape[0], g2.shape[1], _basis(pending_r), _basis(pending_c), projector)
    return g, removed, (pending_r.rank, pending_c.rank)


_PROJECT = {"vector": _project_vector, "embedding": _project_embedding, "matrix": _project_pair}


def _project_matrix(g, p: int, q: int, basis_r, basis_c, projector: str):
    """``g`` (viewed p x q) projected in place; ``(g, removed_sq, widths)``."""
    g2 = g.view(p, q)
    widths = (basis_r.shape[1], basis_c.shape[1])
    if projector == "complement":
        core = (basis_r.T @ g2) @ basis_c  # U_R^T g U_C  (r1 x r2)
        g2.addmm_(basis_r, core @ basis_c.T, alpha=-1.0)  # one pass over g
        return g, core.double().square().sum(), widths
    before = torch.linalg.vector_norm(g2, dtype=torch.float64)
    g2.addmm_(basis_r, basis_r.T @ g2, alpha=-1.0)  # (I - P_R) g
    g2.addmm_(g2 @ basis_c, basis_c.T, alpha=-1.0)  # ... (I - P_C)
    after = torch.linalg.vector_norm(g2, dtype=torch.float64)
    # g' is orthogonal to g - g' (both projectors are orthogonal), so ||g - g'||^2 = ||g||^2 - ||g'||^2
    return g, (before**2 - after**2).clamp(min=0.0), widths


def project_factored_batch(entries: list, *, rank: int, energy: float | None, projector: str,
                           solver: str, oversample: int, niter: int, cache: SubspaceCache | None = None) -> list:
    """Project several ``(g, factors)`` in place at once (both phases of `FactoredProjection`);
    a list of ``(g', removed_sq, ranks)`` with device-scalar ``removed_sq`` and ranks."""
    projection = FactoredProjection(rank=rank, energy=energy, projector=projector, solver=solver,
                                    oversample=oversample, niter=niter, cache=cache)
    for g, factors in entries:
        projection.add(g, factors)
    return [(g, removed, tuple(ranks)) for g, removed, _, ranks in projection.finish()]


def project_factored(g: torch.Tensor, factors, *, rank: int, energy: float | None,
                     projector: str, solver: str, oversample: int, niter: int,
                     cache: SubspaceCache | None = None):
    """Project ``g = sum_i c_i s_i`` in place; returns ``(g', removed_sq, ranks)``.

    ``factors``: `TokenFactors`, `IndexTokenFactors`, a list of them (the uses of a
    tied parameter) or `ExpertTokenFactors`. ``cache``: share subspaces between parameters
    whose factor is the same tensor. ``removed_sq`` is ``||g - g'||^2`` and ``ranks`` the subspace
    dimension of each side (device scalars). Token positions whose output-gradient row is zero
    (padding) are left out of both subspaces.
    """
    return project_factored_batch([(g, factors)], rank=rank, energy=energy, projector=projector, solver=solver,
                                  oversample=oversample, niter=niter, cache=cache)[0]
