"""The capture engine: the microbatch state machine of one wrapped model.

Life of one microbatch (``with opt.microbatch(logp, mask): loss.backward()``):

1. Forward (before the block, grad enabled): every covered module call goes through its handler,
   which counts the use (``layer.pending``: forwards whose backward has not arrived yet).
2. `CaptureEngine.begin` validates the microbatch (nothing changes if that fails), hooks
   ``logp`` and watches the backward calls; each one's roots are checked for loss terms that reach
   the covered parameters without passing through ``logp`` (`gradproj.capture.loss_terms`).
3. Backward reaches ``logp``: the hook records ``c_i`` and sends the mask down.
4. Backward reaches a covered module: the handler passes ``(inputs, output_grads)`` here. When no
   forward of the layer is left waiting for its backward, `gradproj.capture.layer_updates`
   runs the strategy on its sequence gradients and hands the update to the gradient sink
   (`gradproj.capture.sinks`: staged, or written at once with ``nonfinite="propagate"``).
5. `CaptureEngine.close` applies the staged updates -- all of them, or none if an error or a
   non-finite value occurred, so a failed microbatch can be retried.

What is covered is decided once, at ``wrap()`` (`gradproj.capture.plan`); the step's counters
live in `gradproj.capture.step_metrics`; the step-level operations (groups, synchronisation,
the step's end) in `gradproj.capture.step`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from time import perf_counter

import torch

from gradproj.capture import backward_watch, guards
from gradproj.capture.layer import LayerCapture
from gradproj.capture.layout import PaddedLayout, check_row_order
from gradproj.capture.microbatch import Microbatch, sequence_coefficients
from gradproj.capture.step import StepControl
from gradproj.errors import ProtocolError

__all__ = ["CaptureEngine", "LayerCapture"]

class CaptureEngine(StepControl):
    """Per-model capture state shared by the optimizer wrapper and the layer handlers.

    Set-up (`attach`, `detach`, coverage) comes from
    `gradproj.capture.setup.EngineSetup`, the step-level operations from
    `gradproj.capture.step.StepControl`; this class runs the microbatches.

    Args:
        model: the module whose parameters the optimizer trains.
        settings: the engine's `gradproj.capture.setup.CaptureSettings`.
        strategies: the resolved strategies (`gradproj.work.ResolvedStrategies`).
        registry: the plugin registry (layer handlers).
    """

    # -- microbatches ----------------------------------------------------------------------
    def begin(self, logp: torch.Tensor, mask: torch.Tensor | None = None, cu_seqlens=None, position_ids=None, group_ids=None) -> Microbatch:
        """Open one microbatch: validate it (nothing changes if that fails), then hook ``logp`` and
        watch the backward calls until `close`."""
        if not self.attached:
            raise ProtocolError("this gradproj optimizer was detached; wrap the optimizer again to capture")
        if self.current is not None:
            raise ProtocolError(
                "opt.microbatch() blocks cannot be nested: close the current microbatch (its "
                "backward) before opening the next one"
            )
        if self._paused:
            raise ProtocolError("opt.microbatch() inside opt.paused(): leave the paused block first")
        self.check_complete("opt.microbatch()")
        mb = Microbatch(logp, mask, self.counters.in_step, cu_seqlens, position_ids, group_ids, self.step_groups)
        if self.data_parallel is not None:
            self.data_parallel.check_not_synced(mb.where)
        if self.sharded is not None and self.sharded.synced:
            raise ProtocolError(
                f"{mb.where}: the gradients of this step were already averaged and sharded "
                "(opt.sync_gradients()); call it after the last microbatch"
            )
        for transform in self.strategies.transforms:
            transform.validate_microbatch(mb.context)
        if self.needs_capture:
            self._check_coverage(mb.where)
            if isinstance(mb.layout, PaddedLayout):  # (packed layouts gather tokens into rows by design)
                check_row_order(logp, mb.where)
        if self._all_dropped:  # the NaN left for a GradScaler: this microbatch starts from nothing
            self._clear_grads()
            self._all_dropped = False
        mb.logp_edge = None if logp.grad_fn is None else (logp.grad_fn, logp.output_nr)
        mb.fresh = all(p.grad is None for p in self._written_params()) and self.sink.empty()
        if self.needs_capture and not mb.fresh and not self.sink.writes_directly and self.sharded is None:
            # the running gradient the strategies read: nothing may change it until the block closes
            mb.grads_seen = [(p, p.grad, -1 if p.grad is None else p.grad._version) for p in self._covered_params]
        handle = logp.register_hook(partial(self._on_logp_grad, mb))
        mb.logp, mb.hook_id, mb.hook_handle = logp, handle.id, handle
        mb.watcher = backward_watch.add_watcher(partial(self._on_backward_call, mb))
        self.current = mb
        self.monitor.start(logp, mb.mask)
        for strategy in self.strategies.all:
            strategy.start_microbatch()
        return mb

    def close(self, mb: Microbatch, failure: BaseException | None = None) -> None:
        """Close the microbatch `begin` opened: write its updates to ``.grad`` -- or, if
        ``failure`` is given (what ended the caller's code) or gradproj's own check failed in the
        backward, leave ``.grad`` exactly as the block found it.

        All-or-nothing: staged updates are discarded; where autograd or direct writes already changed
        ``.grad``, gradproj restores it when it was empty. Where that is impossible (strategy
        ``none`` or ``nonfinite="propagate"`` after earlier microbatches), the step is marked
        incomplete and refused until the gradients are zeroed.

        Raises:
            ProtocolError: ``mb`` is not the open microbatch; or the backward failed inside gradproj and
                the caller's code went on anyway (the microbatch is discarded).
        """
        if mb is not self.current:
            raise ProtocolError("close() of a microbatch that is not the open one (each begin() is closed once)")
        backward_watch.remove_watcher(mb.watcher)
        mb.hook_handle.remove()
        self.current = None
        if failure is not None:
            mb.failure = failure
        applied = False
        try:
            if failure is None and mb.error is None:
                try:
                    with torch.no_grad():  # grad mode is on again here; saved activations still require grad
                        self._finish_microbatch(mb)
                    applied = True
                except BaseException as err:
                    mb.error = err
                    raise
                finally:
                    if not applied:
                        self._abort(mb)
            else:
                self._abort(mb)
        finally:
            self.monitor.close(applied and not mb.dropped, mb.k)
            for strategy in self.strategies.all:
                strategy.end_microbatch()
        if failure is None and mb.error is not None and not applied:  # the caller caught gradproj's error
            raise ProtocolError(
                f"{mb.where} failed in its backward ({type(mb.error).__name__}: {mb.error}) and the block "
                "closed anyway; the microbatch was discarded (.grad is as before the block). Fix the "
                "cause and run it again."
            ) from mb.error

    def _abort(self, mb: Microbatch) -> None:
        """A failed microbatch: leave ``.grad`` as the block found it.

        Staged updates are simply discarded. Writes already made to ``.grad`` (autograd's own in a
        plain microbatch or without capture, direct writes with ``nonfinite="propagate"``) are undone
        by clearing the gradients when they were all empty before the block; otherwise the step is
        marked incomplete (`check_complete`)."""
        mb.drop()
        started = mb.fired or mb.backward_calls > 0 or not backward_watch.installed()
        if not started:
            return  # the error came before any backward: nothing was written
        if self.needs_capture and not mb.plain and not self.sink.writes_directly:
            return  # only staged
        if mb.fresh:
            self._clear_grads()
            return
        cause = mb.error or mb.failure
        self._broken = (
            f"{mb.where} failed after its backward had started adding to .grad "
            f"({type(cause).__name__ if cause is not None else 'interrupted'}), which cannot be undone "
            + ("with strategy 'none' (plain accumulation)" if not self.needs_capture else 'with nonfinite="propagate"')
        )

    def _on_backward_call(self, mb: Microbatch, roots) -> None:
        """Before each backward started inside the block (see `gradproj.capture.loss_terms`)."""
        mb.backward_calls += 1
        if self.needs_capture:  # (plain accumulation: any loss is exact)
            self.loss_terms(mb, roots)

    def _on_logp_grad(self, mb: Microbatch, grad: torch.Tensor):
        try:
            return self._logp_weights(mb, grad)
        except BaseException as err:
            mb.error = mb.error or err
            raise

    def _logp_weights(self, mb: Microbatch, grad: torch.Tensor):
        """The hook on ``logp``: record ``c`` (after the microbatch transforms) and return the
        gradient sent down -- the mask, or for a plain microbatch the loss's own weights."""
        mb.check_mask_unchanged()
        if mb.fired:
            raise ProtocolError(
                f"{mb.where}: the backward reached logp a second time; run exactly one backward per "
                "opt.microbatch() block (sum the losses first)"
            )
        mb.fired = True
        transforms = self.strategies.microbatch_transforms
        if not self.needs_capture and not transforms:
            return None
        coefficients = sequence_coefficients(grad, mb.mask, mb.where)
        if coefficients is None:
            mb.drop()
            return mb.seed
        for transform in transforms:
            coefficients = transform.transform_microbatch(coefficients, mb.context)
        mb.coefficients = coefficients
        if not self.needs_capture or (self._plain_when_no_grad and mb.fresh):
            # nothing captured (plain accumulation of transformed coefficients), or the first
            # microbatch of a step: G = 0 everywhere, so the update is the plain gradient
            mb.plain = True
            if not transforms:
                return None  # the loss's own weights
            return (mb.seed * coefficients.to(device=grad.device, dtype=grad.dtype)[:, None]).to(grad.dtype)
        return mb.seed

    @property
    def plain_backward(self) -> bool:
        """Whether captured layers should return ordinary gradients (read by handlers' backward).

        True while paused or detached (no block open), and in a microbatch that needs no sequence
        gradients (the first of a step, for rules that just add ``g_m`` to a zero ``G``).
        """
        mb = self.current
        if mb is None:
            return not self.capturing
        return mb.plain

    def on_backward(self, layer: LayerCapture, use) -> None:
        """Called (through ``layer.backward``) by a handler's backward with one use
        ``(inputs, output_grads)`` of ``layer``.

        The layer is finished -- its sequence gradients built and the strategy run -- once no
        captured forward of it is left waiting for its backward; otherwise (forwards of later
        microbatches already run, or a forward whose output was never used) when the block closes.
        """
        start = perf_counter()
        mb = self.current
        layer.pending = max(layer.pending - 1, 0)
        if mb is None:
            raise ProtocolError(
                f"the backward reached layer {layer.name!r} outside an opt.microbatch(logp, mask) "
                "block; run the loss's backward inside the block, or use opt.paused() for a plain "
                "backward"
            )
        try:
            if mb.dropped:
                return
            if mb.coefficients is None:
                raise ProtocolError(
                    f"{mb.where}: the backward reached layer {layer.name!r} before the log-probs given to "
                    "opt.microbatch(): the loss must depend on the trainable parameters only through "
                    "those log-probs"
                )
            mb.touched.add(layer)
            uses = mb.uses.setdefault(layer, [])
            uses.append(use)
            if layer.pending == 0:
                del mb.uses[layer]
                self.updates.finalize(layer, mb, uses)
        except BaseException as err:
            mb.error = mb.error or err
            raise
        finally:
            self.counters.capture_seconds += perf_counter() - start

    def _finish_microbatch(self, mb: Microbatch) -> None:
        """The block closed after a backward that raised nothing: apply, drop or poison."""
        if not mb.fired:
            raise ProtocolError(
                f"{mb.where}: the block closed but its backward never reached logp; call "
                "loss.backward() inside the block, with a loss computed from that logp tensor"
            )
        self._check_reached_model(mb)
        self.counters.closed(mb.k)
        if mb.plain and not self.needs_capture:
            return  # nothing captured: autograd accumulated (transformed) ordinary gradients
        if mb.plain:  # autograd accumulated ordinary gradients into grads that were all None
            written = [p.grad for p in self._covered_params if p.grad is not None]
            if written and not _all_finite(written):
                self._on_nonfinite(restore=True)
            return
        guards.refuse_edited_grads(mb.grads_seen, self._covered, mb.where)
        start = perf_counter()
        self.updates.finish(mb)
        self.counters.capture_seconds += perf_counter() - start
        # one read from the device for the whole microbatch: staged updates no rule vouched for,
        # .grad that took such updates directly (nonfinite="propagate": poisoned below), and the
        # rules' own finiteness flags
        if not mb.dropped and not _all_finite(mb.unverified + self.sink.unchecked(mb), mb.finite_flags):
            mb.drop()
        if mb.dropped:
            self._on_nonfinite()
        else:
            self.sink.apply(mb)
        mb.staged.clear()
        mb.uses.clear()
        mb.unverified.clear()
        mb.finite_flags.clear()
        mb.written.clear()

    def _on_nonfinite(self, restore: bool = False) -> None:
        """A non-finite microbatch: ``nonfinite="propagate"`` poisons every covered gradient;
        ``"drop"`` changes none (``restore``: clear what autograd wrote into empty gradients)."""
        self.counters.dropped += 1
        if self.settings.nonfinite == "propagate":
            self.sink.poison()
            return
        if restore:
            for param in self._covered_params:
                param.grad = None  # exactly the state before the microbatch
        self._mark_all_dropped()

    def _check_reached_model(self, mb: Microbatch) -> None:
        """The backward reached ``logp``: it must also have reached the wrapped model's parameters
        (log-probs computed by another model -- a copy -- would train nothing, silently)."""
        if mb.dropped:
            return
        if mb.plain or not self.needs_capture:
            if not mb.fresh or self._deferred_grads:
                # gradients already held, or FSDP2 holding them back until the step's last microbatch:
                # cannot tell what this backward added (a cheap check only)
                return
            reached = any(p.grad is not None for p in self._written_params())
        else:
            reached = bool(mb.touched) or bool(mb.staged) or bool(mb.filled) or bool(mb.written)
        if not reached and self._written_params():
            raise ProtocolError(
                f"{mb.where}: the backward reached logp but none of the wrapped model's trainable parameters: logp was "
                "not computed by the model given to wrap() (a copy, a reference model, another wrapper's inner "
                "module?). Compute the log-probs with the wrapped model"
            )

    def _mark_all_dropped(self) -> None:
        """``nonfinite="drop"``: a dropped microbatch changes no gradient -- but when every
        microbatch of the step so far was dropped (all gradients still empty), leave NaN in them,
        as plain autograd would after an fp16 overflow: a ``GradScaler`` then skips the step and
        lowers its scale (with no gradient at all it would fail its own assertion). The next
        microbatch starts from empty gradients again, and `check_step` makes ``step()``
        apply nothing while the NaN is there."""
        if self._all_dropped or not all(p.grad is None for p in self._covered_params) or not self.sink.empty():
            return
        self.sink.poison()
        self._all_dropped = True


def _all_finite(tensors: list[torch.Tensor], flags: Sequence[torch.Tensor] = ()) -> bool:
    """Whether every tensor is finite and every flag true: one reduction, one read from the device
    (no NaN/inf may reach ``.grad``)."""
    checks = [flag.to(torch.bool) for flag in flags]
    if tensors:
        checks.append(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all())
    if not checks:
        return True
    devices = {check.device for check in checks}
    if len(devices) > 1:  # (a model spread over devices: one read per device)
        return all(bool(torch.stack([c for c in checks if c.device == d]).all()) for d in devices)
    return bool(torch.stack(checks).all())
