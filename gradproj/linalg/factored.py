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

from typing import Any

import torch

from gradproj.linalg.expert_grads import ExpertTokenFactors
from gradproj.linalg.sequence_grads import IndexTokenFactors, dense_token_factors
from gradproj.linalg.subspace import top_subspace, top_subspaces

__all__ = ["project_factored", "project_factored_batch", "top_ids", "SubspaceCache"]


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


def _same_keep(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two kept-row masks are the same (the same object, or equal)."""
    return a is b or torch.equal(a, b)


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
        if last is not None and last[0] == key and _same_keep(last[1], keep):
            return last[2]
        for index, entry in enumerate(self._entries):
            if entry[0] == key and _same_keep(entry[1], keep):
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


class _Known:
    """Values (subspaces, or pending request numbers) per (factor, kept rows) within one batch;
    lookups fall back to ``cache`` (subspaces from earlier in the microbatch)."""

    def __init__(self, cache: SubspaceCache | None = None) -> None:
        self.cache = cache
        self.entries: dict = {}

    def get(self, x: torch.Tensor, keep: torch.Tensor):
        for known_keep, value in self.entries.get(SubspaceCache._key(x), ()):
            if _same_keep(known_keep, keep):
                return value
        return None if self.cache is None else self.cache.get(x, keep)

    def add(self, x: torch.Tensor, keep: torch.Tensor, value) -> None:
        self.entries.setdefault(SubspaceCache._key(x), []).append((keep, value))


def _kept_sides(requests: list, known: _Known, options: dict) -> list:
    """Bases of ``[(x, keep), ...]``: known ones looked up, the others computed in one batch."""
    bases: list = [None] * len(requests)
    todo: list = []
    for index, (x, keep) in enumerate(requests):
        bases[index] = known.get(x, keep)
        if bases[index] is None:
            todo.append(index)
    pending: list = []  # (x, keep, [request indices]) -- equal requests computed once
    numbers = _Known()  # (x, keep) -> its position in `pending`
    for index in todo:
        x, keep = requests[index]
        number = numbers.get(x, keep)
        if number is None:
            numbers.add(x, keep, len(pending))
            pending.append((x, keep, [index]))
        else:
            pending[number][2].append(index)
    results = top_subspaces([(x, keep) for x, keep, _ in pending], **options)
    for (x, keep, indices), (basis, _) in zip(pending, results):
        known.add(x, keep, basis)
        if known.cache is not None:
            known.cache.put(x, keep, basis)
        for index in indices:
            bases[index] = basis
    return bases


def project_factored(g: torch.Tensor, factors, *, rank: int, energy: float | None,
                     projector: str, solver: str, oversample: int, niter: int,
                     cache: SubspaceCache | None = None):
    """Project ``g = sum_i c_i s_i`` in place; returns ``(g', removed_sq, ranks)``.

    ``factors``: :class:`TokenFactors`, :class:`IndexTokenFactors`, or a list of them (the uses of
    a tied parameter). ``cache``: share subspaces between parameters whose factor is the same tensor. ``removed_sq`` is ``||g - g'||^2`` (float), ``ranks`` the subspace dimension of
    each side. Token positions whose output-gradient row is zero (padding) are left out of both subspaces.
    """
    return project_factored_batch(
        [(g, factors)], rank=rank, energy=energy, projector=projector, solver=solver,
        oversample=oversample, niter=niter, cache=cache,
    )[0]


def project_factored_batch(entries: list, *, rank: int, energy: float | None, projector: str,
                           solver: str, oversample: int, niter: int, cache: SubspaceCache | None = None) -> list:
    """:func:`project_factored` of several ``(g, factors)`` at once; a list of ``(g', removed_sq, ranks)``.

    The output-gradient subspaces of all entries are computed in one batch, then those of their
    other factors (inputs, kept positions from the first batch) in a second one
    (:func:`gradproj.linalg.subspace.top_subspaces`): the small per-factor algebra runs batched.
    A factor shared by several entries (q/k/v inputs, a weight's output gradients seen by its bias)
    is computed once. The result equals projecting the entries one at a time. A fused expert
    parameter (:class:`gradproj.linalg.expert_grads.ExpertTokenFactors`) is projected slice by
    slice, each expert's slice with its own tokens (its ranks are listed per slice).
    """
    options: dict[str, Any] = {"rank": rank, "energy": energy, "projector": projector, "solver": solver,
                               "oversample": oversample, "niter": niter, "cache": cache}
    if not any(isinstance(factors, ExpertTokenFactors) for _, factors in entries):
        return _project_entries(entries, **options)
    flat, owners, strided = [], [], []
    for index, (g, factors) in enumerate(entries):
        if not isinstance(factors, ExpertTokenFactors):
            flat.append((g, factors))
            owners.append(index)
            continue
        blocks = factors.by_expert(g)
        for e, f in factors.blocks:
            view = blocks[e]
            if not view.is_contiguous():  # (peft's lora_B: columns j*E + e) projected in a copy
                strided.append((view, len(flat)))
                view = view.contiguous()
            flat.append((view, f))
            owners.append(index)
    merged: list = [[g, 0.0, ()] for g, _ in entries]
    results = _project_entries(flat, **options)
    for view, position in strided:
        view.copy_(results[position][0])
    for owner, (_, removed_sq, ranks) in zip(owners, results):
        merged[owner][1] += removed_sq
        merged[owner][2] += tuple(ranks)
    return [tuple(entry) for entry in merged]


def _project_entries(entries: list, *, rank: int, energy: float | None, projector: str,
                     solver: str, oversample: int, niter: int, cache: SubspaceCache | None = None) -> list:
    """:func:`project_factored_batch` of entries without expert blocks."""
    options: dict[str, Any] = {"rank": rank, "energy": energy, "solver": solver, "oversample": oversample, "niter": niter}
    results: list = [None] * len(entries)
    plans = []  # (entry index, g, rows, cols, output side "r"/"c" or keep)
    for index, (g, factors) in enumerate(entries):
        if isinstance(factors, IndexTokenFactors):
            results[index] = _project_embedding(g, factors, projector, options)
        elif isinstance(factors, list):
            rows, cols, keep = dense_token_factors(factors)
            (basis_r, _), (basis_c, _) = top_subspaces([(rows, keep), (cols, keep)], **options)
            results[index] = _project_matrix(g, rows.shape[1], cols.shape[1], basis_r, basis_c, projector)
        else:
            plans.append((index, g, *_token_sides(factors)))
    if not plans:
        return results
    known = _Known(cache)
    # 1. output-gradient factors (their non-zero rows are the kept positions), each computed once
    outputs: dict = {}
    for _, _, rows, cols, side in plans:
        if isinstance(side, str):
            x = rows if side == "r" else cols
            outputs.setdefault(SubspaceCache._key(x), x)
    computed = dict(zip(outputs, top_subspaces([(x, None) for x in outputs.values()], **options)))
    for key, x in outputs.items():
        basis, keep = computed[key]
        known.add(x, keep, basis)
        if cache is not None:
            cache.put(x, keep, basis, output=True)
    # 2. the other factors, at the kept positions of their entry
    requests, slots = [], []
    for number, (_, _, rows, cols, side) in enumerate(plans):
        out_side = side if isinstance(side, str) else None
        keep = side if out_side is None else computed[SubspaceCache._key(rows if out_side == "r" else cols)][1]
        for which, x in (("r", rows), ("c", cols)):
            if x is not None and which != out_side:
                requests.append((x, keep))
                slots.append((number, which))
    found = dict(zip(slots, _kept_sides(requests, known, options)))
    for number, (index, g, rows, cols, side) in enumerate(plans):
        out_side = side if isinstance(side, str) else None
        basis_r = computed[SubspaceCache._key(rows)][0] if out_side == "r" else found[(number, "r")]
        if cols is None:
            flat = g.view(-1)
            inner = basis_r.T @ flat
            flat.sub_(basis_r @ inner)
            results[index] = (g, float(inner.double().square().sum()), (basis_r.shape[1],))
            continue
        basis_c = computed[SubspaceCache._key(cols)][0] if out_side == "c" else found[(number, "c")]
        results[index] = _project_matrix(g, rows.shape[1], cols.shape[1], basis_r, basis_c, projector)
    return results


def _token_sides(factors):
    """``(rows, cols, side)`` of token factors: the (k*t, .) row and column factors, and which of
    them holds the output gradients (``"r"``/``"c"``) -- or, when neither does (e.g. a bias, whose
    rows are the output gradients its weight already looked at), the kept token positions."""
    k, t = factors.rows.shape[:2]
    rows = factors.rows.reshape(k * t, -1)
    cols = None if factors.cols is None else factors.cols.reshape(k * t, -1)
    if factors.out_grads is factors.rows:
        return rows, cols, "r"
    if factors.out_grads is factors.cols:
        return rows, cols, "c"
    return rows, cols, (factors.out_grads.reshape(k * t, -1) != 0).any(dim=1, keepdim=True)


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
