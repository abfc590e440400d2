"""The sequence gradients of a linear layer's weight ``y = a W^T``: ``s_i = Delta_i^T A_i``.

Three forms, one protocol (`gradproj.linalg.sequence_grads.SequenceGradients`):
`MaterializedLinearGrads` holds the k matrices (one batched matmul);
`GhostLinearGrads` keeps the token-level factors and works through N x N Gram matrices;
`BlockedLinearGrads` materialises a block of rows at a time, for a layer far larger than
the others. `choose_linear_form` picks between the first two by cost,
`linear_weight_grads` builds the chosen one (blocked from the workspace's ``block_numel``).
"""

from __future__ import annotations

import torch

from gradproj.linalg.sequence_grads import MaterializedGrads, TokenFactors, Workspace, augmented_gram, row_gram

__all__ = [
    "LinearFactors",
    "GhostLinearGrads",
    "MaterializedLinearGrads",
    "BlockedLinearGrads",
    "choose_linear_form",
    "linear_weight_grads",
]


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
    microbatch than `MaterializedLinearGrads`; memory: one block instead of k+1 layers.
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
