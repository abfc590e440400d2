"""A batch of small parameter tensors in one microbatch, as a strategy sees it.

Capture groups small parameters with one element count (LoRA adapters, biases) and fills each
member's row of a shared buffer during the backward (:mod:`gradproj.capture.batching`); the
strategy then runs once per group with batched operations over this view.
"""

from __future__ import annotations

import torch

from gradproj.linalg.sequence_grads import MaterializedGrads
from gradproj.work.layer_step import LayerStep

__all__ = ["LayerBatch"]


class LayerBatch:
    """Several parameter tensors with the same number of elements in one microbatch.

    Attributes:
        names: qualified parameter names.
        params: the parameters.
        grads: their running gradients (``None`` = 0).
        coefficients: float64 (k,) per-sequence loss coefficients, or (L, k) once a per-layer
            transform made them differ between members.
        k: number of sequences.
    """

    def __init__(
        self,
        rows: torch.Tensor,
        names: list[str],
        params: list[torch.Tensor],
        grads: list[torch.Tensor | None],
        coefficients: torch.Tensor,
    ) -> None:
        self._rows = rows  # (L, k+1, numel): the members' sequence gradients, and a scratch row each
        self.names = names
        self.params = params
        self.grads = grads
        self.coefficients = coefficients
        self.k = coefficients.shape[0]
        #: set by a strategy that has established its updates are finite (see ``LayerStep.finite``)
        self.finite = False

    def __len__(self) -> int:
        return len(self.params)

    @property
    def sequence_grads(self) -> torch.Tensor:
        """(L, k, numel) view of the members' sequence gradients."""
        return self._rows[:, : self.k]

    def gram_with_grads(self) -> torch.Tensor:
        """(L, k+1, k+1) float64 Grams of ``[s_1..s_k, G]`` per member (G = 0 where ``None``)."""
        rows = self._rows[:, self.k].unbind(0)
        grads = [grad for grad in self.grads if grad is not None]
        if len(grads) == len(self.grads):
            torch._foreach_copy_(list(rows), [grad.reshape(-1) for grad in grads])
        else:
            for row, grad in zip(rows, self.grads):
                row.zero_() if grad is None else row.copy_(grad.reshape(-1))
        return torch.bmm(self._rows, self._rows.transpose(1, 2)).double()

    def combine(self, gamma: torch.Tensor) -> torch.Tensor:
        """(L, numel) updates ``sum_i gamma[l, i] s_i^(l)`` for a (L, k) (or (k,)) ``gamma``."""
        gamma = gamma.to(self._rows.dtype)
        if gamma.dim() == 1:
            return torch.matmul(gamma, self.sequence_grads)
        return torch.bmm(gamma.unsqueeze(1), self.sequence_grads).squeeze(1)

    def steps(self) -> list[LayerStep]:
        """Per-member :class:`LayerStep` views (for strategies without a batched implementation)."""
        seqs = self.sequence_grads
        coeffs = self.coefficients
        return [
            LayerStep(
                name, param, grad, coeffs if coeffs.dim() == 1 else coeffs[i], MaterializedGrads(seqs[i].view(self.k, *param.shape))
            )
            for i, (name, param, grad) in enumerate(zip(self.names, self.params, self.grads))
        ]
