"""``GradProjOptimizer`` and ``wrap``: the one-line entry point.

The wrapper is a real `torch.optim.Optimizer` that *shares* the inner optimizer's
``param_groups``, ``state`` and ``defaults`` through properties (like accelerate's
``AcceleratedOptimizer``), so LR schedulers, ``GradScaler``, HF Trainer/accelerate and
``clip_grad_norm_`` act on the inner optimizer unchanged. The running gradient lives in
``param.grad``; there is no hidden accumulator.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from gradproj.capture.engine import CaptureEngine
from gradproj.config import GradProjConfig
from gradproj.errors import CheckpointError, CoverageError, ProtocolError
from gradproj.microbatch_handle import MicrobatchHandle
from gradproj.state import STATE_KEY, check_gradproj_state, gradproj_state

__all__ = ["GradProjOptimizer"]


def _inner_attribute(name: str, doc: str) -> property:
    """A property reading, setting and deleting the inner optimizer's attribute ``name``."""
    return property(
        lambda self: getattr(self.optimizer, name),
        lambda self, value: setattr(self.optimizer, name, value),
        lambda self: delattr(self.optimizer, name),
        doc=doc,
    )


class GradProjOptimizer(torch.optim.Optimizer):
    """An optimizer whose gradients are accumulated by a gradproj strategy.

    Do not construct it directly; use `gradproj.wrap`.

    Attributes:
        optimizer: the wrapped (inner) optimizer.
        config: the `GradProjConfig` in force.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, engine: CaptureEngine, config: GradProjConfig) -> None:
        # Deliberately no Optimizer.__init__: param_groups/state/defaults are the inner ones.
        self.optimizer = optimizer
        self._engine = engine
        self.config = config
        self._in_step = False
        # the inner optimizer stepped directly (a kept reference to it) does what step() does
        # (optimizers that bypass Optimizer.__init__, e.g. torch_optimizer's Lookahead, have no hooks)
        try:
            self._inner_hooks = [
                optimizer.register_step_pre_hook(self._before_inner_step),
                optimizer.register_step_post_hook(self._after_inner_step),
            ]
        except AttributeError:
            self._inner_hooks = []

    # -- delegation ------------------------------------------------------------------------
    @property
    def param_groups(self):
        """The inner optimizer's ``param_groups`` (the same list object)."""
        if self._engine.current is not None and _called_by_grad_scaler():
            raise ProtocolError(
                "GradScaler.unscale_(opt) inside an open opt.microbatch() block: the block's update is added to .grad "
                "when the block closes, so it would stay scaled. Unscale (and clip) once, after the step's last block"
            )
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    state = _inner_attribute("state", "The inner optimizer's ``state``.")
    defaults = _inner_attribute("defaults", "The inner optimizer's ``defaults``.")
    # GradScaler hands optimizers that unscale inside their own step (fused Adam/AdamW/SGD:
    # ``_step_supports_amp_scaling``, read from the inner optimizer) the scale and the inf flag as
    # attributes of the optimizer it steps: they must reach the inner one.
    grad_scale = _inner_attribute("grad_scale", "The inner optimizer's ``grad_scale`` (set by ``GradScaler.step``).")
    found_inf = _inner_attribute("found_inf", "The inner optimizer's ``found_inf`` (set by ``GradScaler.step``).")

    def step(self, closure=None):
        """Run the inner optimizer's step on the accumulated ``.grad`` and close the step's metrics.

        With ``nonfinite="drop"``, a step whose every microbatch was dropped as non-finite applies
        nothing (``gradproj/step_skipped`` is 1) and its gradients are cleared.

        Raises:
            ProtocolError: a microbatch block is still open, or a failed microbatch left the running
                gradient incomplete (zero the gradients and run the step again).
        """
        self._engine.check_idle("optimizer.step()")
        if not self._engine.check_step():  # every microbatch was dropped: .grad holds NaN markers
            self._engine.end_step(skipped=True)
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self._engine.sync_gradients()  # DDP: average over the ranks, unless sync_gradients() already did
        self._in_step = True
        hooked = bool(self._inner_hooks)
        try:
            if not hooked:  # (an inner optimizer without step hooks: the monitor is told here)
                self._engine.monitor.before_update()
            result = self.optimizer.step() if closure is None else self.optimizer.step(closure)
            if not hooked:
                self._engine.monitor.after_update()
        finally:
            self._in_step = False
        self._engine.end_step()
        return result

    def _before_inner_step(self, optimizer, args, kwargs) -> None:
        """The inner optimizer's own ``step()`` called directly: the same checks and data-parallel
        averaging as `step` (otherwise DDP ranks would step on their local gradients and
        FSDP2 parameters on no gradient at all)."""
        if not self._engine.attached:
            return
        engine = self._engine
        if not self._in_step:  # (step() made these checks already)
            engine.check_idle("the inner optimizer's step()")
            if not engine.check_step():
                raise ProtocolError(
                    "the inner optimizer's step() was called although every microbatch of this step was dropped as "
                    "non-finite (.grad holds NaN markers); call opt.step() (which skips the step) or opt.zero_grad()"
                )
            engine.sync_gradients()
        engine.monitor.before_update()  # (kl_estimate: the parameters before the update)

    def _after_inner_step(self, optimizer, args, kwargs) -> None:
        if self._engine.attached:
            self._engine.monitor.after_update()
        if not self._in_step and self._engine.attached:
            self._engine.end_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) the gradients: the next microbatch starts a new running gradient.

        Microbatches run since the last ``step()`` (a ``GradScaler`` skipped it, or the step is
        abandoned) close their step's metrics here, as a skipped step."""
        engine = self._engine
        engine.check_idle("optimizer.zero_grad()")
        self.optimizer.zero_grad(set_to_none=set_to_none)
        if engine.sharded is not None:  # FSDP2: the rank-local running gradients start anew
            engine.sharded.reset()
        engine.clear_incomplete()
        if engine.step_pending():
            engine.end_step(skipped=True)

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group to the inner optimizer (its parameters must be covered)."""
        engine = self._engine
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if engine.needs_capture:
            bad = [p for p in params if p.requires_grad and id(p) not in engine._covered]
            if bad:
                raise CoverageError(
                    f"add_param_group: {len(bad)} parameter(s) are not covered by gradproj's layer "
                    "handlers (not part of the wrapped model's covered modules); detach() and wrap() "
                    "again after changing which parameters train"
                )
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        """The inner optimizer's state dict plus gradproj's own under the ``"gradproj"`` key."""
        state = self.optimizer.state_dict()
        state[STATE_KEY] = gradproj_state(self.config, self._engine.strategies.names, self._engine.steps)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a dict written by `state_dict` (or a plain inner state dict).

        gradproj's entry is checked first and applied only after the inner optimizer accepted its
        own, so a refused checkpoint changes nothing.

        Raises:
            CheckpointError: the gradproj entry is malformed, of another version, or was written with
                another strategy or other options.
        """
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"load_state_dict() needs the dict state_dict() wrote, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        ours = state_dict.pop(STATE_KEY, None)
        steps = None if ours is None else check_gradproj_state(ours, self.config, self._engine.strategies.names)
        self.optimizer.load_state_dict(state_dict)
        if steps is not None:
            self._engine.steps = steps

    def register_step_pre_hook(self, hook):
        """Delegated to the inner optimizer."""
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook):
        """Delegated to the inner optimizer."""
        return self.optimizer.register_step_post_hook(hook)

    def register_state_dict_pre_hook(self, hook, prepend: bool = False):
        """Delegated to the inner optimizer."""
        return self.optimizer.register_state_dict_pre_hook(hook, prepend=prepend)

    def register_state_dict_post_hook(self, hook, prepend: bool = False):
        """Delegated to the inner optimizer."""
        return self.optimizer.register_state_dict_post_hook(hook, prepend=prepend)

    def register_load_state_dict_pre_hook(self, hook, prepend: bool = False):
        """Delegated to the inner optimizer."""
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend=prepend)

    def register_load_state_dict_post_hook(self, hook, prepend: bool = False):
        """Delegated to the inner optimizer."""
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend=prepend)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not found normally: optimizer-specific extras
        # (e.g. Lookahead's ``base_optimizer``) come from the inner optimizer.
        if name in ("optimizer", "_engine", "config", "_in_step", "_inner_hooks"):
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __getstate__(self):
        raise TypeError("GradProjOptimizer holds hooks on a live model and cannot be pickled; save state_dict()")

    def __repr__(self) -> str:
        return f"GradProjOptimizer(strategy={self.config.strategy!r}, optimizer={self.optimizer!r})"

    # -- gradproj API ----------------------------------------------------------------------
    def microbatch(
        self,
        logp: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        group_ids: torch.Tensor | Sequence[Hashable] | None = None,
    ) -> AbstractContextManager:
        """Context manager around one microbatch's loss and backward.

        Args:
            logp: (sequences, tokens) log-probs of the sampled tokens, computed with grad enabled
                by the model this optimizer wraps; row i belongs to sequence i.
            mask: same shape, bool or 0/1: which tokens count (the response mask). ``None``: all.
            cu_seqlens: for packed / remove-padding batches (activations of shape (1, total, d)):
                the k+1 sequence boundaries in the packed token order (flash-attention convention).
            position_ids: alternatively, the packed position ids (each sequence restarts at 0).
            group_ids: the prompt group of each row (a 1-D int tensor or a list of labels), for
                strategies and diagnostics that work per group (``variance_scaling``); the groups'
                rewards come from `set_groups`.

        The loss built inside must be ``sum_i c_i sum_t mask[i,t] logp[i,t]`` up to per-sequence
        constants (REINFORCE/GRPO, token-mean or sequence-mean aggregation, gradient accumulation
        scaling); a loss whose weights vary along a row raises `CoefficientError`.
        When the block closes, ``param.grad`` holds the new running gradient. If anything fails
        inside the block (an error in the backward, an exception of your own after it, an
        interrupt), ``.grad`` is left as the block found it and the microbatch can be run again.

        Raises:
            CoverageError: the inner optimizer holds a trainable parameter gradproj does not cover
                (given to it after ``wrap()``), or a covered parameter was replaced.
        """
        return self._block(logp, mask, cu_seqlens, position_ids, group_ids)

    @contextmanager
    def _block(self, logp, mask, cu_seqlens, position_ids, group_ids):
        # opened on entering the with statement (nothing is checked or hooked before)
        handle = self.begin_microbatch(logp, mask, cu_seqlens=cu_seqlens, position_ids=position_ids, group_ids=group_ids)
        try:
            yield handle.microbatch
        except BaseException as exc:
            handle.close(exc)
            raise
        handle.close()

    def begin_microbatch(
        self,
        logp: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        group_ids: torch.Tensor | Sequence[Hashable] | None = None,
    ) -> MicrobatchHandle:
        """`microbatch` without the ``with`` statement, for training frameworks whose loss and
        backward run in different methods (the TRL and verl adapters use it)::

            handle = opt.begin_microbatch(logp, mask)
            try:
                loss.backward()
            except BaseException as exc:
                handle.close(exc)
                raise
            handle.close()

        Same arguments, checks and guarantees as `microbatch`.
        """
        self._check_optimizer_params()
        return MicrobatchHandle(self._engine, self._engine.begin(logp, mask, cu_seqlens, position_ids, group_ids))

    @property
    def captures(self) -> bool:
        """Whether gradproj captures per-sequence gradients (``False`` for plain accumulation, strategy
        ``none`` without diagnostics: then any loss and any pipeline setting is fine)."""
        return self._engine.needs_capture

    def covers(self, param: torch.Tensor) -> bool:
        """Whether gradproj captures this parameter's gradient (a covered, trainable parameter)."""
        return self._engine.covers(param)

    def running_metrics(self) -> dict[str, float]:
        """``gradproj/...`` metrics of the step in progress (`metrics` gives the last step's)."""
        return self._engine.running_metrics()

    def _check_optimizer_params(self) -> None:
        """Every trainable parameter the inner optimizer holds must be covered (a layer trained
        through the inner optimizer's own ``add_param_group``, or swapped into a param group, after
        ``wrap()`` would get unprojected gradients)."""
        engine = self._engine
        if not engine.needs_capture:
            return
        covered = engine._covered
        bad = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad and id(p) not in covered]
        if bad:
            names = {id(p): n for n, p in engine.model.named_parameters()}
            shown = [names.get(id(p), f"<a {tuple(p.shape)} tensor outside the model>") for p in bad[:6]]
            raise CoverageError(
                f"the optimizer holds {len(bad)} trainable parameter(s) that gradproj does not cover "
                f"({', '.join(shown)}{' ...' if len(bad) > 6 else ''}): unfrozen, given to the inner optimizer or "
                "swapped into its param groups after wrap(), so their gradients would not be projected. Freeze "
                "them again, or call opt.detach() and wrap() the optimizer again after changing which parameters "
                "train (opt.add_param_group() checks what it adds)"
            )

    def set_groups(self, group_ids: torch.Tensor | Sequence[Hashable], rewards: torch.Tensor | Sequence[float]) -> None:
        """Give the step's prompt groups and rewards, once per step, before its first microbatch.

        Args:
            group_ids: one label per sequence of the whole step (all microbatches): the prompt it
                answers (an int tensor, or a list of ints/strings).
            rewards: one reward per sequence, in the same order.

        Group statistics (e.g. each group's reward std for ``variance_scaling``) are computed over
        the whole step, so groups may be spread over several microbatches in any order; each
        ``opt.microbatch(..., group_ids=...)`` names the groups of its rows. Cleared by ``step()``.
        """
        self._engine.set_groups(group_ids, rewards)

    def sync_gradients(self) -> None:
        """With a ``DistributedDataParallel`` model: average ``.grad`` over the ranks now.

        gradproj runs DDP in ``no_sync`` mode (captured layers hand their gradients to the strategy,
        which DDP's reducer cannot see) and averages once per step. ``step()`` does it if you did not;
        call it yourself after the last microbatch when something must see the averaged gradient
        first (``clip_grad_norm_``, grad-norm logging). A no-op without DDP.
        """
        self._engine.sync_gradients()

    def paused(self) -> AbstractContextManager:
        """Context manager disabling capture (forward and backward behave as without gradproj)."""
        return self._engine.paused()

    def detach(self) -> torch.optim.Optimizer:
        """Remove every hook gradproj installed on the model and the inner optimizer; returns the
        inner optimizer."""
        self._engine.detach()
        for handle in self._inner_hooks:
            handle.remove()
        self._inner_hooks = []
        return self.optimizer

    def metrics(self) -> dict[str, float]:
        """``gradproj/...`` metrics of the last optimizer step (e.g. ``gradproj/proma/projected_fraction``)."""
        return self._engine.metrics()

    @property
    def steps(self) -> int:
        """Optimizer steps taken so far (saved in `state_dict`, restored by `load_state_dict`): what
        integrations key per-step randomness on, so that a resumed run repeats it."""
        return int(self._engine.steps)

    @property
    def engine(self) -> CaptureEngine:
        """The capture engine (layers covered, microbatch state): an internal object for tests and
        benchmarks; integrations use `begin_microbatch`, `captures`, `covers` and
        `running_metrics`."""
        return self._engine


def _called_by_grad_scaler() -> bool:
    """Whether the caller of the ``param_groups`` getter is torch's ``GradScaler`` (it rewrites
    ``.grad`` in place, without the version bump the engine's own check relies on)."""
    frame = sys._getframe(2)
    return frame is not None and str(frame.f_globals.get("__name__", "")).endswith("grad_scaler")
