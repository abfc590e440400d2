"""Sequence gradients of a parameter used by several covered modules (tied weights).

The parameter's sequence gradient is the sum of the pieces' (``s_i = sum_p s_i^(p)``), so its Gram
needs the cross terms ``<s_i^(p), s_j^(q)>``. Pieces that can restrict themselves to a set of rows
(``rows(ids)``, e.g. an embedding against a linear lm_head) pair cheaply; otherwise the smaller piece
is densified (k parameter-sized tensors).
"""

from __future__ import annotations

import torch

from gradproj.linalg.sequence_grads import augmented_gram

__all__ = ["SumGrads"]


def _cross(p, q) -> torch.Tensor:
    """(k, k) float64 matrix ``<s_i^(p), s_j^(q)>``."""
    if hasattr(p, "sparse_rows") and hasattr(q, "rows"):
        ids, M = p.sparse_rows()
        R = q.rows(ids).to(M.dtype)
        return (M.reshape(M.shape[0], -1) @ R.reshape(R.shape[0], -1).T).double()
    if hasattr(q, "sparse_rows") and hasattr(p, "rows"):
        return _cross(q, p).T
    k = p.k
    eye = torch.eye(k, dtype=torch.float64)
    dense = torch.stack([q.combine(eye[j]).reshape(-1) for j in range(k)])  # (k, numel) s_j^(q)
    return torch.stack([p.inner(dense[j].view(q.shape)) for j in range(k)], dim=1)


class SumGrads:
    """``s_i = sum_p s_i^(p)`` over pieces that each offer gram / inner / combine."""

    def __init__(self, pieces: list) -> None:
        self.pieces = pieces
        self.k = pieces[0].k
        self.shape = pieces[0].shape
        self._gram: torch.Tensor | None = None

    def gram(self) -> torch.Tensor:
        """``sum_p K^(p) + sum_{p != q} <s^(p), s^(q)>``."""
        if self._gram is None:
            total = sum(piece.gram() for piece in self.pieces)
            for a in range(len(self.pieces)):
                for b in range(a + 1, len(self.pieces)):
                    cross = _cross(self.pieces[a], self.pieces[b])
                    total = total + cross + cross.T
            self._gram = total
        return self._gram

    def inner(self, other: torch.Tensor) -> torch.Tensor:
        """``sum_p <s_i^(p), other>``."""
        return sum(piece.inner(other) for piece in self.pieces)

    def gram_with(self, other: torch.Tensor) -> torch.Tensor:
        """Gram of ``[s_1..s_k, other]``."""
        return augmented_gram(self, other)

    def token_factors(self) -> list:
        """The pieces' token factors (a list: strategies concatenate the tokens of all uses)."""
        return [piece.token_factors() for piece in self.pieces]

    def combine(self, gamma: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_p sum_i gamma_i s_i^(p)``."""
        total = self.pieces[0].combine(gamma, out)
        for piece in self.pieces[1:]:
            total = total + piece.combine(gamma).to(total.dtype)
        return total
