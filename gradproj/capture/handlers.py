"""Layer handlers: per module type, how to capture a layer and build its sequence gradients.

A handler is registered through the ``gradproj_layer_handlers`` hook (the built-in ``nn.Linear``
handler below is registered that way). It

* describes its module's computation as a `gradproj.capture.captured_call.CapturedOp` and
  ``install`` s a forward (`gradproj.capture.forwards.install_forward`) that runs it through
  the shared `gradproj.capture.captured_call.CapturedCall` while
  `gradproj.capture.captured_call.captures` says so: the module's backward then hands its
  *use* (e.g. ``(inputs, output_grads)``) to the engine instead of accumulating parameter gradients
  (no extra matmul: the weight gradient is never computed twice), or returns ordinary gradients in
  a plain microbatch;
* turns the collected uses into `gradproj.linalg` sequence gradients per parameter.

peft's LoRA adapters (``lora_A``/``lora_B``) are ``nn.Linear`` and need nothing more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gradproj.capture.captured_call import CapturedCall, CapturedOp, captures
from gradproj.capture.forwards import install_forward, runs_class_forward
from gradproj.capture.probe import ProbedForms, class_forward_on
from gradproj.capture.token_rows import as_token_rows
from gradproj.linalg.linear_grads import linear_weight_grads
from gradproj.linalg.sequence_grads import TokenSumGrads
from gradproj.plugins.hookspecs import hookimpl

__all__ = ["LayerHandler", "LinearHandler", "Conv1DHandler", "captured_linear", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sequence-gradient algebra runs in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LayerHandler:
    """Base class of layer handlers.

    Attributes:
        module_types: module classes this handler covers (subclasses too, unless ``accepts``
            says otherwise).
        parameter_names: the module attributes holding the parameters it covers.
    """

    module_types: tuple[type, ...] = ()
    parameter_names: tuple[str, ...] = ()
    #: Whether ``sequence_gradients`` can write into ``slots`` (enables batching of small tensors).
    supports_slots: ClassVar[bool] = False
    #: Whether the sequence gradients it returns offer ``token_factors()`` (needed by strategies
    #: with ``needs_tokens``, e.g. ``intra_proma``).
    provides_tokens: ClassVar[bool] = False
    #: A structural handler recognises modules by what they compute rather than by type: it is
    #: asked (``accepts``) about every module no type-specific handler covers, in registration
    #: order; its ``module_types`` is usually empty.
    structural: ClassVar[bool] = False
    #: The handler covers parameters held by the module's *submodules* (an adapter that wraps a
    #: module, e.g. peft's LoRA on a model parameter): the plan asks every such handler about every
    #: module (``accepts``), outermost first, and takes `covered_parameters` as the layer's.
    covers_descendants: ClassVar[bool] = False

    def covered_parameters(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """``[(attribute or dotted path from module, parameter)]`` this handler covers on ``module``
        (default: the present ones among ``parameter_names``)."""
        return [(name, p) for name in self.parameter_names if isinstance(p := getattr(module, name, None), nn.Parameter)]

    def accepts(self, module: nn.Module) -> bool:
        """Whether this handler can capture this particular module (default: yes)."""
        return True

    def install(self, module: nn.Module, layer) -> Callable[[], None]:
        """Start capturing ``module`` for ``layer``; return a function that undoes it."""
        raise NotImplementedError

    def sequence_gradients(self, layer, uses, layout, gram: str, workspace=None, slots=None) -> dict:
        """``{param attribute: SequenceGradients}`` from the uses collected in one microbatch.

        ``layout`` (`gradproj.capture.layout`) maps activations to the ``layout.k`` sequences.
        ``workspace`` (a `gradproj.linalg.sequence_grads.Workspace`) may back large
        temporaries; the returned objects are only valid until the next layer is processed.
        ``slots`` maps attributes to (k, *shape) tensors the handler must fill with the sequence
        gradients instead (batched parameters; only if ``supports_slots``); those attributes are
        left out of the result.
        """
        raise NotImplementedError


class _LinearOp(CapturedOp):
    """``F.linear`` (autocast's casts applied here); the engine gets ``(x, dy)`` per use."""

    n_inputs, n_params = 1, 2

    def forward(self, x, weight, bias):
        device_type = x.device.type
        if x.is_floating_point() and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            with torch.autocast(device_type, enabled=False):
                out = F.linear(x, weight, bias)
        else:
            out = F.linear(x, weight, bias)
        return out, (x, weight), None

    def input_grads(self, meta, saved, grad_out, needs):
        return (grad_out.matmul(saved[1].to(grad_out.dtype)) if needs[0] else None,)

    def param_grads(self, meta, saved, grad_out, needs):
        x = saved[0]
        d2 = grad_out.reshape(-1, grad_out.shape[-1])
        return (d2.T @ x.reshape(-1, x.shape[-1]) if needs[0] else None, d2.sum(dim=0) if needs[1] else None)

    def use(self, meta, saved, grad_out):
        return (saved[0], grad_out)


_LINEAR = _LinearOp()


def captured_linear(layer, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through the captured linear op of ``layer``. A 2-D ``x`` whose
    rows are provably a flattening of ``(B, T, d)`` tokens (MoE routers and shared experts) runs as
    ``(B, T, d)``, so the layout can tell each row's sequence (`gradproj.capture.token_rows`)."""
    rows = as_token_rows(x)
    out = CapturedCall.apply(_LINEAR, layer, rows, weight, bias)
    return out if rows is x else out.reshape(x.shape[0], out.shape[-1])


class LinearHandler(LayerHandler):
    """``torch.nn.Linear`` (weight and bias); covers peft LoRA's ``lora_A``/``lora_B`` too."""

    module_types: tuple[type, ...] = (nn.Linear,)
    parameter_names = ("weight", "bias")
    supports_slots = True
    provides_tokens = True
    #: The weight is stored (in, out) and ``s_i = A_i^T D_i`` (transformers' Conv1D) instead of
    #: (out, in) with ``s_i = D_i^T A_i``.
    weight_transposed = False

    def __init__(self) -> None:
        #: whether a subclass's own forward computes F.linear, probed once per module
        self._computes_linear: ProbedForms[bool] = ProbedForms(_computes_linear)

    def accepts(self, module: nn.Module) -> bool:
        """Modules running ``nn.Linear.forward``, or a subclass's own forward (transformers'
        ``FalconLinear``, ...) verified to compute ``F.linear`` on a probe input."""
        if not runs_class_forward(module):
            return False
        if type(module).forward is nn.Linear.forward:
            return True
        return self._computes_linear(module)

    def install(self, module: nn.Module, layer) -> Callable[[], None]:
        """Route the module's forward through the captured linear op while capture is on."""
        original = type(module).forward

        def forward(input):
            weight, bias = module.weight, module.bias
            if captures(layer, weight, bias):
                return captured_linear(layer, input, weight, bias)
            return original(module, input)

        return install_forward(module, forward)

    def _factors(self, layer, uses, layout):
        dtype = compute_dtype(layer.module.weight.dtype)
        inputs = [layout.rows(x, layer, "inputs") for x, _ in uses]
        grads = [layout.rows(dy, layer, "output gradients") for _, dy in uses]
        a = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)
        d = grads[0] if len(grads) == 1 else torch.cat(grads, dim=1)
        return (a if a.dtype == dtype else a.to(dtype)), (d if d.dtype == dtype else d.to(dtype))

    def sequence_gradients(self, layer, uses, layout, gram: str, workspace=None, slots=None) -> dict:
        """Weight: materialised or ghost (cost rule); bias: per-sequence sums of output grads."""
        a, d = self._factors(layer, uses, layout)
        left, right = (a, d) if self.weight_transposed else (d, a)  # s_i = left_i^T right_i
        slots = slots or {}
        out = {}
        if "weight" in slots:
            torch.bmm(left.transpose(1, 2), right, out=slots["weight"])
        elif layer.module.weight.requires_grad:
            out["weight"] = linear_weight_grads(right, left, gram, workspace)
            if self.weight_transposed:
                out["weight"].out_side = "A"
        if "bias" in slots:
            torch.sum(d, dim=1, out=slots["bias"])
        elif getattr(layer.module, "bias", None) is not None and layer.module.bias.requires_grad:
            out["bias"] = TokenSumGrads(d)
        return out


class _Conv1DOp(_LinearOp):
    """transformers' ``Conv1D`` (``addmm(bias, x, W)``, W stored (in, out)), captured like Linear."""

    def forward(self, x, weight, bias):
        device_type = x.device.type
        shape = x.shape[:-1] + (weight.shape[1],)
        if x.is_floating_point() and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
            with torch.autocast(device_type, enabled=False):
                out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
        else:
            out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
        return out.view(shape), (x, weight), None

    def input_grads(self, meta, saved, grad_out, needs):
        return (grad_out.matmul(saved[1].to(grad_out.dtype).T) if needs[0] else None,)

    def param_grads(self, meta, saved, grad_out, needs):
        x = saved[0]
        d2 = grad_out.reshape(-1, grad_out.shape[-1])
        return (x.reshape(-1, x.shape[-1]).T @ d2 if needs[0] else None, d2.sum(dim=0) if needs[1] else None)


_CONV1D = _Conv1DOp()


class Conv1DHandler(LinearHandler):
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored transposed."""

    weight_transposed = True

    def __init__(self, module_types: tuple[type, ...]) -> None:
        super().__init__()
        self.module_types = module_types

    def accepts(self, module: nn.Module) -> bool:
        """Modules running ``Conv1D.forward`` unchanged."""
        return type(module) in self.module_types and runs_class_forward(module)

    def install(self, module: nn.Module, layer) -> Callable[[], None]:
        """Route the module's forward through the captured Conv1D op while capture is on."""
        original = type(module).forward

        def forward(x):
            if captures(layer, module.weight, module.bias):
                return CapturedCall.apply(_CONV1D, layer, x, module.weight, module.bias)
            return original(module, x)

        return install_forward(module, forward)


def _computes_linear(module: nn.Module) -> bool:
    """Whether the module's class forward computes ``F.linear(x, weight, bias)`` (float64 probe)."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return False
    generator = torch.Generator().manual_seed(0)
    d_out, d_in = weight.shape
    x = torch.randn(2, 3, d_in, generator=generator, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    b = None if bias is None else torch.randn(d_out, generator=generator, dtype=torch.float64)
    out = class_forward_on(module, {"weight": w, "bias": b}, x)
    expected = F.linear(x, w, b)
    return isinstance(out, torch.Tensor) and out.shape == expected.shape and torch.allclose(out, expected, rtol=1e-10, atol=1e-12)


@hookimpl
def gradproj_layer_handlers():
    """Register the built-in ``nn.Linear`` handler (and transformers' ``Conv1D`` when installed)."""
    handlers: list[LayerHandler] = [LinearHandler()]
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return handlers
    return handlers + [Conv1DHandler((Conv1D,))]
