"""Intra-PROMA's factored projection of one microbatch's gradient (SPEC 2.3).

With token factors ``R`` (N x p) and ``C`` (N x q) of a matrix parameter (token u contributes
``outer(R_u, C_u)``, so ``g = R^T diag(c) C``) and orthonormal bases ``U_R`` (p x r1), ``U_C``
(q x r2) of their dominant subspaces::

    complement:  g' = g - U_R (U_R^T g U_C) U_C^T          (a rank-r correction)
    kron:        g' = (I - U_R U_R^T) g (I - U_C U_C^T)

Vector parameters (biases, norm weights) have per-token rows only: ``g' = (I - U U^T) g`` for both
projectors. Only skinny products with ``g`` and the factors are formed, and no d x d
eigendecomposition (subspaces from :func:`gradproj.linalg.subspace.top_subspace`).
"""

from __future__ import annotations

import torch

from gradproj.linalg.sequence_grads import TokenFactors
from gradproj.linalg.subspace import top_subspace

__all__ = ["project_factored"]


def project_factored(g: torch.Tensor, factors: TokenFactors, *, rank: int, energy: float | None,
                     projector: str, solver: str, oversample: int, niter: int):
    """Project ``g = sum_i c_i s_i`` in place; returns ``(g', removed_sq, ranks)``.

    ``removed_sq`` is ``||g - g'||^2`` (float), ``ranks`` the subspace dimension of each side.
    Token positions whose output-gradient row is zero (padding) are left out of both subspaces.
    """
    k, t = factors.rows.shape[:2]
    rows = factors.rows.reshape(k * t, -1)
    cols = None if factors.cols is None else factors.cols.reshape(k * t, -1)
    options = dict(rank=rank, energy=energy, solver=solver, oversample=oversample, niter=niter)
    if factors.out_grads is factors.rows:
        basis_r, keep = top_subspace(rows, **options)
        basis_c = None if cols is None else top_subspace(cols, keep=keep, **options)[0]
    elif factors.out_grads is factors.cols:
        basis_c, keep = top_subspace(cols, **options)
        basis_r = top_subspace(rows, keep=keep, **options)[0]
    else:
        keep = (factors.out_grads.reshape(k * t, -1) != 0).any(dim=1, keepdim=True)
        basis_r = top_subspace(rows, keep=keep, **options)[0]
        basis_c = None if cols is None else top_subspace(cols, keep=keep, **options)[0]
    if basis_c is None:
        flat = g.view(-1)
        inner = basis_r.T @ flat
        flat.sub_(basis_r @ inner)
        return g, float(inner.double().square().sum()), (basis_r.shape[1],)
    g2 = g.view(rows.shape[1], cols.shape[1])
    if projector == "complement":
        core = (basis_r.T @ g2) @ basis_c  # U_R^T g U_C  (r1 x r2)
        g2.sub_(basis_r @ (core @ basis_c.T))
        return g, float(core.double().square().sum()), (basis_r.shape[1], basis_c.shape[1])
    before = torch.linalg.vector_norm(g2, dtype=torch.float64)
    g2.sub_(basis_r @ (basis_r.T @ g2))  # (I - P_R) g
    g2.sub_((g2 @ basis_c) @ basis_c.T)  # ... (I - P_C)
    after = torch.linalg.vector_norm(g2, dtype=torch.float64)
    # g' is orthogonal to g - g' (both projectors are orthogonal), so ||g - g'||^2 = ||g||^2 - ||g'||^2
    return g, max(float(before**2 - after**2), 0.0), (basis_r.shape[1], basis_c.shape[1])
