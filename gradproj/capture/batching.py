"""Batching of small parameter tensors (LoRA adapters, biases).

For a parameter with a few thousand elements, per-layer Python and kernel-dispatch overhead
costs far more than its arithmetic. Such parameters are grouped at ``wrap()`` time by
(number of elements, compute dtype, device) -- a LoRA ``A`` (r x d) and ``B`` (d x r) share a group,
since everything batched works on flattened rows; during the backward each one's sequence gradients are written into
its row of the group's buffer, and when the microbatch closes the strategy runs once per group
with batched operations (:class:`LayerBatch`).
"""

from __future__ import annotations

import torch

from gradproj.linalg.sequence_grads import MaterializedGrads
from gradproj.strategies.base import LayerStep

__all__ = ["ParamGroup", "LayerBatch", "BATCH_MAX_NUMEL", "BATCH_MAX_BYTES", "BATCH_ROWS_ESTIMATE"]

#: Parameters with at most this many elements are batched.
BATCH_MAX_NUMEL = 1 << 16
#: Upper bound on the memory all group buffers may take (estimated for k = 16 sequences).
BATCH_MAX_BYTES = 256 << 20
#: Rows per batched parameter the budget assumes: k + 1 for microbatches of k = 16 sequences.
BATCH_ROWS_ESTIMATE = 17


class ParamGroup:
    """Parameters with one element count/dtype/device whose sequence gradients share one buffer.

    The buffer ``rows`` has shape (L, k+1, numel): rows ``[:, :k]`` hold each member's flattened
    ``s_i``, row ``k`` is scratch for its running gradient (so one batched Gram gives K, b and
    ||G||^2).
    """

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.numel = int(numel)
        self.dtype = dtype
        self.device = device
        self.members: list[tuple[torch.Tensor, str]] = []
        self._rows: torch.Tensor | None = None

    def add(self, param: torch.Tensor, name: str) -> int:
        """Register a member; returns its row index."""
        self.members.append((param, name))
        return len(self.members) - 1

    def rows(self, k: int) -> torch.Tensor:
        """The (L, k+1, numel) buffer for microbatches of ``k`` sequences (reused while k is unchanged)."""
        L = len(self.members)
        if self._rows is None or self._rows.shape[1] != k + 1:
            self._rows = torch.empty(L, k + 1, self.numel, dtype=self.dtype, device=self.device)
        return self._rows

    def slot(self, index: int, k: int) -> torch.Tensor:
        """Where member ``index`` writes its (k, *shape) sequence gradients."""
        return self.rows(k)[index, :k].view(k, *self.members[index][0].shape)

    def release(self) -> None:
        """Free the buffer."""
        self._rows = None


class LayerBatch:
    """Several parameter tensors with the same number of elements in one microbatch.

    Attributes:
        names: qualified parameter names.
        params: the parameters.
        grads: their running gradients (``None`` = 0; ``grad_of(param)`` reads them, default ``.grad``).
        coefficients: float64 (k,) per-sequence loss coefficients, or (L, k) once a per-layer
            transform made them differ between members.
        k: number of sequences.
    """

    def __init__(self, group: ParamGroup, indices: list[int], coefficients: torch.Tensor, grad_of=None) -> None:
        k = coefficients.shape[0]
        rows = group.rows(k)
        indices = sorted(indices)  # the backward fills rows in reverse layer order
        if len(indices) != rows.shape[0]:
            rows = rows.index_select(0, torch.tensor(indices, device=rows.device))
        self._rows = rows
        self.names = [group.members[i][1] for i in indices]
        self.params = [group.members[i][0] for i in indices]
        self.grads = [p.grad if grad_of is None else grad_of(p) for p in self.params]
        self.coefficients = coefficients
        self.k = k
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
        if all(grad is not None for grad in self.grads):
            torch._foreach_copy_(list(rows), [grad.reshape(-1) for grad in self.grads])
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
