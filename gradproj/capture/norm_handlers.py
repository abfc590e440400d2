"""Layer handlers for elementwise-affine normalisation layers: ``nn.LayerNorm`` and the RMSNorm
classes of Llama, Qwen2, Qwen3 and Gemma3 (Gemma's ``1 + weight`` form).

The module's normalisation runs as ordinary autograd code; only the affine step
``y = xhat * (offset + weight) + bias`` is captured (:mod:`gradproj.capture.captured_call`), its
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
from gradproj.linalg.sequence_grads import TokenSumGrads
from gradproj.plugins.hookspecs import hookimpl

__all__ = ["LayerNormHandler", "RMSNormHandler", "GemmaRMSNormHandler"]


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


def _rms_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    return work * torch.rsqrt(work.pow(2).mean(-1, keepdim=True) + eps)


class RMSNormHandler(_AffineHandler):
    """Llama/Qwen2/Qwen3 RMSNorm: ``weight * normalise(x in fp32).to(input dtype)``."""

    parameter_names = ("weight",)

    def __init__(self, module_types: tuple[type, ...]) -> None:
        self.module_types = module_types

    def normalise(self, module, x):
        """fp32 (fp64 for fp64 inputs) RMS normalisation, cast back to the input dtype."""
        return _rms_normalise(x, module.variance_epsilon).to(x.dtype), None


class GemmaRMSNormHandler(_AffineHandler):
    """Gemma3 RMSNorm: ``(normalise(x in fp32) * (1 + weight)).to(input dtype)``."""

    parameter_names = ("weight",)
    offset = 1.0

    def __init__(self, module_types: tuple[type, ...]) -> None:
        self.module_types = module_types

    def normalise(self, module, x):
        """fp32 (fp64 for fp64 inputs) RMS normalisation; the output is cast to the input dtype."""
        return _rms_normalise(x, module.eps), x.dtype


def _transformers_classes(paths: list[tuple[str, str]]) -> tuple[type, ...]:
    import importlib

    found = []
    for module_name, cls_name in paths:
        try:
            found.append(getattr(importlib.import_module(module_name), cls_name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


@hookimpl
def gradproj_layer_handlers():
    """Register LayerNorm and, when transformers is installed, the HF RMSNorm classes."""
    handlers: list[LayerHandler] = [LayerNormHandler()]
    rms = _transformers_classes([
        ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
        ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"),
        ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm"),
    ])
    if rms:
        handlers.append(RMSNormHandler(rms))
    gemma = _transformers_classes([("transformers.models.gemma3.modeling_gemma3", "Gemma3RMSNorm")])
    if gemma:
        handlers.append(GemmaRMSNormHandler(gemma))
    return handlers
