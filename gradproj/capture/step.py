"""The optimizer step around the microbatches: groups, checks before the inner step, the step's end.

* `StepControl.set_groups` -- the step's prompt groups and rewards, once per step;
* `StepControl.check_step` -- before the inner ``step()``: refuse an incomplete running
  gradient, skip a step whose microbatches all dropped;
* `StepControl.sync_gradients` -- average over data-parallel ranks once per step;
* `StepControl.end_step` -- snapshot the step's metrics and start counting anew.
"""

from __future__ import annotations

import torch

from gradproj.capture.setup import EngineSetup
from gradproj.errors import ProtocolError
from gradproj.work import StepGroups

__all__ = ["StepControl"]


class StepControl(EngineSetup):
    """Step-level operations of the capture engine (its state is set up by `EngineSetup`)."""

    def check_idle(self, what: str) -> None:
        """Raise `ProtocolError` if a microbatch block is open."""
        if self.current is not None:
            raise ProtocolError(f"{what} called inside an open opt.microbatch(...) block; close it first")

    def clear_incomplete(self) -> None:
        """The gradients were zeroed: a failed microbatch no longer matters, nor a NaN marker."""
        self._broken = None
        self._all_dropped = False

    def check_complete(self, what: str) -> None:
        """Refuse to go on from a running gradient a failed microbatch left incomplete; zeroed
        gradients (``optimizer.zero_grad()`` or ``model.zero_grad()``) start the step anew."""
        if self._broken is None:
            return
        grads = [p.grad for p in self._written_params() if p.grad is not None]
        if not grads or not bool(torch.stack(torch._foreach_norm(grads)).any()):  # None or zeroed
            self._broken = None
            return
        raise ProtocolError(
            f"{what}: {self._broken}, so the running gradient of this step is incomplete. Call "
            "optimizer.zero_grad() and run the step's microbatches again."
        )

    def set_groups(self, group_ids, rewards) -> None:
        """Record the step's prompt groups and rewards (see `GradProjOptimizer.set_groups`)."""
        self.check_idle("opt.set_groups()")
        groups = StepGroups(group_ids, rewards)
        if self.step_groups is not None and self.step_pending() and not groups.same_as(self.step_groups):
            raise ProtocolError(
                "opt.set_groups() called again with other groups after this step's first microbatch: group statistics "
                "(each group's reward std) are computed over the whole step, so give every sequence of the step once, "
                "before its first microbatch"
            )
        self.step_groups = groups

    def check_step(self) -> bool:
        """Before the inner step: refuse a step whose transforms never saw a microbatch, or whose
        running gradient a failed microbatch left incomplete. Returns False when the inner step
        must be skipped: every microbatch of the step was dropped as non-finite."""
        self.check_complete("optimizer.step()")
        if self._all_dropped:
            return False
        transforms = self.strategies.microbatch_transforms
        if transforms and self.counters.microbatches == 0 and any(p.grad is not None for p in self._params):
            names = ", ".join(type(t).__name__ for t in transforms)
            raise ProtocolError(
                f"optimizer.step(): the gradients were computed outside opt.microbatch(...) blocks, so the "
                f"coefficient transform(s) {names} never applied; run each microbatch's backward inside "
                "`with opt.microbatch(logp, mask, group_ids=...):`"
            )
        return True

    def sync_gradients(self) -> None:
        """Average the accumulated gradients over the data-parallel ranks (no-op without DDP)."""
        self.check_idle("opt.sync_gradients()")
        self.check_complete("opt.sync_gradients()")
        if self.data_parallel is not None:
            self.data_parallel.sync([p for p in self._params if p.requires_grad])
        if self.sharded is not None:
            self.sharded.sync()

    def end_step(self, skipped: bool = False) -> None:
        """Close the optimizer step: snapshot its metrics and start counting anew.

        ``skipped``: the inner step did not run (every microbatch was dropped, or a ``GradScaler``
        skipped it and the gradients are being zeroed)."""
        for layer in self.layers:  # forwards never backpropagated (discarded outputs) end here
            layer.pending = 0
        self._all_dropped = False
        if self.data_parallel is not None:
            self.data_parallel.reset()
        self.sink.end_step()
        self.monitor.end_step()
        self._last_metrics = self.counters.collect(self.strategies.all, self.diagnostics, self.lora_bound, self.step_groups)
        self._last_metrics["gradproj/step_skipped"] = float(skipped)
        self._last_reading = self.monitor.take()  # read when asked for
        self.step_groups = None
        self.steps += 1
        self._reset_counters()

    def running_metrics(self) -> dict[str, float]:
        """Metrics of the step in progress."""
        return self.counters.collect(self.strategies.all, self.diagnostics, self.lora_bound, self.step_groups, self.monitor)

    def metrics(self) -> dict[str, float]:
        """Metrics of the last completed step (of the step in progress before the first one)."""
        if self._last_metrics is None:
            return self.running_metrics()
        out = dict(self._last_metrics)
        if self._last_reading is not None:
            out.update({f"gradproj/{k}": v for k, v in self._last_reading.values().items()})
        return out

    def step_pending(self) -> bool:
        """Whether microbatches ran since the last optimizer step."""
        return self.counters.pending
