"""Batching of small parameter tensors (LoRA adapters, biases).

For a parameter with a few thousand elements, per-layer Python and kernel-dispatch overhead
costs far more than its arithmetic. Such parameters are grouped at ``wrap()`` time by
(number of elements, compute dtype, device) -- a LoRA ``A`` (r x d) and ``B`` (d x r) share a group,
since everything batched works on flattened rows; during the backward each one's sequence gradients are written into
its row of the group's buffer, and when the microbatch closes the strategy runs once per group
with batched operations (`gradproj.work.LayerBatch`).
"""

from __future__ import annotations

import torch

from gradproj.work import LayerBatch

__all__ = ["ParamGroup", "BATCH_MAX_NUMEL", "BATCH_MAX_BYTES", "BATCH_ROWS_ESTIMATE"]

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

    def batch(self, indices: list[int], coefficients: torch.Tensor, grad_of=None) -> LayerBatch:
        """The members ``indices`` (filled in this microbatch) as one `LayerBatch`.

        ``grad_of(param)`` reads a member's running gradient (default ``param.grad``)."""
        k = coefficients.shape[0]
        rows = self.rows(k)
        indices = sorted(indices)  # the backward fills rows in reverse layer order
        if len(indices) != rows.shape[0]:
            rows = rows.index_select(0, torch.tensor(indices, device=rows.device))
        params = [self.members[i][0] for i in indices]
        grads = [p.grad if grad_of is None else grad_of(p) for p in params]
        return LayerBatch.stacked(rows, [self.members[i][1] for i in indices], params, grads, coefficients)
