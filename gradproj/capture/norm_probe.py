"""Recognising an elementwise-affine normalisation layer by what it computes, not by its class name.

A module qualifies when its only direct parameters are a 1-D ``weight`` (and optionally a 1-D
``bias`` of the same size), it has a float epsilon attribute (``variance_epsilon``, ``eps`` or
``epsilon``), it runs its class's own forward, and that forward -- run on a stand-in of the module
holding random probe parameters, so the module itself and its hooks are untouched -- reproduces one
of the known forms on a random probe input (`gradproj.capture.probe.class_forward_on`):

* RMS normalisation: ``normalise(x) * (offset + weight) [+ bias]`` with ``offset`` 0 (Llama, Qwen,
  Mistral, Phi3, OLMo2, gpt-oss, ...) or 1 (Gemma);
* layer normalisation: ``layer_norm(x) * (offset + weight) [+ bias]``.

A second probe in bfloat16 tells where the module rounds back to the input dtype:
before the product with the weight (Llama's ``weight * xhat.to(dtype)``) or after it (OLMo2's,
gpt-oss's and Gemma's ``(weight * xhat).to(dtype)``), so the captured forward reproduces the
module's output bit for bit (for the HF RMSNorms; to the rounding for norms computing their
statistics differently). A module matching no form is not recognised: it stays uncovered, and
``wrap()`` names it in a ``CoverageError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradproj.capture.forwards import runs_class_forward
from gradproj.capture.probe import class_forward_on

__all__ = ["NormForm", "recognise_norm", "normalise", "rms", "EPS_ATTRIBUTES"]

EPS_ATTRIBUTES = ("variance_epsilon", "eps", "epsilon")


@dataclass(frozen=True)
class NormForm:
    """How a recognised norm computes ``y`` from ``x``.

    Attributes:
        kind: ``"rms"`` or ``"layer"``.
        offset: the weight's offset (``y = xhat * (offset + weight)``): 0, or 1 for Gemma.
        eps: the epsilon attribute's name.
        round_first: the normalised input (computed in float32) is rounded to the input dtype
            before the product (else the product runs in float32 and its result is rounded).
    """

    kind: str
    offset: float
    eps: str
    round_first: bool = True


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation in at least float32 (float64 stays float64)."""
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    return work * torch.rsqrt(work.pow(2).mean(-1, keepdim=True) + eps)


def _params(weight: torch.Tensor, bias: torch.Tensor | None) -> dict:
    return {"weight": weight} if bias is None else {"weight": weight, "bias": bias}


def _eps(module: nn.Module) -> str | None:
    for name in EPS_ATTRIBUTES:
        value = module.__dict__.get(name)
        if isinstance(value, float) and not isinstance(value, bool):
            return name
    return None


def _candidates(x, weight, bias, eps):
    b = 0.0 if bias is None else bias
    for kind in ("rms", "layer"):
        xhat = rms(x, eps) if kind == "rms" else F.layer_norm(x, (x.shape[-1],), None, None, eps)
        for offset in (0.0, 1.0):
            yield kind, offset, xhat * (offset + weight) + b


def recognise_norm(module: nn.Module) -> NormForm | None:
    """The `NormForm` ``module`` computes, or ``None`` (see the module doc)."""
    own = dict(module.named_parameters(recurse=False))
    weight, bias = own.get("weight"), own.get("bias")
    if weight is None or set(own) - {"weight", "bias"} or weight.dim() != 1 or not runs_class_forward(module):
        return None
    if bias is not None and bias.shape != weight.shape:
        return None
    if not weight.is_floating_point() or any(True for _ in module.children()):
        return None
    eps_name = _eps(module)
    if eps_name is None:
        return None
    eps = module.__dict__[eps_name]
    d = weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, d, generator=generator) + 1.0  # a non-zero mean tells RMS from layer norm
    w = torch.randn(d, generator=generator) * 0.5 + 1.0
    b = None if bias is None else torch.randn(d, generator=generator) * 0.1
    out = class_forward_on(module, _params(w, b), x)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return None
    matches = [(kind, offset) for kind, offset, y in _candidates(x.double(), w.double(), None if b is None else b.double(), eps)
               if torch.allclose(out.double(), y, rtol=1e-5, atol=1e-6)]
    if len(matches) != 1:
        return None
    kind, offset = matches[0]
    round_first = _rounds_first(module, kind, x, w, b, offset, eps)
    return None if round_first is None else NormForm(kind, offset, eps_name, round_first)


def normalise(kind: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The normalised input of a ``kind`` norm, in at least float32 (float64 stays float64)."""
    if kind == "rms":
        return rms(x, eps)
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    return F.layer_norm(work, (x.shape[-1],), None, None, eps)


def _rounds_first(module, kind, x, w, b, offset, eps) -> bool | None:
    """In bfloat16: does the module round the normalised input before the product (True), after it
    (False)? The one that reproduces it bit for bit -- or, for a module computing its statistics
    another way (in bfloat16 itself, or a layer norm's mean and variance by hand), the closer one.
    ``None`` if the module does not run in bfloat16."""
    low = torch.bfloat16
    xl, wl = x.to(low), w.to(low)
    bl = None if b is None else b.to(low)
    out = class_forward_on(module, _params(wl, bl), xl)
    if not isinstance(out, torch.Tensor):
        return None
    extra = 0.0 if bl is None else bl
    first = normalise(kind, xl, eps).to(low) * (offset + wl) + extra
    after = ((normalise(kind, xl, eps) * (offset + wl.float())) + (0.0 if bl is None else bl.float())).to(low)
    if out.dtype != low or out.shape != first.shape:
        return None
    if torch.equal(out, first) or torch.equal(out, after):
        return torch.equal(out, first)
    return bool((out.float() - first.float()).abs().max() <= (out.float() - after.float()).abs().max())
