"""Layer handlers for elementwise-affine normalisation layers: ``nn.LayerNorm``, and every other
norm recognised by what it computes (RMSNorms with ``weight`` or Gemma's ``1 + weight``, with or
without bias; custom layer norms): `gradproj.capture.norm_probe`.

The module's normalisation runs as ordinary autograd code; only the affine step
``y = xhat * (offset + weight) + bias`` is captured (`gradproj.capture.captured_call`), its
backward handing ``(xhat, dy)`` to the engine. The sequence gradients are ``s_i = sum_{u in i} dy_u * xhat_u`` (weight)
and ``sum_{u in i} dy_u`` (bias): k x d, so they take the batched path for small tensors.

Numerics follow the Hugging Face forwards exactly for float32/bf16/fp16 inputs. For float64 inputs
the normalisation stays in float64 (HF rounds through float32 there), which keeps float64
brute-force checks exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradproj.capture.captured_call import CapturedCall, CapturedOp, captures
from gradproj.capture.forwards import install_forward, runs_class_forward
from gradproj.capture.handlers import LayerHandler, compute_dtype
from gradproj.capture.norm_probe import NormForm, normalise, recognise_norm
from gradproj.capture.probe import ProbedForms
from gradproj.linalg.sequence_grads import TokenSumGrads
from gradproj.plugins.hookspecs import hookimpl

__all__ = ["LayerNormHandler", "StructuralNormHandler"]


class _AffineOp(CapturedOp):
    """``y = (xhat * (offset + weight) + bias).to(out_dtype)``; the engine gets ``(xhat, dy)``.

    Args (of a call): ``xhat``, ``out_dtype`` (``None``: xhat's), then ``weight`` and ``bias``."""

    n_inputs, n_params = 2, 2

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def _scale(self, weight, dtype):
        return weight.to(dtype) + self.offset if self.offset else weight.to(dtype)

    def forward(self, xhat, out_dtype, weight, bias):
        out = xhat * self._scale(weight, xhat.dtype)
        if bias is not None:
            out = out + bias.to(xhat.dtype)
        return (out if out_dtype is None else out.to(out_dtype)), (xhat, weight), None

    def input_grads(self, meta, saved, grad_out, needs):
        xhat, weight = saved
        return (grad_out.to(xhat.dtype) * self._scale(weight, xhat.dtype) if needs[0] else None, None)

    def param_grads(self, meta, saved, grad_out, needs):
        xhat = saved[0]
        grad = grad_out.to(xhat.dtype)
        dims = tuple(range(grad.dim() - 1))
        return ((grad * xhat).sum(dim=dims) if needs[0] else None, grad.sum(dim=dims) if needs[1] else None)

    def use(self, meta, saved, grad_out):
        xhat = saved[0]
        return (xhat, grad_out.to(xhat.dtype))


class _AffineHandler(LayerHandler):
    """Shared capture logic; subclasses say how to normalise and which offset/dtypes apply."""

    parameter_names: tuple[str, ...] = ("weight", "bias")
    supports_slots = True
    provides_tokens = True
    offset = 0.0

    def normalise(self, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype | None]:
        """``(xhat, out_dtype)``: the normalised input the affine step scales, and the output dtype."""
        raise NotImplementedError

    def accepts(self, module: nn.Module) -> bool:
        """Only modules running their class's own forward (no instance override)."""
        return runs_class_forward(module) and type(module) in self.module_types

    def install(self, module: nn.Module, layer) -> Callable[[], None]:
        """Route the affine step through the captured affine op while gradproj captures."""
        original = type(module).forward
        op = _AffineOp(self.offset)

        def forward(x):
            weight, bias = module.weight, getattr(module, "bias", None)
            if captures(layer, weight, bias):
                xhat, out_dtype = self.normalise(module, x)
                return CapturedCall.apply(op, layer, xhat, out_dtype, weight, bias)
            return original(module, x)

        return install_forward(module, forward)

    def sequence_gradients(self, layer, uses, layout, gram: str, workspace=None, slots=None) -> dict:
        """Per-sequence sums of ``dy * xhat`` (weight) and ``dy`` (bias)."""
        module = layer.module
        dtype = compute_dtype(module.weight.dtype)
        xs = [layout.rows(x, layer, "normalised inputs").to(dtype) for x, _ in uses]
        ds = [layout.rows(d, layer, "output gradients").to(dtype) for _, d in uses]
        x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)
        d = ds[0] if len(ds) == 1 else torch.cat(ds, dim=1)
        slots = slots or {}
        out = {}
        if module.weight.requires_grad:
            if "weight" in slots:
                torch.sum(d * x, dim=1, out=slots["weight"])
            else:
                out["weight"] = TokenSumGrads(d * x, d)
        bias = getattr(module, "bias", None)
        if bias is not None and bias.requires_grad:
            if "bias" in slots:
                torch.sum(d, dim=1, out=slots["bias"])
            else:
                out["bias"] = TokenSumGrads(d)
        return out


class LayerNormHandler(_AffineHandler):
    """``torch.nn.LayerNorm`` with an elementwise affine (weight, bias)."""

    module_types: tuple[type, ...] = (nn.LayerNorm,)

    def accepts(self, module: nn.Module) -> bool:
        """LayerNorms with an affine that run ``nn.LayerNorm.forward``."""
        return super().accepts(module) and bool(module.elementwise_affine)

    def normalise(self, module, x):
        """``layer_norm`` without affine, in the input dtype."""
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps), None


class StructuralNormHandler(_AffineHandler):
    """Any other elementwise-affine norm -- the RMSNorms of Llama, Qwen, Mistral, Phi3, Gemma,
    OLMo2, gpt-oss, ..., with or without bias, and custom layer norms -- recognised by what it
    computes (`gradproj.capture.norm_probe.recognise_norm`), not by its class name.

    A structural handler: it is asked only about modules no type-specific handler covers, and
    accepts those whose forward reproduces a known form on a probe input."""

    module_types: tuple[type, ...] = ()
    structural = True

    def __init__(self) -> None:
        #: the module's recognised form (probed once per module), or ``None``
        self.form: ProbedForms[NormForm | None] = ProbedForms(recognise_norm)

    def accepts(self, module: nn.Module) -> bool:
        """Modules whose forward is a recognised elementwise-affine norm."""
        return self.form(module) is not None

    def install(self, module: nn.Module, layer) -> Callable[[], None]:
        """Run the module's normalisation as it does, and its affine step captured."""
        form = self.form(module)
        assert form is not None  # (accepted)
        op = _AffineOp(form.offset)
        original = type(module).forward

        def forward(x):
            weight, bias = module.weight, getattr(module, "bias", None)
            if not captures(layer, weight, bias):
                return original(module, x)
            eps = getattr(module, form.eps)  # (read at each call, as the module's own forward does)
            if form.round_first:
                xhat, out_dtype = normalise(form.kind, x, eps).to(x.dtype), None
            else:
                xhat, out_dtype = normalise(form.kind, x, eps), x.dtype
            return CapturedCall.apply(op, layer, xhat, out_dtype, weight, bias)

        return install_forward(module, forward)


@hookimpl
def gradproj_layer_handlers():
    """Register ``nn.LayerNorm`` and the structural handler for every other elementwise-affine norm."""
    handlers: list[LayerHandler] = [LayerNormHandler(), StructuralNormHandler()]
    return handlers
