"""Intra-PROMA's factored projection of one microbatch's gradient (SPEC 2.3).

With token factors ``R`` (N x p) and ``C`` (N x q) of a matrix parameter (token u contributes
``outer(R_u, C_u)``), token coefficients ``c_u`` (the coefficient of u's sequence) and orthonormal
bases ``U_R`` (p x r1), ``U_C`` (q x r2) of their dominant subspaces::

    g = R^T diag(c) C
    complement:  g' = g - U_R [ (R U_R)^T diag(c) (C U_C) ] U_C^T          (rank-r correction)
    kron:        g' = (I - U_R U_R^T) g (I - U_C U_C^T)

Vector parameters (biases, norm weights) have per-token rows only: ``g' = (I - U U^T) g`` for both
projectors. Nothing of size p x q beyond ``g`` itself is built, and no d x d eigendecomposition
(subspaces from :func:`gradproj.linalg.subspace.top_subspace`).
"""

from __future__ import annotations

import torch

from gradproj.linalg.sequence_grads import TokenFactors
from gradproj.linalg.subspace import top_subspace

__all__ = ["kept_tokens", "project_factored"]


def kept_tokens(factors: TokenFactors, coefficients: torch.Tensor):
    """Flattened factors and token coefficients of the positions that carry an output gradient.

    Returns ``(rows (N', p), cols (N', q) or None, token_coefficients (N',))``.
    """
    k, t = factors.rows.shape[:2]
    out = factors.out_grads.reshape(k * t, -1)
    index = torch.nonzero(out.abs().amax(dim=1) > 0).squeeze(1)
    rows = factors.rows.reshape(k * t, -1).index_select(0, index)
    cols = None if factors.cols is None else factors.cols.reshape(k * t, -1).index_select(0, index)
    token_c = coefficients.to(device=rows.device, dtype=rows.dtype).repeat_interleave(t).index_select(0, index)
    return rows, cols, token_c


def project_factored(g: torch.Tensor, factors: TokenFactors, coefficients: torch.Tensor, *, rank: int,
                     energy: float | None, projector: str, solver: str, oversample: int, niter: int):
    """Subtract the factored projection from ``g`` (in place); returns ``(g', removed_sq, ranks)``.

    ``g`` must be ``sum_i c_i s_i`` for these factors; ``removed_sq`` is ``||g - g'||^2`` (float).
    """
    rows, cols, token_c = kept_tokens(factors, coefficients)
    options = dict(rank=rank, energy=energy, solver=solver, oversample=oversample, niter=niter)
    basis_r = top_subspace(rows, **options)
    if cols is None:
        flat = g.view(-1)
        inner = basis_r.T @ flat
        flat.sub_(basis_r @ inner)
        return g, float(inner.double().square().sum()), (basis_r.shape[1],)
    basis_c = top_subspace(cols, **options)
    g2 = g.view(rows.shape[1], cols.shape[1])
    rows_r = rows @ basis_r  # (N', r1)
    cols_c = cols @ basis_c  # (N', r2)
    core = (rows_r * token_c[:, None]).T @ cols_c  # U_R^T g U_C
    if projector == "complement":
        g2.sub_(basis_r @ (core @ basis_c.T))
        return g, float(core.double().square().sum()), (basis_r.shape[1], basis_c.shape[1])
    # kron: g - P_R g - g P_C + P_R g P_C
    removed = basis_r @ ((rows_r * token_c[:, None]).T @ cols)  # P_R g
    removed += ((rows * token_c[:, None]).T @ cols_c) @ basis_c.T  # g P_C
    removed -= basis_r @ (core @ basis_c.T)  # P_R g P_C
    g2.sub_(removed)
    return g, float(torch.linalg.vector_norm(removed, dtype=torch.float64) ** 2), (basis_r.shape[1], basis_c.shape[1])
