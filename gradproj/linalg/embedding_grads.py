"""The sequence gradients of an embedding table (dense gradients, ``padding_idx`` honoured).

The sequence gradient of an embedding table is sparse: ``s_i = sum_{u in i} e_{id_u} delta_u^T``.
It is represented by ``M`` (k x U x d), U = the distinct token ids of the microbatch:
``M[i, t] = sum_{u in i, id_u = ids[t]} delta_u``. Then ``K = M M^T`` (flattened),
``<s_i, G> = sum_t <M[i, t], G[ids[t]]>`` and ``sum_i gamma_i s_i`` scatters ``gamma^T M`` into the
rows ``ids``. Positions holding ``padding_idx`` contribute nothing, as in ``nn.Embedding``'s backward.
"""

from __future__ import annotations

import torch

from gradproj.linalg.sequence_grads import IndexTokenFactors, row_gram

__all__ = ["EmbeddingGrads"]


class EmbeddingGrads:
    """Sequence gradients of an embedding table in the per-distinct-token form (see module doc)."""

    def __init__(self, ids: torch.Tensor, grads: torch.Tensor, num_embeddings: int, padding_idx: int | None) -> None:
        k, d = ids.shape[0], grads.shape[-1]
        flat_ids = ids.reshape(-1)
        flat = grads.reshape(-1, d)
        if padding_idx is not None:
            flat = flat * (flat_ids != padding_idx).unsqueeze(-1).to(flat.dtype)
        # The one host synchronisation of an embedding table per microbatch (counted in
        # tests/test_host_sync.py): the number of distinct ids is M's shape. A static shape would pad
        # M to one slot per token -- k times the tokens x d, several times the memory of the
        # distinct ids at RL batch sizes -- for one wait per table, not per layer.
        self.ids, inverse = torch.unique(flat_ids, return_inverse=True)
        seq = torch.arange(k, device=ids.device).repeat_interleave(ids.reshape(k, -1).shape[1])
        slots = seq * self.ids.numel() + inverse
        self.M = flat.new_zeros(k * self.ids.numel(), d).index_add_(0, slots, flat).view(k, -1, d)
        self._tokens = (flat_ids, flat)  # per-token factors, for strategies that need them
        self.num_embeddings = num_embeddings
        self.k = k
        self.shape = torch.Size((num_embeddings, d))
        self._gram: torch.Tensor | None = None

    def token_factors(self) -> IndexTokenFactors:
        """Per-token factors: each lookup contributes ``outer(e_id, delta)`` (padding_idx rows zeroed)."""
        ids, flat = self._tokens
        return IndexTokenFactors(ids, flat, self.num_embeddings)

    def sparse_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, M)``: the only non-zero rows of every ``s_i`` (for tied-weight cross terms)."""
        return self.ids, self.M

    def gram(self) -> torch.Tensor:
        """``K = M M^T`` over the flattened (distinct token, feature) axis."""
        if self._gram is None:
            self._gram = row_gram(self.M.reshape(self.k, -1))
        return self._gram

    def inner(self, other: torch.Tensor) -> torch.Tensor:
        """``b_i = sum_t <M[i, t], other[ids[t]]>``."""
        rows = other.index_select(0, self.ids).to(self.M.dtype)
        return (self.M * rows.unsqueeze(0)).sum(dim=(1, 2)).double()

    def gram_with(self, other: torch.Tensor) -> torch.Tensor:
        """Gram of ``[s_1..s_k, other]`` (only the rows of ``other`` at ``ids`` matter for b; the
        last entry is the full ``||other||^2``)."""
        rows = other.index_select(0, self.ids).to(self.M.dtype).unsqueeze(0)
        full = row_gram(torch.cat([self.M, rows], dim=0).reshape(self.k + 1, -1))
        full[self.k, self.k] = torch.linalg.vector_norm(other, dtype=torch.float64) ** 2
        self._gram = full[: self.k, : self.k]
        return full

    def combine(self, gamma: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dense (num_embeddings, d) ``sum_i gamma_i s_i`` (zero outside the rows ``ids``)."""
        rows = torch.einsum("i,itd->td", gamma.to(self.M.dtype), self.M)
        result = rows.new_zeros(self.shape) if out is None else out.zero_()
        return result.index_copy_(0, self.ids, rows)
