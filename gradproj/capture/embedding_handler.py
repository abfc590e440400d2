"""Layer handler for ``torch.nn.Embedding`` (dense gradients, ``padding_idx`` honoured).

Its backward hands ``(ids, dy)`` to the engine; the sequence gradients are built as
`gradproj.linalg.embedding_grads.EmbeddingGrads` (per distinct token id).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradproj.capture.captured_call import CapturedCall, CapturedOp, captures
from gradproj.capture.forwards import install_forward, runs_class_forward
from gradproj.capture.handlers import LayerHandler, compute_dtype
from gradproj.capture.probe import ProbedForms, class_forward_on
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
    """``torch.nn.Embedding`` with dense gradients, and subclasses whose own forward is verified on a
    probe to compute ``embedding(ids)`` or ``embedding(ids) * module.embed_scale`` (the scaled word
    embeddings of Gemma2, Gemma3, ...). ``sparse``, ``max_norm`` and ``scale_grad_by_freq`` are not
    supported: such modules stay uncovered."""

    module_types = (nn.Embedding,)
    parameter_names = ("weight",)
    provides_tokens = True

    def __init__(self) -> None:
        #: ``"plain"``, ``"scaled"`` or ``None`` (not a lookup gradproj can capture), probed once per module
        self.form: ProbedForms[str | None] = ProbedForms(_embedding_form)

    def accepts(self, module: nn.Module) -> bool:
        """Dense embeddings computing a plain or scaled lookup."""
        return (
            runs_class_forward(module)
            and not module.sparse
            and module.max_norm is None
            and not module.scale_grad_by_freq
            and self.form(module) is not None
        )

    def install(self, module: nn.Module, layer) -> Callable[[], None]:
        """Route lookups through the captured embedding op while gradproj captures."""
        original = type(module).forward
        scaled = self.form(module) == "scaled"

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


def _embedding_form(module: nn.Module) -> str | None:
    """``"plain"`` for ``nn.Embedding.forward``; for a subclass's own forward, what a float64 probe
    shows it computes: ``"plain"``, ``"scaled"`` (times ``module.embed_scale``) or ``None``."""
    if type(module).forward is nn.Embedding.forward:
        return "plain"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    generator = torch.Generator().manual_seed(0)
    n, d = weight.shape
    ids = torch.randint(0, n, (2, 3), generator=generator)
    w = torch.randn(n, d, generator=generator, dtype=torch.float64)
    out = class_forward_on(module, {"weight": w}, ids)
    if not isinstance(out, torch.Tensor) or out.shape != (2, 3, d):
        return None
    plain = F.embedding(ids, w, getattr(module, "padding_idx", None))
    if torch.allclose(out, plain, rtol=1e-12, atol=0.0):
        return "plain"
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, torch.Tensor) and torch.allclose(out, plain * scale.to(torch.float64), rtol=1e-7, atol=0.0):
        return "scaled"
    return None


@hookimpl
def gradproj_layer_handlers():
    """Register the ``nn.Embedding`` handler."""
    return [EmbeddingHandler()]
