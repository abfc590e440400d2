"""Layer handler for ``torch.nn.Embedding`` (dense gradients, ``padding_idx`` honoured).

Its backward hands ``(ids, dy)`` to the engine; the sequence gradients are built as
:class:`gradproj.linalg.embedding_grads.EmbeddingGrads` (per distinct token id).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradproj.capture.captured_call import CapturedCall, CapturedOp, captures
from gradproj.capture.forwards import install_forward, runs_class_forward
from gradproj.capture.handlers import LayerHandler, compute_dtype
from gradproj.linalg.embedding_grads import EmbeddingGrads
from gradproj.plugins.hookspecs import hookimpl

__all__ = ["EmbeddingHandler"]


class _EmbeddingOp(CapturedOp):
    """``F.embedding``; the engine gets ``(ids, dy)`` per use. Args: ``ids``, ``padding_idx``, ``weight``."""

    n_inputs, n_params = 2, 1

    def forward(self, ids, padding_idx, weight):
        return F.embedding(ids, weight, padding_idx), (ids,), (padding_idx, weight.shape[0])

    def input_grads(self, meta, saved, grad_out, needs):
        return (None, None)

    def param_grads(self, meta, saved, grad_out, needs):
        if not needs[0]:
            return (None,)
        padding_idx, num_embeddings = meta
        flat_ids = saved[0].reshape(-1)
        flat = grad_out.reshape(-1, grad_out.shape[-1])
        if padding_idx is not None:
            flat = flat * (flat_ids != padding_idx).unsqueeze(-1).to(flat.dtype)
        return (flat.new_zeros(num_embeddings, flat.shape[-1]).index_add_(0, flat_ids, flat),)

    def use(self, meta, saved, grad_out):
        return (saved[0], grad_out)


_EMBEDDING = _EmbeddingOp()


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
        """Route lookups through the captured embedding op while gradproj captures."""
        original = type(module).forward
        scaled = type(module) in self.scaled_types

        def forward(input):
            if captures(layer, module.weight):
                out = CapturedCall.apply(_EMBEDDING, layer, input, module.padding_idx, module.weight)
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
