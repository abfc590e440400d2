"""Attaching an engine to a model, detaching it, and keeping its coverage honest.

`EngineSetup.attach` builds the `gradproj.capture.plan.CapturePlan` (every refusal
first), then installs the handlers, a guard hook per covered parameter (an ordinary gradient
reaching one during a captured microbatch means a use outside its covered module), the DDP/FSDP2
adapters and the gradient sink. `EngineSetup._check_coverage` runs when each microbatch
opens: parameters or modules added, or made trainable, after ``wrap()`` are refused.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.utils.hooks import unserializable_hook

from gradproj.capture import backward_watch, guards
from gradproj.capture.data_parallel import DataParallelSync, is_ddp
from gradproj.capture.layer_updates import LayerUpdates
from gradproj.capture.loss_terms import LossTermCheck
from gradproj.capture.microbatch import Microbatch
from gradproj.capture.plan import CapturePlan, build_plan
from gradproj.capture.sharded import ShardedGradients, is_sharded
from gradproj.capture.sinks import GradientSink, make_sink
from gradproj.capture.step_metrics import StepMetrics
from gradproj.diagnostics.gradients import GradientDiagnostics
from gradproj.diagnostics.lora import LoraKLBound
from gradproj.diagnostics.update_monitor import StepReading, UpdateMonitor
from gradproj.errors import CoverageError, ProtocolError
from gradproj.plugins.manager import Registry
from gradproj.work import ResolvedStrategies, StepGroups

__all__ = ["CaptureSettings", "EngineSetup", "ENGINES"]

#: the engine attached to each wrapped model (not an attribute of the model: copies and pickles of
#: a wrapped model carry no gradproj state)
ENGINES: weakref.WeakKeyDictionary[nn.Module, EngineSetup] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class CaptureSettings:
    """The engine's share of `gradproj.GradProjConfig` (a plain value).

    Attributes:
        exclude: glob patterns of parameters to freeze and leave alone.
        gram: ``"auto"``, ``"materialize"`` or ``"ghost"`` (how linear layers represent sequence gradients).
        nonfinite: ``"drop"`` or ``"propagate"``.
        diagnostics: gather gradient diagnostics (turns the capture on).
        lora_bound: report the LoRA rank KL bound.
        kl_estimate: estimate each update's per-step KL (turns the capture on).
    """

    exclude: list[str] = field(default_factory=list)
    gram: str = "auto"
    nonfinite: str = "drop"
    diagnostics: bool = False
    lora_bound: bool = False
    kl_estimate: bool = False


class EngineSetup:
    """The state of a capture engine, its set-up and its coverage checks (the base of
    `gradproj.capture.step.StepControl`, itself the base of
    `gradproj.capture.engine.CaptureEngine`)."""

    def __init__(self, model: nn.Module, settings: CaptureSettings, strategies: ResolvedStrategies, registry: Registry) -> None:
        self.model = model
        self.settings = settings
        self.strategies = strategies
        self.registry = registry
        self.needs_capture = strategies.needs_capture or settings.diagnostics or settings.kl_estimate
        self.diagnostics = GradientDiagnostics() if settings.diagnostics else None
        #: entropy and per-step KL estimate (the parameters are known once attached)
        self.monitor = UpdateMonitor([], settings.kl_estimate)
        self.lora_bound: LoraKLBound | None = None
        #: gradient synchronisation of a DDP model, taken over from DDP while capturing
        self.data_parallel: DataParallelSync | None = None
        #: FSDP2: rank-local running gradients of the (sharded) covered parameters
        self.sharded: ShardedGradients | None = None
        self.plan = CapturePlan()
        self.sink: GradientSink = make_sink(settings.nonfinite, [], {}, None)
        self.counters = StepMetrics()
        self.updates = LayerUpdates(self.plan, self.sink, strategies, settings.gram, self.counters, self.diagnostics, self.monitor)
        self.loss_terms = LossTermCheck(self, {})
        self.step_groups: StepGroups | None = None
        self.current: Microbatch | None = None
        self.attached = False
        self._paused = 0
        self._guards: list = []
        self._params: list[torch.nn.Parameter] = []
        self._plain_when_no_grad = False
        self.steps = 0
        self._last_metrics: dict[str, float] | None = None
        self._last_reading: StepReading | None = None  # the last step's monitor sums, read on demand
        #: why the running gradient is incomplete (a failed microbatch that could not be undone)
        self._broken: str | None = None
        #: nonfinite="drop": every microbatch so far was dropped and .grad holds NaN for GradScaler
        self._all_dropped = False
        self._batch_norms: list[nn.Module] = []  # they mix the sequences of a microbatch in training mode
        self._deferred_grads = False
        self._registrations_seen = 0
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.counters.reset()
        for strategy in self.strategies.all:
            strategy.reset_metrics()
        if self.diagnostics is not None:
            self.diagnostics.reset()
        self.monitor.reset()

    # views of the plan (what is covered)
    layers = property(lambda self: self.plan.layers, doc="The covered modules (`LayerCapture` s).")
    _covered = property(lambda self: self.plan.covered)
    _covered_params = property(lambda self: self.plan.covered_params)
    _shared = property(lambda self: self.plan.shared)
    _groups = property(lambda self: self.plan.groups)

    @property
    def capturing(self) -> bool:
        """True while handlers should capture (attached, not paused, a strategy needs it)."""
        return self.attached and not self._paused and self.needs_capture

    def attach(self) -> None:
        """Install handlers on every covered module; refuse uncovered trainable parameters.

        Nothing is changed unless every check passes.
        """
        if ENGINES.get(self.model) is not None:
            raise ProtocolError(
                "this model is already wrapped by a gradproj optimizer; call .detach() on that one "
                "before wrapping the model again"
            )
        settings, strategies = self.settings, self.strategies
        kernels_off = guards.turn_off_hub_kernels(self.model) if self.needs_capture else []
        try:
            lora_bound = LoraKLBound(self.model) if settings.lora_bound else None
            plan = build_plan(
                self, self.model, self.registry, settings.exclude, self.needs_capture, strategies.needs_tokens,
                "+".join(strategies.names),
            )
            if plan.layers:
                guards.refuse_sequence_first(self.model)
        except BaseException:
            guards.restore_hub_kernels(kernels_off)  # nothing changed
            raise
        for param in plan.frozen:
            param.requires_grad_(False)
        for layer in plan.layers:
            layer.uninstall = layer.handler.install(layer.module, layer)
            layer.installed = layer.module.__dict__.get("forward")
            for _attr, param, qname in layer.params:
                guard = unserializable_hook(partial(self._guard, qname))  # torch.save(model): no warning
                self._guards.append(param.register_hook(guard))
        self.plan = plan
        self._plain_when_no_grad = (
            not strategies.layer_transforms and self.diagnostics is None and not settings.kl_estimate
            and strategies.accumulate.capabilities.plain_when_no_grad
        )
        self.lora_bound = lora_bound
        if self.needs_capture and is_ddp(self.model):
            self.data_parallel = DataParallelSync(self.model)  # type: ignore[arg-type]  # (is_ddp)
        if self.needs_capture and is_sharded(plan.covered_params):
            self.sharded = ShardedGradients(plan.covered_params)
            self._plain_when_no_grad = False  # every microbatch goes through the rank-local gradients
        self.sink = make_sink(settings.nonfinite, plan.covered_params, plan.batched, self.sharded)
        self._params = list(self.model.parameters())
        self.monitor = UpdateMonitor(self._params, settings.kl_estimate)
        self.updates = LayerUpdates(plan, self.sink, strategies, settings.gram, self.counters, self.diagnostics, self.monitor)
        self.loss_terms = LossTermCheck(self, plan.covered)
        self._batch_norms = guards.batch_norms(self.model)
        #: sharded (DTensor) parameters: without capture, FSDP2 may keep .grad empty between microbatches
        self._deferred_grads = is_sharded(self._params)
        backward_watch.install()
        guards.watch_registrations()
        self._registrations_seen = guards.registrations()
        ENGINES[self.model] = self
        self.attached = True

    def detach(self) -> None:
        """Remove every handler and hook and unfreeze what ``exclude`` froze (idempotent)."""
        if not self.attached:
            return
        if self.current is not None:
            raise ProtocolError("detach() called inside opt.microbatch(...); close the block first")
        for layer in self.layers:
            if layer.uninstall is not None:
                layer.uninstall()
        for handle in self._guards:
            handle.remove()
        for param in self.plan.frozen:
            param.requires_grad_(True)
        if self.data_parallel is not None:
            self.data_parallel.release()
            self.data_parallel = None
        self.sharded = None
        self._guards = []
        # nothing installed any more; what was covered is still known (the optimizer checks a
        # microbatch's parameters against it before the engine refuses the detached optimizer)
        for group in self.plan.groups:
            group.release()
        self.updates.release()
        self.monitor.release()  # the kept update (a copy of the parameters) goes with the hooks
        self.plan = CapturePlan(covered=self.plan.covered, covered_params=self.plan.covered_params)
        self.sink = make_sink(self.settings.nonfinite, [], {}, None)
        self.updates = LayerUpdates(self.plan, self.sink, self.strategies, self.settings.gram, self.counters, self.diagnostics)
        if ENGINES.get(self.model) is self:
            del ENGINES[self.model]
        self.attached = False

    def _guard(self, qname: str, grad: torch.Tensor | None):
        # Captured layers return no gradient for their parameters (the hook then sees None);
        # a real tensor here means some other use of the parameter produced one.
        if grad is not None and self.current is not None and self.capturing and not self.current.plain:
            raise CoverageError(
                f"parameter {qname} received an ordinary gradient during a captured microbatch: it is "
                "used outside the module gradproj covers (tied weights, a functional call such as a "
                "fused lm_head, or a second module), or the forward ran without capture (under "
                "opt.paused(), or before wrap()). Its gradient would be wrong; exclude and freeze it, route "
                "all its uses through the covered module, or compute the log-probs with capture on."
            )
        return None

    def covers(self, param: torch.Tensor) -> bool:
        """Whether gradproj captures this parameter's gradient (a covered, trainable parameter)."""
        return id(param) in self.plan.covered

    def _check_coverage(self, where: str) -> None:
        covered = self.plan.covered
        guards.refuse_training_batch_norms(self._batch_norms, where)
        guards.refuse_replaced_forwards(self.plan.layers, where)
        if guards.registrations() != self._registrations_seen:  # modules or parameters added since: rescan
            self._registrations_seen = guards.registrations()
            known = {id(p) for p in self._params}
            self._params += [p for p in self.model.parameters() if id(p) not in known]
        if all(id(p) in covered for p in self._params if p.requires_grad):
            return
        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in covered]
        if bad:
            raise CoverageError(
                f"{where}: trainable parameter(s) {guards.list_names(bad)} became trainable or were added to the model "
                "after wrap() and are not covered (their gradients would come from the unweighted log-prob "
                "gradients); freeze them again, or detach() and wrap() the optimizer anew"
            )

    def _written_params(self) -> list[torch.nn.Parameter]:
        """The parameters whose ``.grad`` a microbatch may change (covered, or every trainable one
        when nothing is captured)."""
        return self.plan.covered_params if self.needs_capture else [p for p in self._params if p.requires_grad]

    def _clear_grads(self) -> None:
        for param in self._written_params():
            param.grad = None
        self.sink.reset()

    @contextmanager
    def paused(self):
        """Disable capture inside the block (forwards and backwards behave as without gradproj)."""
        if self.current is not None:
            raise ProtocolError("opt.paused() inside opt.microbatch(...): close the microbatch first")
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
