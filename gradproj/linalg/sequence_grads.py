"""The sequence gradients ``s_1..s_k`` of one parameter tensor in one microbatch.

Strategies never see the ``s_i`` directly; they use three operations that every representation
provides (SPEC section 1):

* ``gram()``      -- ``K_ij = <s_i, s_j>``                (k x k, float64)
* ``inner(G)``    -- ``b_i = <s_i, G>``                   (k, float64)
* ``combine(g)``  -- ``sum_i g_i s_i``                    (a tensor shaped like the parameter)

This module holds the protocol, the generic representations (`MaterializedGrads`:
the k tensors themselves; `TokenSumGrads`: sums over each sequence's tokens, for biases
and norms), token-level factors and the shared workspace. The forms of a linear layer's weight
live in `gradproj.linalg.linear_grads`, an embedding table's in
`gradproj.linalg.embedding_grads`, a tied parameter's sum in `gradproj.linalg.sum_grads`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = [
    "SequenceGradients",
    "MaterializedGrads",
    "TokenFactors",
    "IndexTokenFactors",
    "dense_token_factors",
    "TokenSumGrads",
    "Workspace",
    "row_gram",
]


class SequenceGradients(Protocol):
    """What a strategy may ask of the sequence gradients of one parameter tensor."""

    k: int
    shape: torch.Size

    def gram(self) -> torch.Tensor:
        """``K_ij = <s_i, s_j>`` as a float64 (k, k) tensor."""

    def inner(self, other: torch.Tensor) -> torch.Tensor:
        """``b_i = <s_i, other>`` as a float64 (k,) tensor; ``other`` is shaped like the parameter."""

    def combine(self, gamma: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_i gamma_i s_i``, shaped like the parameter, in the compute dtype (into ``out``)."""

    def gram_with(self, other: torch.Tensor) -> torch.Tensor:
        """The (k+1) x (k+1) float64 Gram of ``[s_1, ..., s_k, other]``: K, b and ``||other||^2`` at once."""


@dataclass
class TokenFactors:
    """Token-level factors of one parameter tensor's gradient in one microbatch (padded layout).

    For a matrix parameter, token u contributes ``outer(rows[u], cols[u])`` and
    ``s_i = sum_{u in i} outer(rows[u], cols[u])``; for a vector parameter (``cols is None``) it
    contributes ``rows[u]``. ``out_grads`` is the factor holding the layer's output gradients: its
    all-zero positions (padding, tokens that influence no log-prob) carry no gradient and are
    dropped by strategies that look at token subspaces.

    Attributes:
        rows: (k, T, p) factor on the parameter's first axis (or its per-token gradient rows).
        cols: (k, T, q) factor on the second axis, or ``None`` for a vector parameter.
        out_grads: (k, T, *) the output-gradient factor (one of the above, or its own tensor).
    """

    rows: torch.Tensor
    cols: torch.Tensor | None
    out_grads: torch.Tensor


@dataclass
class IndexTokenFactors:
    """Token factors of an embedding table: token u contributes ``outer(e_{ids[u]}, cols[u])``.

    Attributes:
        ids: (N,) row index of each token (its one-hot row factor, never materialised).
        cols: (N, d) the output gradients of the lookups (zero rows: no gradient, e.g. padding_idx).
        num_rows: number of rows of the table.
    """

    ids: torch.Tensor
    cols: torch.Tensor
    num_rows: int

    def dense(self):
        """``(rows (N, num_rows) one-hot, cols (N, d), keep (N, 1))`` -- materialised (tied weights)."""
        rows = torch.zeros(self.ids.numel(), self.num_rows, dtype=self.cols.dtype, device=self.cols.device)
        rows[torch.arange(self.ids.numel(), device=self.ids.device), self.ids] = 1.0
        return rows, self.cols, (self.cols != 0).any(dim=1, keepdim=True)


def dense_token_factors(factors):
    """``(rows (N, p), cols (N, q) or None, keep (N, 1))`` of `TokenFactors` or
    `IndexTokenFactors`; a list of them (pieces of a tied parameter) is concatenated."""
    if isinstance(factors, list):
        parts = [dense_token_factors(f) for f in factors]
        if any(cols is None for _, cols, _ in parts):
            raise ValueError("tied pieces must all be matrix factors")
        return (torch.cat([r for r, _, _ in parts]), torch.cat([c for _, c, _ in parts]), torch.cat([k for _, _, k in parts]))
    if isinstance(factors, IndexTokenFactors):
        return factors.dense()
    k, t = factors.rows.shape[:2]
    rows = factors.rows.reshape(k * t, -1)
    cols = None if factors.cols is None else factors.cols.reshape(k * t, -1)
    keep = (factors.out_grads.reshape(k * t, -1) != 0).any(dim=1, keepdim=True)
    return rows, cols, keep


