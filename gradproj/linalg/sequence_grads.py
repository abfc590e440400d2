"""The sequence gradients ``s_1..s_k`` of one parameter tensor in one microbatch.

Strategies never see the ``s_i`` directly; they use three operations that every representation
provides (SPEC section 1):

* ``gram()``      -- ``K_ij = <s_i, s_j>``                (k x k, float64)
* ``inner(G)``    -- ``b_i = <s_i, G>``                   (k, float64)
* ``combine(g)``  -- ``sum_i g_i s_i``                    (a tensor shaped like the parameter)

Two representations exist for a linear layer ``y = a W^T``: :class:`MaterializedGrads` holds the
k matrices ``s_i = Delta_i^T A_i`` (one batched matmul), :class:`GhostLinearGrads` keeps the
token-level factors and works through N x N Gram matrices. :func:`choose_linear_form` picks the
cheaper one per layer. :class:`BlockedLinearGrads` materialises a block of rows at a time, for a
layer far larger than the others (:func:`linear_weight_grads` picks it from the workspace's
``block_numel``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = [
    "SequenceGradients",
    "MaterializedGrads",
    "GhostLinearGrads",
    "BlockedLinearGrads",
    "TokenFactors",
    "IndexTokenFactors",
    "dense_token_factors",
    "TokenSumGrads",
    "Workspace",
    "choose_linear_form",
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
    """``(rows (N, p), cols (N, q) or None, keep (N, 1))`` of :class:`TokenFactors` or
    :class:`IndexTokenFactors`; a list of them (pieces of a tied parameter) is concatenated."""
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
    """Default :meth:`SequenceGradients.gram_with` from ``gram`` and ``inner``."""
    k = seq.k
    out = torch.empty(k + 1, k + 1, dtype=torch.float64, device=other.device)
    out[:k, :k] = seq.gram()
    b = seq.inner(other)
    out[:k, k] = b
    out[k, :k] = b
    out[k, k] = torch.linalg.vector_norm(other, dtype=torch.float64) ** 2
    return out


#: row chunk of :func:`row_gram` (1024 measured 4-7 ms per step faster than 4096 with every Linear
#: trainable at the benchmark's shape: shorter chunks stay in cache)
_GRAM_CHUNK = 1024


class Workspace:
    """A reusable scratch buffer per (dtype, device) for materialised sequence gradients.

    Materialising ``S`` (k x |W| floats) into fresh memory for every layer of every microbatch
    costs more in page faults than the matmul itself; one buffer, grown to the largest layer and
    reused, removes that. A buffer handed out is valid until the next :meth:`take`.
    """

    def __init__(self, block_numel: int | None = None) -> None:
        self._buffers: dict = {}
        #: linear weights with more than twice this many elements are materialised a block of
        #: about this many elements at a time (:class:`BlockedLinearGrads`); ``None``: never
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
    the rows as chunks of :data:`_GRAM_CHUNK` and summing a batched product is 2.5-5.7x faster on CPU
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


class LinearFactors:
    """Token-level factors of a linear layer's weight gradient in padded layout.

    ``A`` is (k, T, d_in) (layer inputs), ``D`` is (k, T, d_out) (unweighted output gradients);
    row i holds the T positions of sequence i, so ``s_i = D_i^T A_i``.
    """

    def __init__(self, inputs: torch.Tensor, out_grads: torch.Tensor) -> None:
        self.A = inputs
        self.D = out_grads
        self.k = inputs.shape[0]
        self.shape = torch.Size((out_grads.shape[-1], inputs.shape[-1]))

    def weighted_sum(self, gamma: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_i gamma_i s_i = D^T diag(gamma_seq(u)) A`` as one matmul (no s_i built)."""
        d_out, d_in = self.shape
        scale = gamma.to(self.D.dtype).view(-1, 1, 1)
        if d_in < d_out:  # scale whichever factor is smaller
            left, right = self.D.reshape(-1, d_out), (self.A * scale).reshape(-1, d_in)
        else:
            left, right = (self.D * scale).reshape(-1, d_out), self.A.reshape(-1, d_in)
        return torch.mm(left.T, right, out=out)

    #: which factor holds the output gradients: "D" (nn.Linear) or "A" (transposed storage, Conv1D)
    out_side = "D"

    def token_factors(self) -> TokenFactors:
        """The (D, A) factors: ``s_i = sum_u outer(D_u, A_u)``."""
        return TokenFactors(self.D, self.A, self.D if self.out_side == "D" else self.A)


