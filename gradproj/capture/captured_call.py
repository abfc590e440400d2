"""The one capture mechanism every layer handler uses: a captured call of a module's computation.

A handler describes its module's computation as a `CapturedOp` -- the forward, the input
gradients, the ordinary parameter gradients (for plain microbatches) and the *use* handed to the
engine -- and its installed forward runs ``CapturedCall.apply(op, layer, *args)`` when
`captures` says so. `CapturedCall` does the rest, the same for every handler: it
counts the forward (``layer.count_forward()``), keeps the layer on the backward node (the engine
recognises it when it walks a loss's graph), and in the backward returns the input gradients plus
either ordinary parameter gradients (``layer.plain_backward()``) or none, handing
``op.use(...)`` to the engine (``layer.backward(use)``) instead: the weight gradient is never
computed twice.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["CapturedOp", "CapturedCall", "captures"]


class CapturedOp:
    """A module's computation, as the shared autograd Function runs it.

    ``args`` are the call's arguments: first ``n_inputs`` inputs (tensors or constants), then the
    ``n_params`` parameters (a parameter may be ``None``, e.g. a missing bias).
    """

    n_inputs: int = 1
    n_params: int = 1

    def forward(self, *args) -> tuple[torch.Tensor, tuple, Any]:
        """``(output, tensors to save, meta)``; ``meta`` is any non-tensor state the backward needs."""
        raise NotImplementedError

    def input_grads(self, meta, saved: tuple, grad_out: torch.Tensor, needs: tuple[bool, ...]) -> tuple:
        """Gradients of the ``n_inputs`` inputs (``None`` where ``needs`` is False or not a tensor)."""
        raise NotImplementedError

    def param_grads(self, meta, saved: tuple, grad_out: torch.Tensor, needs: tuple[bool, ...]) -> tuple:
        """Ordinary gradients of the ``n_params`` parameters (a plain microbatch, paused, detached)."""
        raise NotImplementedError

    def use(self, meta, saved: tuple, grad_out: torch.Tensor) -> tuple:
        """What the engine collects per use of the module (the handler's ``sequence_gradients`` reads it)."""
        raise NotImplementedError


class CapturedCall(torch.autograd.Function):
    """``op.forward`` whose backward hands parameter gradients to the engine (see the module doc)."""

    @staticmethod
    def forward(ctx, op: CapturedOp, layer, *args):
        out, saved, meta = op.forward(*args)
        ctx.save_for_backward(*saved)
        ctx.op, ctx.meta, ctx.layer = op, meta, layer
        layer.count_forward()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        op, saved = ctx.op, ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        grads = op.input_grads(ctx.meta, saved, grad_out, needs[: op.n_inputs])
        if ctx.layer.plain_backward():  # paused, detached, or a microbatch that needs no sequence gradients
            params = op.param_grads(ctx.meta, saved, grad_out, needs[op.n_inputs :])
        else:
            ctx.layer.backward(op.use(ctx.meta, saved, grad_out))
            params = (None,) * op.n_params
        return (None, None, *grads, *params)


def captures(layer, *params: torch.Tensor | None) -> bool:
    """Whether a forward of ``layer``'s module should run captured: gradproj captures, grad mode is
    on and one of its parameters is trained."""
    return layer.capturing and torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
