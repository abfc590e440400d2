"""One covered module, and the interface between its layer handler and the capture engine.

A handler's autograd Function talks to capture only through its `LayerCapture`:

* ``layer.capturing`` -- whether its installed forward should run the capturing Function at all;
* ``layer.count_forward()`` -- once per captured forward (one use of the module);
* in the backward, exactly one of ``layer.plain_backward()`` (true: return ordinary parameter
  gradients, the use is consumed) and ``layer.backward(use)`` (hand ``(inputs, output_grads)``
  over; the engine builds the sequence gradients once all uses of the module arrived).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from gradproj.errors import CoverageError

__all__ = ["LayerCapture", "in_checkpoint_recomputation", "CHECKPOINT_FUNCTION"]


class LayerCapture:
    """One covered module: its handler, its parameters and its forwards still awaiting a backward.

    Attributes:
        engine: the capture engine that owns it (handlers use the methods below, not the engine).
        module: the module; ``name`` its qualified name in the model.
        handler: its layer handler.
        params: ``[(attribute, parameter, qualified name)]`` of the covered parameters.
        pending: captured forwards whose backward has not arrived yet (any microbatch).
    """

    __slots__ = ("engine", "module", "name", "handler", "params", "kinds", "pending", "uninstall", "installed")

    def __init__(self, engine, module, name, handler, params) -> None:
        self.engine = engine
        self.module = module
        self.name = name
        self.handler = handler
        self.params = params  # [(attribute, parameter, qualified name)]
        self.kinds = [(param.dtype, param.device) for _, param, _ in params]  # as wrapped
        #: captured forwards of the module whose backward has not arrived yet (any microbatch)
        self.pending = 0
        self.uninstall = None
        #: the forward the handler installed on the module (``None``: the handler installs none)
        self.installed = None

    def count_forward(self) -> None:
        """Record a forward of the module whose backward will reach the handler.

        Called by the handler's autograd Function in its forward. Refuses a module whose covered
        parameters were replaced after ``wrap()`` (``module.weight = nn.Parameter(...)``), or
        converted to another dtype or device: gradproj would keep reading and writing the old
        tensors' gradients, or buffers of the old kind.

        The forward that non-reentrant gradient checkpointing runs again during the backward is
        not counted: it only refills the saved tensors of the original forward, whose backward
        runs once. Counting it would keep every checkpointed layer's factors until the microbatch
        closes (the memory checkpointing saves). Reentrant checkpointing's recomputation is
        counted: there the original forward ran under ``no_grad`` and was not.
        """
        if self.engine.sharded is None:  # FSDP2 swaps sharded and unsharded parameters itself
            module = self.module
            for (attr, param, qname), (dtype, device) in zip(self.params, self.kinds):
                if param.dtype != dtype or param.device != device:
                    raise CoverageError(
                        f"parameter {qname} changed from {dtype} on {device} to {param.dtype} on {param.device} after "
                        "wrap() (model.to(), .float(), .half(), ...); gradproj planned its buffers for the old kind. "
                        "Call opt.detach(), build the optimizer anew (its state is for the old kind too) and wrap() it "
                        "after converting the model"
                    )
                if _resolve(module, attr) is not param:
                    raise CoverageError(
                        f"parameter {qname} was replaced after wrap() (a new tensor was assigned to "
                        f"{self.name or 'the model'}.{attr}); gradproj still tracks the old one, so the new "
                        "one would get a wrong gradient. Build the optimizer over the new parameters and "
                        "wrap it again (opt.detach() first), or change the values in place "
                        "(with torch.no_grad(): param.copy_(...))"
                    )
        if not in_checkpoint_recomputation():
            self.pending += 1

    @property
    def capturing(self) -> bool:
        """Whether the module's forward should capture (attached, not paused, capture needed)."""
        return self.engine.capturing

    def backward(self, use) -> None:
        """Hand one use ``(inputs, output_grads)`` of the module to the engine (called by the
        handler's backward when `plain_backward` is false)."""
        self.engine.on_backward(self, use)

    def plain_backward(self) -> bool:
        """Called once by the handler's backward: whether to return ordinary parameter gradients
        (paused, detached, or a microbatch that needs no sequence gradients) instead of handing
        the use to `CaptureEngine.on_backward`. A plain use is consumed here."""
        if self.engine.plain_backward:
            self.pending = max(self.pending - 1, 0)
            return True
        return False

    def __repr__(self) -> str:
        return f"LayerCapture({self.name!r}, {type(self.module).__name__})"


def _resolve(module, attr: str):
    """``module``'s parameter ``attr`` -- a dotted path for handlers that cover submodules' parameters."""
    if "." not in attr:
        return getattr(module, attr, None)
    try:
        return module.get_parameter(attr)
    except AttributeError:
        return None


_top_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
#: reentrant torch.utils.checkpoint's autograd Function (its segment's graph is built only in the backward)
CHECKPOINT_FUNCTION = getattr(torch.utils.checkpoint, "CheckpointFunction", None)


def in_checkpoint_recomputation() -> bool:
    """Whether this runs inside the recomputation of non-reentrant ``torch.utils.checkpoint``
    (its saved-tensor hooks are the innermost ones). A torch without this private hook stack
    answers False: recomputed forwards are then counted, which stays exact -- the layers only
    finish at the microbatch's close instead of during the backward."""
    if _top_saved_tensors_hooks is None:
        return False
    hooks = _top_saved_tensors_hooks(False)
    return hooks is not None and "_recomputation_hook" in getattr(hooks[0], "__qualname__", "")