def _linear_rows(factors, ids: torch.Tensor) -> torch.Tensor:
    """(k, len(ids), d_in): the rows ``ids`` of every ``s_j = D_j^T A_j`` without building s_j."""
    return torch.bmm(factors.D.index_select(2, ids).transpose(1, 2), factors.A)


class GhostLinearGrads(LinearFactors):
    """Linear-layer sequence gradients in the "ghost" Gram form: no ``s_i`` is ever built.

    ``<s_i, s_j> = sum_{u in i, v in j} (delta_u . delta_v)(a_u . a_v)`` and
    ``<s_i, G> = sum_{u in i} delta_u^T G a_u``. Cheaper than materialising when the layer is
    large and the microbatch holds few tokens (e.g. an lm_head).
    """

    def __init__(self, inputs: torch.Tensor, out_grads: torch.Tensor) -> None:
        super().__init__(inputs, out_grads)
        self._gram: torch.Tensor | None = None

    def gram(self) -> torch.Tensor:
        """Block sums of ``(D D^T) * (A A^T)`` over the N x N token Gram."""
        if self._gram is None:
            k, t = self.A.shape[0], self.A.shape[1]
            a = self.A.reshape(k * t, -1)
            d = self.D.reshape(k * t, -1)
            tokens = (d @ d.T) * (a @ a.T)
            self._gram = tokens.view(k, t, k, t).sum(dim=(1, 3)).double()
        return self._gram

    def inner(self, other: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums of ``delta_u^T G a_u``."""
        projected = self.D @ other.to(self.D.dtype)  # (k, T, d_in)
        return (projected * self.A).sum(dim=(1, 2)).double()

    def gram_with(self, other: torch.Tensor) -> torch.Tensor:
        """Gram of ``[s_1..s_k, other]`` in the ghost form."""
        return augmented_gram(self, other)

    def combine(self, gamma: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``D^T diag(gamma) A``."""
        return self.weighted_sum(gamma, out)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows ``ids`` of each ``s_j`` (for tied-weight cross terms)."""
        return _linear_rows(self, ids)


class MaterializedLinearGrads(LinearFactors, MaterializedGrads):
    """Linear-layer sequence gradients, materialised lazily as ``S = bmm(D^T, A)``.

    ``combine`` before anything else asked for ``S`` uses the weighted matmul, so the first
    microbatch of a step (G = 0, nothing to project) costs exactly the plain weight gradient.
    """

    def __init__(self, inputs: torch.Tensor, out_grads: torch.Tensor, workspace: Workspace | None = None) -> None:
        LinearFactors.__init__(self, inputs, out_grads)
        self._flat_cache: torch.Tensor | None = None
        self._gram = None
        self._workspace = workspace

    @property
    def _flat(self) -> torch.Tensor:  # type: ignore[override]
        return self._materialize()

    def _materialize(self) -> torch.Tensor:
        """Fill ``_rows`` (k sequence gradients and a scratch row) once; the k gradient rows."""
        flat = self._flat_cache
        if flat is None:
            k, (d_out, d_in) = self.k, self.shape
            if self._workspace is None:
                rows = torch.empty(k + 1, d_out, d_in, dtype=self.A.dtype, device=self.A.device)
            else:
                rows = self._workspace.take((k + 1, d_out, d_in), self.A.dtype, self.A.device)
            torch.bmm(self.D.transpose(1, 2), self.A, out=rows[:k])
            self._rows = rows.view(k + 1, -1)  # row k is scratch for gram_with
            flat = self._flat_cache = self._rows[:k]
        return flat

    def gram_with(self, other: torch.Tensor) -> torch.Tensor:
        """Gram of ``[S; other]`` in one pass over S (``other`` copied into a spare row)."""
        self._materialize()
        self._rows[self.k].copy_(other.reshape(-1))
        full = row_gram(self._rows)
        self._gram = full[: self.k, : self.k]
        return full

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows ``ids`` of each ``s_j`` (for tied-weight cross terms)."""
        return _linear_rows(self, ids)

    def combine(self, gamma: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``gamma^T S`` if S exists, else the weighted matmul (same result, no S)."""
        if self._flat_cache is None:
            return self.weighted_sum(gamma, out)
        return MaterializedGrads.combine(self, gamma, out)


class BlockedLinearGrads(LinearFactors):
    """Materialised sequence gradients of a large linear layer, one block of rows at a time.

    For a layer far larger than every other (a large vocabulary's lm_head), k+1 copies of the
    weight would set gradproj's peak memory. Here ``gram``/``gram_with`` build ``S`` a block of the
    weight's rows at a time in the workspace (k+1 x ``block_rows`` x d_in) and sum the float64 block
    Grams; ``inner`` and ``combine`` work from the factors (``sum_u delta_u^T G a_u`` and
    ``D^T diag(gamma) A``), never building ``S``. Cost: one matmul of the layer's size more per
    microbatch than :class:`MaterializedLinearGrads`; memory: one block instead of k+1 layers.
    """

    def __init__(self, inputs: torch.Tensor, out_grads: torch.Tensor, workspace: Workspace | None, block_rows: int) -> None:
        super().__init__(inputs, out_grads)
        self._workspace = workspace
        self.block_rows = max(1, int(block_rows))
        self._gram: torch.Tensor | None = None

    def _block_gram(self, other: torch.Tensor | None) -> torch.Tensor:
        k, (d_out, d_in) = self.k, self.shape
        extra = 0 if other is None else 1
        total = torch.zeros(k + extra, k + extra, dtype=torch.float64, device=self.A.device)
        for start in range(0, d_out, self.block_rows):
            stop = min(d_out, start + self.block_rows)
            shape = (k + extra, stop - start, d_in)
            if self._workspace is None:
                rows = torch.empty(shape, dtype=self.A.dtype, device=self.A.device)
            else:
                rows = self._workspace.take(shape, self.A.dtype, self.A.device)
            torch.bmm(self.D[:, :, start:stop].transpose(1, 2), self.A, out=rows[:k])
            if other is not None:
                rows[k].copy_(other[start:stop])
            total += row_gram(rows.view(k + extra, -1))
        return total

    def gram(self) -> torch.Tensor:
        """``K = S S^T``, summed over blocks of rows (computed once, cached)."""
        if self._gram is None:
            self._gram = self._block_gram(None)
        return self._gram

    def inner(self, other: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums of ``delta_u^T G a_u`` (one matmul, no ``S``)."""
        projected = self.D @ other.to(self.D.dtype)  # (k, T, d_in)
        return (projected * self.A).sum(dim=(1, 2)).double()

    def gram_with(self, other: torch.Tensor) -> torch.Tensor:
        """Gram of ``[S; other]``: one blocked pass, or the cached K plus ``inner``."""
        if self._gram is not None:
            return augmented_gram(self, other)
        full = self._block_gram(other.reshape(self.shape).to(self.A.dtype))
        self._gram = full[: self.k, : self.k]
        return full

    def combine(self, gamma: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``D^T diag(gamma) A``."""
        return self.weighted_sum(gamma, out)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows ``ids`` of each ``s_j`` (for tied-weight cross terms)."""
        return _linear_rows(self, ids)


def choose_linear_form(k: int, tokens: int, d_in: int, d_out: int, mode: str = "auto") -> str:
    """Pick ``"materialize"`` or ``"ghost"`` for a linear layer (SPEC section 1 cost rule).

    Materialise when ``k * d_out * d_in`` is not larger than ``N^2 (d_in + d_out)``, N the
    number of token positions of the microbatch; ``mode`` other than ``"auto"`` forces a form.
    """
    if mode != "auto":
        return mode
    return "materialize" if k * d_out * d_in <= tokens * tokens * (d_in + d_out) else "ghost"


def linear_weight_grads(inputs: torch.Tensor, out_grads: torch.Tensor, mode: str = "auto", workspace: Workspace | None = None):
    """Sequence gradients of a linear weight from padded (k, T, d) inputs and output grads."""
    k, t = inputs.shape[0], inputs.shape[1]
    form = choose_linear_form(k, k * t, inputs.shape[-1], out_grads.shape[-1], mode)
    if form == "ghost":
        return GhostLinearGrads(inputs, out_grads)
    block = None if workspace is None else workspace.block_numel
    numel = inputs.shape[-1] * out_grads.shape[-1]
    if mode == "auto" and block is not None and numel > 2 * block:
        return BlockedLinearGrads(inputs, out_grads, workspace, max(1, block // inputs.shape[-1]))
    return MaterializedLinearGrads(inputs, out_grads, workspace)
