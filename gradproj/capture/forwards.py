"""The ``forward`` gradproj installs on a covered module instance.

A layer handler routes a covered module's forward through its captured autograd Function by
setting the instance attribute ``module.forward`` (`install_forward`). That attribute is an
`InstalledForward`, not a closure, so that a *copy* of a wrapped model behaves as users
expect:

* ``copy.deepcopy(model)`` (a reference or old-policy copy) gives modules whose forward runs their
  class's own forward on the copy's own weights -- never the original's, and never captured;
* ``torch.save(model)`` pickles, and loads as a plain model;
* such a copy can itself be wrapped by another optimizer (its inert forwards are recognised by
  `runs_class_forward` and replaced).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["InstalledForward", "install_forward", "runs_class_forward"]


class InstalledForward:
    """``module.forward`` while gradproj captures the module (``capture`` set), or the inert
    stand-in a copy of such a module carries (``capture=None``: the class's own forward).

    Args:
        module: the module this forward belongs to.
        capture: the handler's forward (same signature as the module's), or ``None``.
    """

    __slots__ = ("module", "capture", "__weakref__")

    def __init__(self, module: nn.Module, capture: Callable[..., Any] | None = None) -> None:
        self.module = module
        self.capture = capture

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        capture = self.capture
        if capture is not None:
            return capture(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> InstalledForward:
        # the module is being copied (it is in the memo): the copy runs its own weights, uncaptured
        return InstalledForward(copy.deepcopy(self.module, memo))

    def __reduce__(self):
        return (InstalledForward, (self.module,))

    def __repr__(self) -> str:
        state = "capturing" if self.capture is not None else "inert copy"
        return f"<gradproj forward of {type(self.module).__name__} ({state})>"


def install_forward(module: nn.Module, capture: Callable[..., Any]) -> Callable[[], None]:
    """Make ``capture`` the module's forward; return the function that removes it again."""
    installed = InstalledForward(module, capture)
    module.__dict__["forward"] = installed

    def uninstall() -> None:
        if module.__dict__.get("forward") is installed:
            del module.__dict__["forward"]

    return uninstall


def runs_class_forward(module: nn.Module) -> bool:
    """Whether ``module`` runs its class's own forward: no instance-level override, other than
    the inert forward a copy of a wrapped module carries."""
    own = module.__dict__.get("forward")
    return own is None or (isinstance(own, InstalledForward) and own.capture is None)