def augmented_gram(seq, other: torch.Tensor) -> torch.Tensor:
    """Default `SequenceGradients.gram_with` from ``gram`` and ``inner``."""
    k = seq.k
    out = torch.empty(k + 1, k + 1, dtype=torch.float64, device=other.device)
    out[:k, :k] = seq.gram()
    b = seq.inner(other)
    out[:k, k] = b
    out[k, :k] = b
    out[k, k] = torch.linalg.vector_norm(other, dtype=torch.float64) ** 2
    return out


#: row chunk of `row_gram` (1024 measured 4-7 ms per step faster than 4096 with every Linear
#: trainable at the benchmark's shape: shorter chunks stay in cache)
_GRAM_CHUNK = 1024


class Workspace:
    """A reusable scratch buffer per (dtype, device) for materialised sequence gradients.

    Materialising ``S`` (k x |W| floats) into fresh memory for every layer of every microbatch
    costs more in page faults than the matmul itself; one buffer, grown to the largest layer and
    reused, removes that. A buffer handed out is valid until the next `take`.
    """

    def __init__(self, block_numel: int | None = None) -> None:
        self._buffers: dict = {}
        #: linear weights with more than twice this many elements are materialised a block of
        #: about this many elements at a time (`BlockedLinearGrads`); ``None``: never
        self.block_numel = block_numel

    def take(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` backed by the shared buffer."""
        numel = 1
        for n in shape:
            numel *= n
        key = (dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)

    def clear(self) -> None:
        """Release the buffers."""
        self._buffers.clear()


def row_gram(flat: torch.Tensor) -> torch.Tensor:
    """``flat @ flat.T`` for a short, very wide (k, D) matrix, as float64.

    BLAS handles the (k x D)(D x k) shape poorly (and sums D products in one long chain); viewing
    the rows as chunks of `_GRAM_CHUNK` and summing a batched product is 2.5-5.7x faster on CPU
    (9 rows of 65k and 352k) and more accurate.
    """
    k, width = flat.shape
    chunks = width // _GRAM_CHUNK
    if chunks < 2:
        return (flat @ flat.T).double()
    head = flat[:, : chunks * _GRAM_CHUNK].view(k, chunks, _GRAM_CHUNK).transpose(0, 1)
    gram = torch.bmm(head, head.transpose(1, 2)).sum(dim=0)
    if chunks * _GRAM_CHUNK < width:
        tail = flat[:, chunks * _GRAM_CHUNK :]
        gram = gram + tail @ tail.T
    return gram.double()


class MaterializedGrads:
    """Sequence gradients stored explicitly as a (k, *shape) tensor.

    Args:
        stacked: tensor of shape ``(k, *param_shape)``; row i is ``s_i``.
    """

    def __init__(self, stacked: torch.Tensor) -> None:
        self.k = stacked.shape[0]
        self.shape = stacked.shape[1:]
        self._flat = stacked.reshape(self.k, -1)
        self._gram: torch.Tensor | None = None

    def gram(self) -> torch.Tensor:
        """``K = S S^T`` (computed once, cached)."""
        if self._gram is None:
            self._gram = row_gram(self._flat)
        return self._gram

    def inner(self, other: torch.Tensor) -> torch.Tensor:
        """``S vec(other)``."""
        return (self._flat @ other.reshape(-1).to(self._flat.dtype)).double()

    def gram_with(self, other: torch.Tensor) -> torch.Tensor:
        """Gram of ``[S; other]``."""
        return augmented_gram(self, other)

    def combine(self, gamma: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``gamma^T S`` reshaped to the parameter's shape (written into ``out`` if given)."""
        gamma = gamma.to(self._flat.dtype)
        if out is None:
            return (gamma @ self._flat).reshape(self.shape)
        torch.mv(self._flat.T, gamma, out=out.view(-1))
        return out


class TokenSumGrads(MaterializedGrads):
    """Sequence gradients that are per-sequence sums of per-token gradient rows (bias, norm weight).

    Args:
        tokens: (k, T, *shape) per-token gradients; ``s_i = tokens[i].sum(0)``.
        out_grads: (k, T, d) the layer's output gradients at those positions (default: ``tokens``).
    """

    def __init__(self, tokens: torch.Tensor, out_grads: torch.Tensor | None = None) -> None:
        super().__init__(tokens.sum(dim=1))
        self._tokens = tokens
        self._out_grads = tokens if out_grads is None else out_grads

    def token_factors(self) -> TokenFactors:
        """The per-token rows (a vector parameter's factors)."""
        k, t = self._tokens.shape[:2]
        return TokenFactors(self._tokens.reshape(k, t, -1), None, self._out_grads)
