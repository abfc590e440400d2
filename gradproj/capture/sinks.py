"""Gradient sinks: where a microbatch's updates go, one implementation per write mode.

* `StagedSink` (default, ``nonfinite="drop"``): updates are staged in the microbatch and
  added to ``param.grad`` when it closes -- all of them, or none if something failed or came out
  non-finite, so a failed microbatch can be retried.
* `DirectSink` (``nonfinite="propagate"``): each layer's update is added to ``param.grad``
  at once (no staged copy of the gradient: less memory); the close only checks for NaN/inf.
* `ShardedSink` (FSDP2): staged like the default, applied to the rank-local full-size
  running gradients of `gradproj.capture.sharded.ShardedGradients`.

Every sink reads the running gradient ``G`` (`GradientSink.running_grad`), offers an output
buffer for a layer's update, commits updates, applies the staged ones, and can poison every
covered gradient with NaN (``nonfinite="propagate"``, or a step whose microbatches all dropped).
"""

from __future__ import annotations

from collections.abc import Container, Sequence

import torch

from gradproj.capture.handlers import compute_dtype
from gradproj.capture.sharded import ShardedGradients
from gradproj.linalg.sequence_grads import Workspace

__all__ = ["GradientSink", "StagedSink", "DirectSink", "ShardedSink", "make_sink"]


class GradientSink:
    """Base: updates staged in the microbatch, applied to ``param.grad`` at its close.

    Args:
        covered_params: the covered parameters (what `poison` fills).
        batched: ids of batched small parameters (their updates are views of a shared buffer and
            never reused as output buffers).
    """

    #: whether updates reach ``.grad`` as each layer finishes (nothing staged)
    writes_directly = False
    #: FSDP2's rank-local running gradients (`ShardedSink`), else ``None``
    sharded: ShardedGradients | None = None

    def __init__(self, covered_params: Sequence[torch.Tensor], batched: Container[int]) -> None:
        self.covered_params = covered_params
        self._batched = batched
        self._buffers: dict[int, torch.Tensor] = {}  # per-parameter update buffers, reused in a step

    def running_grad(self, param: torch.Tensor) -> torch.Tensor | None:
        """The running gradient ``G`` of a covered parameter (``None`` = 0)."""
        return param.grad

    def empty(self) -> bool:
        """Whether no running gradient is held outside ``.grad`` (always, except under FSDP2)."""
        return True

    def out_buffer(self, mb, param: torch.Tensor, grad: torch.Tensor | None, may_defer: bool) -> torch.Tensor | None:
        """A tensor the strategy may write ``param``'s update into, or ``None`` (it allocates)."""
        out = None if id(param) in mb.staged else self._buffers.get(id(param))
        return None if out is None or out.shape != param.shape else out

    def commit(self, mb, param: torch.Tensor, update: torch.Tensor, finite: bool | torch.Tensor) -> None:
        """Hand over ``param``'s update; ``finite=False`` ones are checked for NaN/inf first, a
        tensor ``finite`` (the rule's flag on the device) is read when the microbatch closes."""
        mb.stage(param, update, finite)

    def unchecked(self, mb) -> list[torch.Tensor]:
        """Gradients that took updates not yet checked for NaN/inf (direct writes only)."""
        return []

    def apply(self, mb) -> None:
        """``.grad <- .grad + U`` for every staged update (``.grad = U`` where it was None)."""
        grads, updates = [], []
        for key, (param, update) in mb.staged.items():
            if param.grad is None:
                param.grad = update if update.dtype == param.dtype else update.to(param.dtype)
                self._buffers.pop(key, None)
            else:
                grads.append(param.grad)
                updates.append(update)
                self._keep(key, update)
        if grads:
            torch._foreach_add_(grads, updates)

    def _keep(self, key: int, update: torch.Tensor) -> None:
        if key not in self._batched and update.dtype in (torch.float32, torch.float64):
            self._buffers[key] = update  # reuse as the next microbatch's output buffer

    def poison(self) -> None:
        """Make every covered gradient NaN, as plain autograd would leave non-finite gradients, so a
        ``GradScaler`` (or any finiteness check) skips the optimizer step."""
        for param in self.covered_params:
            if param.grad is None:
                param.grad = torch.full_like(param, float("nan"))
            else:
                param.grad.fill_(float("nan"))

    def reset(self) -> None:
        """The running gradients were cleared (nothing held outside ``.grad``)."""

    def end_step(self) -> None:
        """The optimizer step is over: release the reused buffers."""
        self._buffers.clear()


class StagedSink(GradientSink):
    """``nonfinite="drop"``: stage, then apply all or nothing (the base behaviour)."""


class DirectSink(GradientSink):
    """``nonfinite="propagate"``: add each update to ``param.grad`` at once.

    A strategy that may defer (``may_defer``) gets fresh update tensors -- the engine holds its
    deferred updates until they are finished -- others the one-layer scratch buffer."""

    writes_directly = True

    def __init__(self, covered_params: Sequence[torch.Tensor], batched) -> None:
        super().__init__(covered_params, batched)
        self._scratch = Workspace()  # one layer's update, added straight to .grad

    def out_buffer(self, mb, param, grad, may_defer):
        if grad is None or may_defer:
            return None
        return self._scratch.take(param.shape, compute_dtype(param.dtype), param.device)

    def commit(self, mb, param, update, finite):
        if param.grad is None:
            param.grad = update if update.dtype == param.dtype else update.to(param.dtype)
        else:
            param.grad.add_(update)
        if isinstance(finite, torch.Tensor):
            mb.vouch(update, finite)
        elif not finite:
            mb.written.append(param)

    def unchecked(self, mb):
        return [p.grad for p in mb.written]

    def end_step(self) -> None:
        super().end_step()
        self._scratch.clear()


class ShardedSink(GradientSink):
    """FSDP2: staged updates go into the rank-local full-size running gradients."""

    def __init__(self, covered_params: Sequence[torch.Tensor], batched, sharded: ShardedGradients) -> None:
        super().__init__(covered_params, batched)
        self.sharded = self._rank_local = sharded

    def running_grad(self, param):
        return self._rank_local.get(param)

    def empty(self) -> bool:
        return self._rank_local.empty()

    def apply(self, mb) -> None:
        for key, (param, update) in mb.staged.items():
            current = self._rank_local.get(param)
            if current is None:
                self._rank_local.set(param, update if update.dtype == param.dtype else update.to(param.dtype))
                self._buffers.pop(key, None)
            else:
                current.add_(update)
                self._keep(key, update)

    def poison(self) -> None:
        for param in self.covered_params:
            self._rank_local.set(param, torch.full(param.shape, float("nan"), dtype=param.dtype, device=param.device))

    def reset(self) -> None:
        self._rank_local.reset()

    def end_step(self) -> None:
        super().end_step()
        self._rank_local.reset()


def make_sink(nonfinite: str, covered_params: Sequence[torch.Tensor], batched, sharded: ShardedGradients | None) -> GradientSink:
    """The sink for a write mode: FSDP2's rank-local one, direct writes for ``"propagate"``, else staged."""
    if sharded is not None:
        return ShardedSink(covered_params, batched, sharded)
    if nonfinite == "propagate":
        return DirectSink(covered_params, batched)
    return StagedSink(covered_params, batched)
