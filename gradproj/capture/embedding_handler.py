"""Layer handler for ``torch.nn.Embedding`` (dense gradients, ``padding_idx`` honoured).

The sequence gradient of an embedding table is sparse: ``s_i = sum_{u in i} e_{id_u} delta_u^T``.
It is represented by ``M`` (k x U x d), U = the distinct token ids of the microbatch:
``M[i, t] = sum_{u in i, id_u = ids[t]} delta_u``. Then ``K = M M^T`` (flattened),
``<s_i, G> = sum_t <M[i, t], G[ids[t]]>`` and ``sum_i gamma_i s_i`` scatters ``gamma^T M`` into the
rows ``ids``. Positions holding ``padding_idx`` contribute nothing, as in ``nn.Embedding``'s backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradproj.capture.forwards import install_forward, runs_class_forward
from gradproj.capture.handlers import LayerHandler, compute_dtype
from gradproj.linalg.sequence_grads import IndexTokenFactors, row_gram
from gradproj.plugins.hookspecs import hookimpl

__all__ = ["EmbeddingHandler", "EmbeddingGrads"]


class _CapturedEmbedding(torch.autograd.Function):
    """``F.embedding`` whose backward hands (ids, dy) to the engine instead of a weight gradient."""

    @staticmethod
    def forward(ctx, ids, weight, layer, padding_idx):
        ctx.save_for_backward(ids)
        ctx.layer, ctx.padding_idx, ctx.num_embeddings = layer, padding_idx, weight.shape[0]
        layer.count_forward()
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        if ctx.layer.plain_backward():
            grad_w = None
            if ctx.needs_input_grad[1]:
                flat_ids = ids.reshape(-1)
                flat = grad_out.reshape(-1, grad_out.shape[-1])
                if ctx.padding_idx is not None:
                    flat = flat * (flat_ids != ctx.padding_idx).unsqueeze(-1).to(flat.dtype)
                grad_w = flat.new_zeros(ctx.num_embeddings, flat.shape[-1]).index_add_(0, flat_ids, flat)
            return None, grad_w, None, None
        ctx.layer.backward((ids, grad_out))
        return None, None, None, None


class EmbeddingGrads:
    """Sequence gradients of an embedding table in the per-distinct-token form (see module doc)."""

    def __init__(self, ids: torch.Tensor, grads: torch.Tensor, num_embeddings: int, padding_idx: int | None) -> None:
        k, d = ids.shape[0], grads.shape[-1]
        flat_ids = ids.reshape(-1)
        flat = grads.reshape(-1, d)
        if padding_idx is not None:
            flat = flat * (flat_ids != padding_idx).unsqueeze(-1).to(flat.dtype)
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


class EmbeddingHandler(LayerHandler):
    """``torch.nn.Embedding`` with dense gradients, and scaled-embedding subclasses whose forward is
    ``embedding(ids) * module.embed_scale`` (Gemma3's). ``sparse``, ``max_norm`` and
    ``scale_grad_by_freq`` are not supported: such modules stay uncovered."""

    module_types = (nn.Embedding,)
    parameter_names = ("weight",)
    provides_tokens = True

    def __init__(self, scaled_types: tuple[type, ...] = ()) -> None:
        self.scaled_types = scaled_types

    def accepts(self, module: nn.Module) -> bool:
        """Dense embeddings running ``nn.Embedding.forward`` or a known scaled forward."""
        known = type(module).forward is nn.Embedding.forward or type(module) in self.scaled_types
        return (
            known
            and runs_class_forward(module)
            and not module.sparse
            and module.max_norm is None
            and not module.scale_grad_by_freq
        )

    def install(self, module: nn.Module, layer) -> Callable[[], None]:
        """Route lookups through :class:`_CapturedEmbedding` while gradproj captures."""
        original = type(module).forward
        scaled = type(module) in self.scaled_types

        def forward(input):
            if layer.capturing and torch.is_grad_enabled() and module.weight.requires_grad:
                out = _CapturedEmbedding.apply(input, module.weight, layer, module.padding_idx)
                # the constant scale is outside the capture: autograd folds it into the output gradient
                return out * module.embed_scale.to(module.weight.dtype) if scaled else out
            return original(module, input)

        return install_forward(module, forward)

    def sequence_gradients(self, layer, uses, layout, gram: str, workspace=None, slots=None) -> dict:
        """The per-distinct-token representation over all uses of the microbatch."""
        module = layer.module
        if not module.weight.requires_grad:
            return {}
        dtype = compute_dtype(module.weight.dtype)
        ids = [layout.ids(token_ids, layer) for token_ids, _ in uses]
        grads = [layout.rows(dy, layer, "output gradients").to(dtype) for _, dy in uses]
        ids_all = ids[0] if len(ids) == 1 else torch.cat(ids, dim=1)
        grads_all = grads[0] if len(grads) == 1 else torch.cat(grads, dim=1)
        return {"weight": EmbeddingGrads(ids_all, grads_all, module.num_embeddings, module.padding_idx)}


@hookimpl
def gradproj_layer_handlers():
    """Register the ``nn.Embedding`` handler (with Gemma3's scaled embedding when transformers is installed)."""
    try:
        from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding
    except ImportError:
        return [EmbeddingHandler()]
    return [EmbeddingHandler((Gemma3TextScaledWordEmbedding,))]
