"""Running a module's class forward on a stand-in: what the structural handlers verify with.

A handler that recognises modules by what they compute (a norm class it was never told about, a
Linear or Embedding subclass with its own forward) runs the module's *class* forward on a stand-in:
an object of the same class holding the module's plain attributes and buffers but probe
parameters, its submodules without trainable parameters (activations, frozen statistics) and no hooks. The module itself -- its parameters, hooks (FSDP's,
accelerate's) and autograd state -- is never touched.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import nn

__all__ = ["class_forward_on", "ProbedForms"]


#: nn.Module's own bookkeeping (parameters, buffers, submodules, hooks): never copied to a stand-in
_MODULE_STATE = frozenset(nn.Module().__dict__)


def class_forward_on(module: nn.Module, params: dict[str, torch.Tensor | None], *args):
    """``type(module).forward`` run on a stand-in of ``module`` whose parameters are ``params``
    (``None`` for an absent one; an ``nn.Parameter`` is registered as given), under ``no_grad``; ``None`` if it raises (it needs more state)."""
    stand = type(module).__new__(type(module))
    nn.Module.__init__(stand)
    for key, value in module.__dict__.items():
        if key not in _MODULE_STATE and key != "forward":
            object.__setattr__(stand, key, value)
    for name, buffer in module.named_buffers(recurse=False):
        stand.register_buffer(name, buffer)
    for name, child in module.named_children():
        if not any(p.requires_grad for p in child.parameters()):  # an activation, frozen statistics: shared
            stand.add_module(name, child)
    for name, value in params.items():
        if value is not None and not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        stand.register_parameter(name, value)
    try:
        with torch.no_grad():
            return type(module).forward(stand, *args)
    except Exception:  # a forward that needs other arguments or state: not this form
        return None


T = TypeVar("T")


class ProbedForms(Generic[T]):
    """What ``probe(module)`` found, computed once per module (weakly keyed: a freed module is
    forgotten). Structural handlers ask it from ``accepts`` and again from ``install``."""

    def __init__(self, probe: Callable[[nn.Module], T]) -> None:
        self._probe = probe
        self._found: weakref.WeakKeyDictionary[nn.Module, T] = weakref.WeakKeyDictionary()

    def __call__(self, module: nn.Module) -> T:
        """The probe's result for ``module``."""
        if module not in self._found:
            self._found[module] = self._probe(module)
        return self._found[module]
