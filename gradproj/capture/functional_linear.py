"""Modules that use their parameters only through ``F.linear``: MoE routers and their kin.

An MoE router (Qwen2/3-MoE's, Mixtral's, OLMoE's, gpt-oss's ``*TopKRouter``) holds a ``weight``
(and maybe a ``bias``) and computes ``F.linear(tokens, weight, bias)`` followed by softmax, top-k
and renormalisation -- no parameter after the linear step. Its parameter gradient is that of the
linear step, so it is captured exactly like ``nn.Linear``: while the module's own forward runs, a
torch-function mode routes that ``F.linear`` call through the captured linear op
(`gradproj.capture.handlers.captured_linear`); everything after it (softmax in float32, top-k,
the routing weights' path into the experts) stays ordinary autograd, so the router's gradient is
exact whatever the routing does.

Recognised by what it does (a structural handler): at ``wrap()`` the module's class forward runs on
a probe input with stand-in parameters, and the module is accepted only if every operation that
touches a parameter is one ``F.linear(x, weight, bias)`` call -- the weight possibly cast to another
dtype first (DeepSeek-V3's, GLM-4.5's, Ernie 4.5's routers compute in float32): the cast's backward
casts the gradient back, so capturing the linear step on the cast weight is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from gradproj.capture.captured_call import captures
from gradproj.capture.forwards import install_forward, runs_class_forward
from gradproj.capture.handlers import LinearHandler, captured_linear
from gradproj.capture.probe import ProbedForms, class_forward_on
from gradproj.plugins.hookspecs import hookimpl

__all__ = ["FunctionalLinearHandler", "install_linear_capture", "uses_only_linear"]


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


#: dtype casts a router may apply to its weight before ``F.linear`` (DeepSeek-V3's
#: ``weight.type(torch.float32)``, Ernie 4.5's ``weight.float()``): the cast weight is linear in the
#: weight, so its ``F.linear`` is captured like the weight's own (the cast's backward casts back)
_CASTS = frozenset({torch.Tensor.to, torch.Tensor.type, torch.Tensor.float, torch.Tensor.double,
                    torch.Tensor.bfloat16, torch.Tensor.half})


def _is_cast(func, args, kwargs) -> bool:
    """A pure dtype cast: ``t.to(dtype)``, ``t.type(dtype)``, ``t.float()``, ... (no device, no other tensor)."""
    if func not in _CASTS or kwargs.get("device") is not None:
        return False
    rest = list(args[1:]) + [v for k, v in kwargs.items() if k not in ("dtype", "non_blocking", "copy")]
    return all(isinstance(a, torch.dtype) for a in rest) and len(rest) <= 1


def _linear_args(args, kwargs):
    x = args[0] if args else kwargs.get("input")
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return x, weight, bias


class _RecordUses(TorchFunctionMode):
    """Probe: which calls touch the stand-in parameters, and whether each is ``F.linear(x, w, b)``."""

    def __init__(self, weight, bias) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.weights = [weight]  # the weight and its dtype casts
        self.linear_calls = 0
        self.other = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__get__":  # reading an attribute (shape, grad_fn, ...)
            return func(*args, **kwargs)
        touched = [t for t in _tensors((args, kwargs)) if any(t is w for w in self.weights) or (self.bias is not None and t is self.bias)]
        out = func(*args, **kwargs)
        if touched:
            if func is F.linear:
                _, weight, bias = _linear_args(args, kwargs)
                if any(weight is w for w in self.weights) and bias is self.bias:
                    self.linear_calls += 1
                else:
                    self.other = True
            elif _is_cast(func, args, kwargs) and any(args[0] is w for w in self.weights):
                self.weights.append(out)
            else:
                self.other = True
        return out


def uses_only_linear(module: nn.Module) -> bool:
    """Whether the module's class forward uses ``weight`` (2-D) and ``bias`` only as ``F.linear``."""
    own = dict(module.named_parameters(recurse=False))
    weight, bias = own.get("weight"), own.get("bias")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or set(own) - {"weight", "bias"}:
        return False
    if bias is not None and bias.shape != weight.shape[:1]:
        return False
    if any(p.requires_grad for child in module.children() for p in child.parameters()):
        return False
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
    b = None if bias is None else torch.randn(bias.shape, generator=generator, dtype=torch.float64)
    x = torch.randn(6, weight.shape[1], generator=generator, dtype=torch.float64)
    stand_w = nn.Parameter(w, requires_grad=False)
    stand_b = None if b is None else nn.Parameter(b, requires_grad=False)
    recorder = _RecordUses(stand_w, stand_b)
    with recorder:
        out = class_forward_on(module, {"weight": stand_w, "bias": stand_b}, x)
    return out is not None and recorder.linear_calls >= 1 and not recorder.other


class _CaptureLinear(TorchFunctionMode):
    """Runtime: route ``F.linear(x, module.weight, module.bias)`` through the captured linear op."""

    def __init__(self, layer, weight, bias) -> None:
        super().__init__()
        self.layer, self.weight, self.bias = layer, weight, bias
        self.weights = [weight]  # the weight and its dtype casts (captured through the cast)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_args(args, kwargs)
            if any(weight is w for w in self.weights) and bias is self.bias:
                return captured_linear(self.layer, x, weight, bias)
        out = func(*args, **kwargs)
        if args and _is_cast(func, args, kwargs) and any(args[0] is w for w in self.weights):
            self.weights.append(out)
        return out


class FunctionalLinearHandler(LinearHandler):
    """Any module (not an ``nn.Linear``) whose forward uses its ``weight`` and optional ``bias`` only
    through ``F.linear`` -- MoE routers -- captured like ``nn.Linear`` (see the module doc)."""

    module_types: tuple[type, ...] = ()
    structural = True

    def __init__(self) -> None:
        super().__init__()
        #: whether the module's forward uses its parameters only through F.linear (probed once)
        self.linear_only: ProbedForms[bool] = ProbedForms(uses_only_linear)

    def accepts(self, module: nn.Module) -> bool:
        """Modules running their class forward whose parameters enter only through ``F.linear``."""
        return not isinstance(module, nn.Linear) and runs_class_forward(module) and self.linear_only(module)

    def install(self, module: nn.Module, layer) -> Callable[[], None]:
        """Run the module's own forward with its ``F.linear`` call captured."""
        return install_linear_capture(module, layer)


def install_linear_capture(module: nn.Module, layer) -> Callable[[], None]:
    """Install on ``module`` (whose forward uses ``weight``/``bias`` only through ``F.linear``) a
    forward that captures that call for ``layer``; the parameters are read at each call (a
    parametrized weight -- peft's LoRA on it -- is captured as computed)."""
    original = type(module).forward

    def forward(*args, **kwargs):
        weight, bias = module.weight, getattr(module, "bias", None)
        if not captures(layer, weight, bias):
            return original(module, *args, **kwargs)
        with _CaptureLinear(layer, weight, bias):
            return original(module, *args, **kwargs)

    return install_forward(module, forward)


@hookimpl
def gradproj_layer_handlers():
    """Register the structural handler for modules that use their parameters through ``F.linear``."""
    return [FunctionalLinearHandler()]
