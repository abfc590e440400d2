"""The sequence gradients of a fused MoE expert parameter: one block per expert.

transformers 5 stores an MoE layer's experts as one 3-D parameter (``gate_up_proj`` of shape
(E, 2I, d), ``down_proj`` (E, d, I), biases (E, n)). Expert ``e``'s slice is an ordinary linear
weight (or bias) seen only by the tokens routed to ``e``, so the sequence gradient is block-wise:
``s_i[e] = sum over sequence i's tokens routed to e`` of that token's gradient, and

* ``<s_i, s_j> = sum_e <s_i[e], s_j[e]>``, ``<s_i, G> = sum_e <s_i[e], G[e]>``,
* ``sum_i g_i s_i`` is built expert by expert.

`ExpertStackGrads` composes the per-expert sequence gradients (any representation: a
linear weight's materialised or ghost form over that expert's tokens only, a bias's token sums); an
expert no token reached has none and contributes zeros. Nothing of size E x k x |slice| is built
unless each block's own cost rule materialises it. `rows_by_sequence` groups an expert's
tokens by sequence, padded to the longest group (not to the sequence length).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gradproj.linalg.sequence_grads import augmented_gram

__all__ = ["ExpertStackGrads", "ExpertTokenFactors", "rows_by_sequence", "index_counts"]


@dataclass
class ExpertTokenFactors:
    """Token factors of a parameter made of expert blocks: ``blocks[(e, factors_e)]`` -- each
    expert's block has the token factors of its own tokens
    (`gradproj.linalg.sequence_grads.TokenFactors`). Factored strategies (Intra-PROMA)
    project each block with its own tokens; ``by_expert(g)`` views a parameter-shaped ``g`` as
    (E, *block) -- for peft's ``lora_B`` of fused experts, a strided view."""

    blocks: list
    by_expert: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda g: g)


class ExpertStackGrads:
    """Sequence gradients of a parameter made of one block per expert, block ``e`` with its own
    sequence gradients ``blocks[e]`` (``None``: no token reached expert e, its block gets no gradient).

    Args:
        blocks (list): per expert, a `gradproj.linalg.sequence_grads.SequenceGradients` of the
            block's shape, or ``None``.
        k (int): the number of sequences.
        shape (tuple[int, ...]): the parameter's shape.
        dtype (torch.dtype): of the combined tensor.
        device (torch.device): of the combined tensor.
        block_shape (tuple[int, ...] | None): the shape of one block (default ``shape[1:]``).
        expert_axis (str): where the expert index sits when the parameter is viewed as blocks:
            ``"leading"`` -- ``(E, *block_shape)``, the fused expert tensors and peft's ``lora_A``
            of them, ``(E * r, in)``; ``"trailing"`` -- ``(*block_shape, E)``, peft's ``lora_B``
            of them, ``(out, r * E)`` with expert e in the columns ``j * E + e``.
    """

    def __init__(self, blocks: list, k: int, shape, dtype: torch.dtype, device: torch.device,
                 block_shape=None, expert_axis: str = "leading") -> None:
        self.blocks = blocks
        self.k = k
        self.shape = torch.Size(shape)
        self.block_shape = torch.Size(self.shape[1:] if block_shape is None else block_shape)
        self.expert_axis = expert_axis
        self.dtype, self.device = dtype, device
        self._gram: torch.Tensor | None = None

    def _present(self):
        return [(e, block) for e, block in enumerate(self.blocks) if block is not None]

    def _by_expert(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the parameter's shape) as (E, *block_shape) -- a view for leading experts."""
        experts = len(self.blocks)
        if self.expert_axis == "leading":
            return tensor.reshape(experts, *self.block_shape)
        return tensor.reshape(*self.block_shape, experts).movedim(-1, 0)

    def gram(self) -> torch.Tensor:
        """``sum_e K^(e)`` (computed once, cached)."""
        if self._gram is None:
            gram = torch.zeros(self.k, self.k, dtype=torch.float64, device=self.device)
            for _, block in self._present():
                gram += block.gram()
            self._gram = gram
        return self._gram

    def inner(self, other: torch.Tensor) -> torch.Tensor:
        """``sum_e <s_i[e], other[e]>``."""
        out = torch.zeros(self.k, dtype=torch.float64, device=self.device)
        parts = self._by_expert(other)
        for e, block in self._present():
            out += block.inner(parts[e])
        return out

    def gram_with(self, other: torch.Tensor) -> torch.Tensor:
        """Gram of ``[s_1, ..., s_k, other]``: the sum of the blocks' own augmented Grams (one pass
        over each block's sequence gradients with ``other``'s block, as each form does it best), plus
        ``||other[e]||^2`` of the blocks no token reached."""
        if self._gram is not None:
            return augmented_gram(self, other)
        k = self.k
        out = torch.zeros(k + 1, k + 1, dtype=torch.float64, device=self.device)
        parts = self._by_expert(other)
        reached = set()
        for e, block in self._present():
            out += block.gram_with(parts[e])
            reached.add(e)
        for e in range(len(self.blocks)):
            if e not in reached:
                out[k, k] += torch.linalg.vector_norm(parts[e], dtype=torch.float64) ** 2
        self._gram = out[:k, :k].clone()
        return out

    def combine(self, gamma: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_i gamma_i s_i``, expert by expert (zero blocks for experts without tokens)."""
        leading = self.expert_axis == "leading"
        if out is None:
            out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        else:
            out.zero_()
        stacked = self._by_expert(out) if leading else torch.zeros(
            len(self.blocks), *self.block_shape, dtype=out.dtype, device=out.device)
        for e, block in self._present():
            block.combine(gamma, out=stacked[e])
        if not leading:
            out.view(*self.block_shape, len(self.blocks)).copy_(stacked.movedim(0, -1))
        return out

    @property
    def token_factors(self):
        """Per-expert token factors (a method, like the other representations'), or ``None`` when
        some block's representation has none."""
        if any(getattr(block, "token_factors", None) is None for _, block in self._present()):
            return None
        return self._token_factors

    def _token_factors(self) -> ExpertTokenFactors:
        return ExpertTokenFactors([(e, block.token_factors()) for e, block in self._present()], self._by_expert)


def index_counts(index: torch.Tensor, size: int) -> torch.Tensor:
    """``torch.bincount(index, minlength=size)`` for ``index < size``, without the host read of the
    largest index that ``bincount`` makes on a GPU."""
    return torch.zeros(size, dtype=torch.int64, device=index.device).index_add_(0, index, torch.ones_like(index))


def rows_by_sequence(sequence: torch.Tensor, k: int, *tensors: torch.Tensor, width: int | None = None) -> list[torch.Tensor]:
    """Each of ``tensors`` (n, ...) -- rows belonging to sequences ``sequence`` (n,), non-decreasing
    or not -- as a zero-padded (k, C, ...) tensor, C the largest number of rows of one sequence
    (``width``, if the caller knows it: no host synchronisation here); rows of a sequence keep their
    order."""
    n = sequence.numel()
    counts = index_counts(sequence, k)
    if width is None:
        width = int(counts.max()) if n else 0
    order = torch.sort(sequence, stable=True).indices
    ordered = sequence[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = ordered * width + (torch.arange(n, device=sequence.device) - starts[ordered])
    out = []
    for tensor in tensors:
        padded = tensor.new_zeros((k * width, *tensor.shape[1:]))
        padded.index_copy_(0, slot, tensor.index_select(0, order))
        out.append(padded.view(k, width, *tensor.shape[1:]))
    return out
