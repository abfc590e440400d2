"""The capture engine: installs layer handlers on a model and runs strategies inside backward.

Life of one microbatch (``with opt.microbatch(logp, mask): loss.backward()``):

1. Forward (before the block, grad enabled): every covered module call goes through its handler,
   which counts the use (``layer.pending``: forwards whose backward has not arrived yet).
2. Backward reaches ``logp``: the hook records ``c_i`` and sends the mask down.
3. Backward reaches a covered module: the handler passes ``(inputs, output_grads)`` here. When no
   forward of the layer is left waiting for its backward, the strategy computes the update of each
   parameter tensor from ``G = param.grad`` and the sequence gradients; the update is *staged*.
4. The block closes: staged updates are written to ``param.grad`` (``G <- G + U``) -- all of them,
   or none if an error or a non-finite value occurred, so a failed microbatch can be retried.

Before the backward starts, its roots are checked for loss terms that reach the covered parameters
without passing through ``logp`` (:mod:`gradproj.capture.backward_watch`).

With ``nonfinite="propagate"`` step 3 adds each update to ``param.grad`` at once instead (no staged
copy of the gradient: less memory) and step 4 only checks for NaN/inf, making every gradient NaN
if it finds any.
"""

from __future__ import annotations

import fnmatch
import weakref
from contextlib import contextmanager
from functools import partial
from time import perf_counter

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils.hooks import unserializable_hook

from gradproj.capture import backward_watch, guards
from gradproj.capture.batching import BATCH_MAX_BYTES, BATCH_MAX_NUMEL, BATCH_ROWS_ESTIMATE, LayerBatch, ParamGroup
from gradproj.capture.data_parallel import DataParallelSync, is_ddp
from gradproj.capture.groups import StepGroups
from gradproj.capture.sharded import ShardedGradients, is_sharded
from gradproj.capture.handlers import compute_dtype
from gradproj.capture.layout import PaddedLayout, check_row_order
from gradproj.capture.microbatch import Microbatch, sequence_coefficients
from gradproj.config import GradProjConfig, ResolvedStrategies
from gradproj.diagnostics.gradients import GradientDiagnostics
from gradproj.diagnostics.lora import LoraKLBound
from gradproj.errors import CheckpointError, CoefficientError, CoverageError, LossTermError, ProtocolError
from gradproj.linalg.sequence_grads import Workspace
from gradproj.linalg.sum_grads import SumGrads
from gradproj.plugins.manager import Registry
from gradproj.strategies.base import LayerStep

__all__ = ["CaptureEngine", "LayerCapture", "STATE_VERSION"]

STATE_VERSION = 2
#: the engine attached to each wrapped model (not an attribute of the model: copies and pickles of
#: a wrapped model carry no gradproj state)
_ENGINES: "weakref.WeakKeyDictionary[nn.Module, CaptureEngine]" = weakref.WeakKeyDictionary()


class LayerCapture:
    """One covered module: its handler, its parameters and its forwards still awaiting a backward."""

    __slots__ = ("engine", "module", "name", "handler", "params", "kinds", "pending", "uninstall")

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
                if getattr(module, attr, None) is not param:
                    raise CoverageError(
                        f"parameter {qname} was replaced after wrap() (a new tensor was assigned to "
                        f"{self.name or 'the model'}.{attr}); gradproj still tracks the old one, so the new "
                        "one would get a wrong gradient. Build the optimizer over the new parameters and "
                        "wrap it again (opt.detach() first), or change the values in place "
                        "(with torch.no_grad(): param.copy_(...))"
                    )
        if not in_checkpoint_recomputation():
            self.pending += 1

    def plain_backward(self) -> bool:
        """Called once by the handler's backward: whether to return ordinary parameter gradients
        (paused, detached, or a microbatch that needs no sequence gradients) instead of handing
        the use to :meth:`CaptureEngine.on_backward`. A plain use is consumed here."""
        if self.engine.plain_backward:
            self.pending = max(self.pending - 1, 0)
            return True
        return False

    def __repr__(self) -> str:
        return f"LayerCapture({self.name!r}, {type(self.module).__name__})"


_top_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
#: reentrant torch.utils.checkpoint's autograd Function (its segment's graph is built only in the backward)
_CHECKPOINT_FUNCTION = getattr(torch.utils.checkpoint, "CheckpointFunction", None)


def in_checkpoint_recomputation() -> bool:
    """Whether this runs inside the recomputation of non-reentrant ``torch.utils.checkpoint``
    (its saved-tensor hooks are the innermost ones). A torch without this private hook stack
    answers False: recomputed forwards are then counted, which stays exact -- the layers only
    finish at the microbatch's close instead of during the backward."""
    if _top_saved_tensors_hooks is None:
        return False
    hooks = _top_saved_tensors_hooks(False)
    return hooks is not None and "_recomputation_hook" in getattr(hooks[0], "__qualname__", "")


#: With direct writes, deferred updates held before the rule is asked to finish them (bytes)
DEFERRED_WRITES_MAX_BYTES = 16 << 20

#: blocks of a blocked layer hold at least this many elements of its sequence gradients
BLOCK_MIN_NUMEL = 1 << 18


def _block_numel(params: list[torch.Tensor]) -> int:
    """The block size (elements per sequence) for layers far larger than all others.

    ``params``: the parameters whose sequence gradients may be materialised. A weight more than
    twice this size (typically a large vocabulary's lm_head) is materialised a
    block at a time (:class:`gradproj.linalg.sequence_grads.BlockedLinearGrads`), so the
    workspace is sized by the second-largest parameter, not by that one.
    """
    sizes = sorted({id(p): p.numel() for p in params}.values(), reverse=True)
    return max(sizes[1] if len(sizes) > 1 else 0, BLOCK_MIN_NUMEL)


_list_names = guards.list_names


class CaptureEngine:
    """Per-model capture state shared by the optimizer wrapper and the layer handlers.

    Args:
        model: the module whose parameters the optimizer trains.
        config: the validated :class:`GradProjConfig`.
        strategies: the strategies resolved from ``config``.
        registry: the plugin registry (layer handlers).
    """

    def __init__(self, model: nn.Module, config: GradProjConfig, strategies: ResolvedStrategies, registry: Registry) -> None:
        self.model = model
        self.config = config
        self.strategies = strategies
        self.registry = registry
        self.needs_capture = strategies.needs_capture or config.diagnostics
        self.diagnostics = GradientDiagnostics() if config.diagnostics else None
        self.lora_bound: LoraKLBound | None = None
        #: gradient synchronisation of a DDP model, taken over from DDP while capturing
        self.data_parallel: DataParallelSync | None = None
        #: FSDP2: rank-local running gradients of the (sharded) covered parameters
        self.sharded: ShardedGradients | None = None
        self._mb_transforms = strategies.microbatch_transforms
        self._layer_transforms = strategies.layer_transforms
        #: the step's prompt groups and rewards (``opt.set_groups``), cleared by ``end_step``
        self.step_groups: StepGroups | None = None
        self.layers: list[LayerCapture] = []
        self.current: Microbatch | None = None
        self.attached = False
        self._paused = 0
        self._frozen: list[torch.nn.Parameter] = []
        self._guards: list = []
        self._covered: dict[int, str] = {}
        self._params: list[torch.nn.Parameter] = []
        self._covered_params: list[torch.nn.Parameter] = []
        self._plain_when_no_grad = False
        self._workspace = Workspace()
        self._scratch = Workspace()  # one layer's update, added straight to .grad (writes_directly)
        self._buffers: dict[int, torch.Tensor] = {}  # per-parameter update buffers, reused in a step
        self._batched: dict[int, tuple[ParamGroup, int]] = {}  # small parameters -> (group, row)
        self._shared: dict[int, list[LayerCapture]] = {}  # tied parameters -> the layers using them
        self._groups: list[ParamGroup] = []
        self.steps = 0
        self._last_metrics: dict[str, float] | None = None
        #: why the running gradient is incomplete (a failed microbatch that could not be undone)
        self._broken: str | None = None
        #: nonfinite="drop": every microbatch so far was dropped and .grad holds NaN for GradScaler
        self._all_dropped = False
        self._batch_norms: list[nn.Module] = []  # they mix the sequences of a microbatch in training mode
        self._deferred_grads = False
        self._registrations_seen = 0
        self._reset_counters()

    # -- set-up ----------------------------------------------------------------------------
    @property
    def capturing(self) -> bool:
        """True while handlers should capture (attached, not paused, a strategy needs it)."""
        return self.attached and not self._paused and self.needs_capture

    def _excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.config.exclude)

    def attach(self) -> None:
        """Install handlers on every covered module; refuse uncovered trainable parameters.

        Nothing is changed unless every check passes.
        """
        if _ENGINES.get(self.model) is not None:
            raise ProtocolError(
                "this model is already wrapped by a gradproj optimizer; call .detach() on that one "
                "before wrapping the model again"
            )
        lora_bound = LoraKLBound(self.model) if self.config.lora_bound else None
        named = list(self.model.named_parameters())
        to_freeze = [p for n, p in named if p.requires_grad and self._excluded(n)]
        frozen_ids = {id(p) for p in to_freeze}
        plan: list[LayerCapture] = []
        covered: dict[int, str] = {}
        uncovered_uses: list[str] = []
        if self.needs_capture:
            for mod_name, module in self.model.named_modules():
                own = [(a, p) for a, p in module.named_parameters(recurse=False) if p.requires_grad and id(p) not in frozen_ids]
                if not own:
                    continue
                handler = self.registry.handler_for(module)
                handled = set(handler.parameter_names) if handler is not None else set()
                params = []
                for attr, param in own:
                    qname = f"{mod_name}.{attr}" if mod_name else attr
                    if attr not in handled:
                        uncovered_uses.append(f"{qname} ({type(module).__name__})")
                        continue
                    covered.setdefault(id(param), qname)  # tied weights: one name, several modules
                    params.append((attr, param, covered[id(param)]))
                if params:
                    plan.append(LayerCapture(self, module, mod_name, handler, params))
            if uncovered_uses:
                raise CoverageError(
                    f"{len(uncovered_uses)} trainable parameter(s) are not covered by a gradproj layer "
                    f"handler: {_list_names(uncovered_uses)}. Their gradients would not be projected. "
                    "Freeze them (param.requires_grad_(False)), exclude them with "
                    "wrap(..., exclude=['<glob>']) (excluded parameters are frozen), or register a "
                    "handler for their module type."
                )
        if self.strategies.needs_tokens:
            self._check_tokens(plan)
        if plan:
            guards.refuse_sequence_first(self.model)
        for param in to_freeze:
            param.requires_grad_(False)
        self._frozen = to_freeze
        for layer in plan:
            layer.uninstall = layer.handler.install(layer.module, layer)
            for _attr, param, qname in layer.params:
                guard = unserializable_hook(partial(self._guard, qname))  # torch.save(model): no warning
                self._guards.append(param.register_hook(guard))
        self.layers = plan
        users: dict[int, list[LayerCapture]] = {}
        for layer in plan:
            for _, param, _ in layer.params:
                users.setdefault(id(param), []).append(layer)
        self._shared = {key: layers for key, layers in users.items() if len(layers) > 1}
        # handlers that fill slots are the ones that materialise k sequence gradients per weight
        self._workspace.block_numel = _block_numel([p for layer in plan if layer.handler.supports_slots for _, p, _ in layer.params])
        self._plan_batching(plan)
        self._covered = covered
        self._covered_params = [param for layer in plan for _, param, _ in layer.params]
        self._plain_when_no_grad = (
            not self._layer_transforms and self.diagnostics is None and self.strategies.accumulate.plain_when_no_grad
        )
        self.lora_bound = lora_bound
        if self.needs_capture and is_ddp(self.model):
            self.data_parallel = DataParallelSync(self.model)
        if self.needs_capture and is_sharded(self._covered_params):
            self.sharded = ShardedGradients(self._covered_params)
            self._plain_when_no_grad = False  # every microbatch goes through the rank-local gradients
        self._params = [p for _, p in named]
        self._batch_norms = guards.batch_norms(self.model)
        #: sharded (DTensor) parameters: without capture, FSDP2 may keep .grad empty between microbatches
        self._deferred_grads = is_sharded(self._params)
        backward_watch.install()
        guards.watch_registrations()
        self._registrations_seen = guards.registrations()
        _ENGINES[self.model] = self
        self.attached = True

    def _check_tokens(self, plan: list[LayerCapture]) -> None:
        """Strategies that need token-level factors: every covered layer must provide them."""
        rule = "+".join(s.name for s in self.strategies.specs)
        bad = [f"{layer.name} ({type(layer.module).__name__})" for layer in plan if not layer.handler.provides_tokens]
        if bad:
            raise CoverageError(
                f"strategy {rule} needs token-level factors (input and output-gradient subspaces), which "
                f"the handler of {_list_names(bad)} does not provide; exclude those parameters "
                "(wrap(..., exclude=['<glob>']) freezes them) or use strategy='proma'"
            )

    def _plan_batching(self, plan: list[LayerCapture]) -> None:
        """Group small parameters by (element count, compute dtype, device) within the memory budget.

        The budget is :data:`BATCH_MAX_BYTES`, and where some layer is too large to batch, no more
        than the workspace the largest such layer's materialised sequence gradients need anyway
        (one block of a blocked layer): batching then at most doubles gradproj's scratch memory.
        Smallest parameters are batched first.
        """
        groups: dict[tuple, ParamGroup] = {}
        if self.strategies.needs_tokens:
            self._groups = []
            return  # batched rows would lose the token-level factors the strategy needs
        candidates, largest = [], 0
        for layer in plan:
            for _attr, param, qname in layer.params:
                dtype = compute_dtype(param.dtype)
                cost = BATCH_ROWS_ESTIMATE * param.numel() * torch.finfo(dtype).bits // 8
                if layer.handler.supports_slots and id(param) not in self._shared and param.numel() <= BATCH_MAX_NUMEL:
                    candidates.append((param.numel(), cost, param, qname, dtype))
                elif param.requires_grad:  # tied weights are summed over their modules first
                    block = self._workspace.block_numel
                    if block is not None and param.numel() > 2 * block:  # materialised in blocks
                        cost = BATCH_ROWS_ESTIMATE * block * torch.finfo(dtype).bits // 8
                    largest = max(largest, cost)
        budget = BATCH_MAX_BYTES if largest == 0 else min(BATCH_MAX_BYTES, largest)
        for numel, cost, param, qname, dtype in sorted(candidates, key=lambda c: c[0]):
            if cost > budget:
                break
            budget -= cost
            key = (numel, dtype, param.device)
            if key not in groups:
                groups[key] = ParamGroup(numel, dtype, param.device)
            self._batched[id(param)] = (groups[key], groups[key].add(param, qname))
        self._groups = list(groups.values())

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
        for param in self._frozen:
            param.requires_grad_(True)
        if self.data_parallel is not None:
            self.data_parallel.release()
            self.data_parallel = None
        self.sharded = None
        self._guards, self._frozen, self.layers = [], [], []
        self._batched, self._groups, self._shared = {}, [], {}
        self._workspace.clear()
        if _ENGINES.get(self.model) is self:
            del _ENGINES[self.model]
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
        return id(param) in self._covered

    def _check_coverage(self, where: str) -> None:
        covered = self._covered
        guards.refuse_training_batch_norms(self._batch_norms, where)
        if guards.registrations() != self._registrations_seen:  # modules or parameters added since: rescan
            self._registrations_seen = guards.registrations()
            known = {id(p) for p in self._params}
            self._params += [p for p in self.model.parameters() if id(p) not in known]
        if all(id(p) in covered for p in self._params if p.requires_grad):
            return
        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in covered]
        if bad:
            raise CoverageError(
                f"{where}: trainable parameter(s) {_list_names(bad)} became trainable or were added to the model "
                "after wrap() and are not covered (their gradients would come from the unweighted log-prob "
                "gradients); freeze them again, or detach() and wrap() the optimizer anew"
            )

    # -- microbatches ----------------------------------------------------------------------
    def begin(self, logp: torch.Tensor, mask: torch.Tensor | None = None, cu_seqlens=None, position_ids=None, group_ids=None) -> Microbatch:
        """Open one microbatch: validate it (nothing changes if that fails), then hook ``logp`` and
        watch the backward calls until :meth:`close`."""
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
        mb = Microbatch(logp, mask, self._mb_in_step, cu_seqlens, position_ids, group_ids, self.step_groups)
        if self.data_parallel is not None:
            self.data_parallel.check_not_synced(mb.where)
        if self.sharded is not None and self.sharded.synced:
            raise ProtocolError(
                f"{mb.where}: the gradients of this step were already averaged and sharded "
                "(opt.sync_gradients()); call it after the last microbatch"
            )
        for transform in self.strategies.transforms:
            transform.validate_microbatch(mb)
        if self.needs_capture:
            self._check_coverage(mb.where)
            if isinstance(mb.layout, PaddedLayout):  # (packed layouts gather tokens into rows by design)
                check_row_order(logp, mb.where)
        if self._all_dropped:  # the NaN left for a GradScaler: this microbatch starts from nothing
            self._clear_grads()
            self._all_dropped = False
        mb.logp_edge = None if logp.grad_fn is None else (logp.grad_fn, logp.output_nr)
        mb.fresh = all(p.grad is None for p in self._written_params()) and (
            self.sharded is None or self.sharded.empty()
        )
        if self.needs_capture and not mb.fresh and not self.writes_directly and self.sharded is None:
            # the running gradient the strategies read: nothing may change it until the block closes
            mb.grads_seen = [(p, p.grad, -1 if p.grad is None else p.grad._version) for p in self._covered_params]
        handle = logp.register_hook(partial(self._on_logp_grad, mb))
        mb.logp, mb.hook_id, mb.hook_handle = logp, handle.id, handle
        mb.watcher = backward_watch.add_watcher(partial(self._on_backward_call, mb))
        self.current = mb
        for strategy in self.strategies.all:
            strategy.start_microbatch()
        return mb

    def close(self, mb: Microbatch, failure: BaseException | None = None) -> None:
        """Close the microbatch :meth:`begin` opened: write its updates to ``.grad`` -- or, if
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
                    self._finish(mb)
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
            for strategy in self.strategies.all:
                strategy.end_microbatch()
        if failure is None and mb.error is not None and not applied:  # the caller caught gradproj's error
            raise ProtocolError(
                f"{mb.where} failed in its backward ({type(mb.error).__name__}: {mb.error}) and the block "
                "closed anyway; the microbatch was discarded (.grad is as before the block). Fix the "
                "cause and run it again."
            ) from mb.error

    def _written_params(self) -> list[torch.Tensor]:
        """The parameters whose ``.grad`` a microbatch may change (covered, or every trainable one
        when nothing is captured)."""
        return self._covered_params if self.needs_capture else [p for p in self._params if p.requires_grad]

    def _clear_grads(self) -> None:
        for param in self._written_params():
            param.grad = None
        if self.sharded is not None:
            self.sharded.reset()

    def _abort(self, mb: Microbatch) -> None:
        """A failed microbatch: leave ``.grad`` as the block found it.

        Staged updates are simply discarded. Writes already made to ``.grad`` (autograd's own in a
        plain microbatch or without capture, direct writes with ``nonfinite="propagate"``) are undone
        by clearing the gradients when they were all empty before the block; otherwise the step is
        marked incomplete (:meth:`check_complete`)."""
        mb.drop()
        started = mb.fired or mb.backward_calls > 0 or not backward_watch.installed()
        if not started:
            return  # the error came before any backward: nothing was written
        staged_only = self.needs_capture and not mb.plain and not self.writes_directly
        if staged_only:
            return
        if mb.fresh:
            self._clear_grads()
            return
        self._broken = (
            f"{mb.where} failed after its backward had started adding to .grad "
            f"({type(mb.error or mb.failure).__name__ if (mb.error or mb.failure) is not None else 'interrupted'}), which cannot be undone "
            + ("with strategy 'none' (plain accumulation)" if not self.needs_capture else 'with nonfinite="propagate"')
        )

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

    def _on_backward_call(self, mb: Microbatch, roots) -> None:
        """Before each backward started inside the block: refuse loss terms that reach a covered
        parameter without passing through ``logp`` (see :mod:`gradproj.capture.backward_watch`)."""
        mb.backward_calls += 1
        if not self.needs_capture:
            return  # plain accumulation: any loss is exact
        later = [key for key in getattr(mb.logp, "_backward_hooks", None) or () if key > mb.hook_id]
        if later:
            mb.error = CoefficientError(
                f"{mb.where}: a hook was registered on logp inside the block, after gradproj's: it would change "
                "the unweighted gradient gradproj sends down (per-token weights that no check sees). Register it "
                "before opening the block (then gradproj sees its weights), or put the weights into the loss"
            )
            raise mb.error
        path = backward_watch.path_around(roots, mb.logp_edge, self._is_covered_node)
        if path is None:
            return
        target = path[-1]
        layer = getattr(target, "layer", None)
        where = f"layer {layer.name!r}" if isinstance(layer, LayerCapture) else self._covered.get(id(getattr(target, "variable", None)), "a covered parameter")
        chain = " -> ".join(backward_watch.node_name(node) for node in path[-8:])
        mb.error = LossTermError(
            f"{mb.where}: a term of the loss reaches {where} without passing through the log-probs given "
            f"to opt.microbatch() (backward path {'... -> ' if len(path) > 8 else ''}{chain}). gradproj "
            "re-weights each layer's gradient per sequence from the weights the loss puts on those "
            "log-probs, so such a term (an entropy bonus, a z-loss or other penalty on the logits, an MoE "
            "router auxiliary loss, a penalty on hidden states or weights, a second model output) would be "
            "scaled wrongly. Remove it from the loss -- shape the reward instead -- or use strategy='none', "
            "which accepts any loss. Nothing was changed."
        )
        raise mb.error

    def _is_covered_node(self, node) -> bool:
        """A captured layer's backward (its autograd Function's ctx carries the layer), the
        gradient accumulator of a covered parameter, or a reentrant checkpoint segment (whose
        layers the walk cannot see: it counts as reaching them)."""
        layer = getattr(node, "layer", None)
        if isinstance(layer, LayerCapture):
            return layer.engine is self
        if getattr(node, "_forward_cls", None) is _CHECKPOINT_FUNCTION:
            return True
        variable = getattr(node, "variable", None)  # AccumulateGrad of a leaf
        return variable is not None and id(variable) in self._covered

    def _on_logp_grad(self, mb: Microbatch, grad: torch.Tensor):
        try:
            return self._logp_weights(mb, grad)
        except BaseException as err:
            mb.error = mb.error or err
            raise

    def _logp_weights(self, mb: Microbatch, grad: torch.Tensor):
        mb.check_mask_unchanged()
        if mb.fired:
            raise ProtocolError(
                f"{mb.where}: the backward reached logp a second time; run exactly one backward per "
                "opt.microbatch() block (sum the losses first)"
            )
        mb.fired = True
        if not self.needs_capture and not self._mb_transforms:
            return None
        coefficients = sequence_coefficients(grad, mb.mask, mb.where)
        if coefficients is None:
            mb.drop()
            return mb.seed
        for transform in self._mb_transforms:
            coefficients = transform.transform_microbatch(coefficients, mb)
        mb.coefficients = coefficients
        if not self.needs_capture:  # plain accumulation of transformed coefficients
            mb.plain = True
            return self._weights(mb, grad)
        if self._plain_when_no_grad and mb.fresh:
            # First microbatch of a step: G = 0 everywhere, so the update is the plain gradient.
            # Keep the loss's weights and let every layer return ordinary gradients.
            mb.plain = True
            return self._weights(mb, grad)
        return mb.seed

    def _weights(self, mb: Microbatch, grad: torch.Tensor):
        """The loss weights for a plain backward: the loss's own, or ``mask * c'`` after transforms."""
        if not self._mb_transforms:
            return None
        return (mb.seed * mb.coefficients.to(device=grad.device, dtype=grad.dtype)[:, None]).to(grad.dtype)

    def on_backward(self, layer: LayerCapture, use) -> None:
        """Called by a handler's backward with one use ``(inputs, output_grads)`` of ``layer``.

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
                self._finalize(layer, mb, uses)
        except BaseException as err:
            mb.error = mb.error or err
            raise
        finally:
            self._capture_seconds += perf_counter() - start

    def _finalize(self, layer: LayerCapture, mb: Microbatch, uses) -> None:
        if layer in mb.finalized:
            raise ProtocolError(
                f"{mb.where}: layer {layer.name!r} received a use in the backward after its uses were already "
                "complete: its forward was run again during the backward (reentrant gradient checkpointing) in "
                "a segment other than the one counted -- the module is used in several checkpointed segments, or "
                "inside and outside one. Use non-reentrant checkpointing "
                "(gradient_checkpointing_kwargs={'use_reentrant': False}, or torch.utils.checkpoint(..., "
                "use_reentrant=False))"
            )
        mb.finalized.add(layer)
        slots = None
        for attr, param, _ in layer.params:
            entry = self._batched.get(id(param))
            if entry is not None and param.requires_grad:
                group, index = entry
                slots = slots or {}
                slots[attr] = group.slot(index, mb.k)
                mb.filled.setdefault(group, []).append(index)
        shared = any(id(param) in self._shared for _, param, _ in layer.params)
        # tied pieces outlive this call: a workspace of their own (still blocking an outlier layer)
        workspace = Workspace(self._workspace.block_numel) if shared else self._workspace
        seqs = layer.handler.sequence_gradients(layer, uses, mb.layout, self.config.gram, workspace, slots)
        for attr, param, qname in layer.params:
            seq = seqs.get(attr)
            if seq is None:
                continue
            if id(param) in self._shared:
                _, _, pieces = mb.pieces.setdefault(id(param), (param, qname, []))
                pieces.append(seq)
                expected = sum(1 for user in self._shared[id(param)] if user.pending > 0 or user in mb.touched)
                if len(pieces) < expected:
                    continue  # wait for the parameter's other modules
                del mb.pieces[id(param)]
                seq = pieces[0] if len(pieces) == 1 else SumGrads(pieces)
            self._accumulate(mb, param, qname, seq)

    @property
    def writes_directly(self) -> bool:
        """Whether updates go straight into ``param.grad`` as each layer finishes (no staging).

        Staging holds a whole extra gradient until the microbatch closes, so that a non-finite
        value anywhere can drop the microbatch without touching ``.grad``. With
        ``nonfinite="propagate"`` a non-finite microbatch makes every gradient NaN anyway, so
        nothing needs holding back (FSDP2's rank-local gradients are still staged).
        """
        return self.config.nonfinite == "propagate" and self.sharded is None

    def _accumulate(self, mb: Microbatch, param: torch.Tensor, qname: str, seq) -> None:
        """Run the accumulation rule for one parameter tensor and stage (or write) its update."""
        grad = self.running_grad(param)
        rule = self.strategies.accumulate
        if self.writes_directly:  # a rule that may defer gets fresh update tensors, not the scratch
            scratch = grad is not None and not rule.may_defer
            out = self._scratch.take(param.shape, compute_dtype(param.dtype), param.device) if scratch else None
        else:
            out = None if id(param) in mb.staged else self._buffers.get(id(param))
            if out is not None and out.shape != param.shape:
                out = None
        start = perf_counter()
        step = LayerStep(qname, param, grad, mb.coefficients, seq, out)
        # staged by reference (or, with direct writes, held) until finish_microbatch(): the rule may finish it later
        step.deferrable = (
            self.sharded is None and id(param) not in self._shared and (not self.writes_directly or rule.may_defer)
        )
        for transform in self._layer_transforms:
            step.coefficients = transform.transform_layer(step)
        if self.diagnostics is not None:
            self.diagnostics.observe(qname, seq.gram().cpu().numpy(), step.host_coefficients(), mb.group_ids)
        update = rule.accumulate(step)
        self._strategy_seconds += perf_counter() - start
        if step.deferred and not step.deferrable:
            raise ProtocolError(
                f"strategy {type(rule).__name__} deferred the update of {qname}, which this engine "
                "applies at once (step.deferrable is False); finish it in accumulate()"
            )
        if step.deferred and self.writes_directly:
            mb.deferred_writes.append((param, update))
            mb.deferred_bytes += update.numel() * update.element_size()
            if mb.deferred_bytes >= DEFERRED_WRITES_MAX_BYTES:
                self._finish_deferred(mb)
            return
        self._commit(mb, param, update, step.finite or step.deferred)

    def _finish_deferred(self, mb: Microbatch) -> None:
        """Have the rule finish its deferred updates; with direct writes, then add them to ``.grad``."""
        start = perf_counter()
        finished = self.strategies.accumulate.finish_microbatch()
        self._strategy_seconds += perf_counter() - start
        writes, mb.deferred_writes, mb.deferred_bytes = mb.deferred_writes, [], 0
        if not finished:
            mb.drop()
            return
        for param, update in writes:
            self._commit(mb, param, update, True)

    def _commit(self, mb: Microbatch, param: torch.Tensor, update: torch.Tensor, finite: bool) -> None:
        """Stage ``update`` until the microbatch closes, or (:attr:`writes_directly`) add it to
        ``param.grad`` now, remembering the parameter for the closing NaN check."""
        if not self.writes_directly:
            mb.stage(param, update, finite)
            return
        if param.grad is None:
            param.grad = update if update.dtype == param.dtype else update.to(param.dtype)
        else:
            param.grad.add_(update)
        if not finite:
            mb.written.append(param)

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

    def _finish(self, mb: Microbatch) -> None:
        # Runs after the backward returned, where grad mode is on again: nothing here may be
        # recorded by autograd (saved activations still require grad).
        with torch.no_grad():
            self._finish_microbatch(mb)

    def _finish_microbatch(self, mb: Microbatch) -> None:
        if not mb.fired:
            raise ProtocolError(
                f"{mb.where}: the block closed but its backward never reached logp; call "
                "loss.backward() inside the block, with a loss computed from that logp tensor"
            )
        self._check_reached_model(mb)
        self._microbatches += 1
        self._sequences += mb.k
        self._mb_in_step += 1
        if mb.plain and not self.needs_capture:
            return  # nothing captured: autograd accumulated (transformed) ordinary gradients
        if mb.plain:  # autograd accumulated ordinary gradients into grads that were all None
            written = [p.grad for p in self._covered_params if p.grad is not None]
            if written and not self._all_finite(written):
                self._dropped += 1
                if self.config.nonfinite == "propagate":
                    self._poison()
                    return
                for param in self._covered_params:
                    param.grad = None  # exactly the state before the microbatch
                self._mark_all_dropped()
            return
        guards.refuse_edited_grads(mb.grads_seen, self._covered, mb.where)
        start = perf_counter()
        for layer, uses in list(mb.uses.items()):  # layers whose forward count exceeded their backward
            if mb.dropped:
                break
            self._finalize(layer, mb, uses)
        for param, qname, pieces in list(mb.pieces.values()):  # tied: some modules got no gradient
            if mb.dropped:
                break
            self._accumulate(mb, param, qname, pieces[0] if len(pieces) == 1 else SumGrads(pieces))
        mb.pieces.clear()
        if not mb.dropped:
            self._finish_groups(mb)
            self._finish_deferred(mb)
        self._capture_seconds += perf_counter() - start
        if not mb.dropped and mb.unverified and not self._all_finite(mb.unverified):
            mb.drop()
        if not mb.dropped and mb.written and not self._all_finite([p.grad for p in mb.written]):
            mb.drop()  # only with writes_directly, i.e. nonfinite="propagate": poisoned below
        if mb.dropped:
            self._dropped += 1
            if self.config.nonfinite == "propagate":
                self._poison()
            else:
                self._mark_all_dropped()
        else:
            self._apply(mb)
        mb.staged.clear()
        mb.uses.clear()
        mb.unverified.clear()
        mb.written.clear()

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

    def _finish_groups(self, mb: Microbatch) -> None:
        """Run the strategy once per group of small parameters filled in this microbatch."""
        rule = self.strategies.accumulate
        for group, indices in mb.filled.items():
            batch = LayerBatch(group, indices, mb.coefficients, self.running_grad)
            start = perf_counter()
            for transform in self._layer_transforms:
                batch.coefficients = transform.transform_batch(batch)
            if self.diagnostics is not None:
                self._observe_batch(batch, mb)
            updates = rule.accumulate_batch(batch)
            self._strategy_seconds += perf_counter() - start
            for param, update in zip(batch.params, updates):
                self._commit(mb, param, update.view(param.shape), batch.finite)
        mb.filled.clear()

    def _observe_batch(self, batch: LayerBatch, mb: Microbatch) -> None:
        seqs = batch.sequence_grads
        grams = torch.bmm(seqs, seqs.transpose(1, 2)).double().cpu().numpy()
        coeffs = batch.coefficients.cpu().numpy()
        for index, name in enumerate(batch.names):
            self.diagnostics.observe(name, grams[index], coeffs if coeffs.ndim == 1 else coeffs[index], mb.group_ids)

    def running_grad(self, param: torch.Tensor) -> torch.Tensor | None:
        """The running gradient ``G`` of a covered parameter: ``param.grad``, or under FSDP2 the
        rank-local full-size one (``None`` = 0)."""
        return param.grad if self.sharded is None else self.sharded.get(param)

    def _poison(self) -> None:
        """``nonfinite="propagate"``: make every covered gradient NaN, as plain autograd would leave
        non-finite gradients, so a GradScaler (or any finiteness check) skips the optimizer step."""
        if self.sharded is not None:
            for param in self._covered_params:
                self.sharded.set(param, torch.full(param.shape, float("nan"), dtype=param.dtype, device=param.device))
            return
        for param in self._covered_params:
            if param.grad is None:
                param.grad = torch.full_like(param, float("nan"))
            else:
                param.grad.fill_(float("nan"))

    def _mark_all_dropped(self) -> None:
        """``nonfinite="drop"``: a dropped microbatch changes no gradient -- but when every
        microbatch of the step so far was dropped (all gradients still empty), leave NaN in them,
        as plain autograd would after an fp16 overflow: a ``GradScaler`` then skips the step and
        lowers its scale (with no gradient at all it would fail its own assertion). The next
        microbatch starts from empty gradients again, and :meth:`check_step` makes ``step()``
        apply nothing while the NaN is there."""
        if self._all_dropped or not all(p.grad is None for p in self._covered_params):
            return
        if self.sharded is not None and not self.sharded.empty():
            return
        self._poison()
        self._all_dropped = True

    @staticmethod
    def _all_finite(tensors: list[torch.Tensor]) -> bool:
        """One reduction over all staged updates (no NaN/inf may reach ``.grad``)."""
        norms = torch._foreach_norm(tensors)
        return bool(torch.isfinite(torch.stack(norms)).all())

    def _apply(self, mb: Microbatch) -> None:
        """``.grad <- .grad + U`` for every staged update (``.grad = U`` where it was None)."""
        if self.sharded is not None:
            for key, (param, update) in mb.staged.items():
                current = self.sharded.get(param)
                if current is None:
                    self.sharded.set(param, update if update.dtype == param.dtype else update.to(param.dtype))
                    self._buffers.pop(key, None)
                else:
                    current.add_(update)
                    if key not in self._batched and update.dtype in (torch.float32, torch.float64):
                        self._buffers[key] = update
            return
        grads, updates = [], []
        for key, (param, update) in mb.staged.items():
            if param.grad is None:
                param.grad = update if update.dtype == param.dtype else update.to(param.dtype)
                self._buffers.pop(key, None)
            else:
                grads.append(param.grad)
                updates.append(update)
                if key not in self._batched and update.dtype in (torch.float32, torch.float64):
                    self._buffers[key] = update  # reuse as the next microbatch's output buffer
        if grads:
            torch._foreach_add_(grads, updates)

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

    def check_idle(self, what: str) -> None:
        """Raise :class:`ProtocolError` if a microbatch block is open."""
        if self.current is not None:
            raise ProtocolError(f"{what} called inside an open opt.microbatch(...) block; close it first")

    # -- metrics and state -----------------------------------------------------------------
    def _reset_counters(self) -> None:
        self._microbatches = 0
        self._sequences = 0
        self._dropped = 0
        self._mb_in_step = 0
        self._capture_seconds = 0.0
        self._strategy_seconds = 0.0
        for strategy in self.strategies.all:
            strategy.reset_metrics()
        if self.diagnostics is not None:
            self.diagnostics.reset()

    def running_metrics(self) -> dict[str, float]:
        """Metrics of the step in progress."""
        out = {
            "gradproj/microbatches": float(self._microbatches),
            "gradproj/sequences": float(self._sequences),
            "gradproj/dropped_microbatches": float(self._dropped),
            "gradproj/capture_seconds": max(self._capture_seconds - self._strategy_seconds, 0.0),
            "gradproj/projection_seconds": self._strategy_seconds,
        }
        for strategy in self.strategies.all:
            out.update({f"gradproj/{k}": float(v) for k, v in strategy.step_metrics().items()})
        if self.diagnostics is not None:
            out.update({f"gradproj/{k}": float(v) for k, v in self.diagnostics.metrics(self.step_groups).items()})
        if self.lora_bound is not None:
            out.update({f"gradproj/{k}": float(v) for k, v in self.lora_bound.metrics().items()})
        return out

    def set_groups(self, group_ids, rewards) -> None:
        """Record the step's prompt groups and rewards (see :meth:`GradProjOptimizer.set_groups`)."""
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
        if self._mb_transforms and self._microbatches == 0 and any(p.grad is not None for p in self._params):
            names = ", ".join(type(t).__name__ for t in self._mb_transforms)
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
        if self.sharded is not None:
            self.sharded.reset()
        self._last_metrics = self.running_metrics()
        self._last_metrics["gradproj/step_skipped"] = float(skipped)
        self.step_groups = None
        self._buffers.clear()
        self._scratch.clear()
        self.steps += 1
        self._reset_counters()

    def metrics(self) -> dict[str, float]:
        """Metrics of the last completed step (of the step in progress before the first one)."""
        return dict(self._last_metrics) if self._last_metrics is not None else self.running_metrics()

    def step_pending(self) -> bool:
        """Whether microbatches ran since the last optimizer step."""
        return self._mb_in_step > 0 or self._microbatches > 0 or self._dropped > 0

    def state_dict(self) -> dict:
        """Tensor/primitive-only state (loads with ``torch.load(weights_only=True)``): the format
        version, the strategies, the whole configuration (options included) and the step count."""
        return {
            "version": STATE_VERSION,
            "strategies": [s.name for s in self.strategies.specs],
            "config": self.config.to_dict(),
            "steps": self.steps,
        }

    def check_state_dict(self, state) -> int:
        """Validate :meth:`state_dict` output against this optimizer without changing anything;
        return the step count to restore.

        Raises:
            CheckpointError: not gradproj state, another format version, another strategy or other
                options (resuming with other settings would silently change the run).
        """
        if not isinstance(state, dict):
            raise CheckpointError(
                f"the 'gradproj' entry of this optimizer state dict is a {type(state).__name__}, not the dict "
                "GradProjOptimizer.state_dict() writes; the checkpoint is corrupted or from another program"
            )
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise CheckpointError(
                f"gradproj state has version {version!r}, this gradproj reads versions 1 and {STATE_VERSION}; "
                "load it with the gradproj version that wrote it"
            )
        steps = state.get("steps", 0)
        strategies = state.get("strategies")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0 or not isinstance(strategies, (list, tuple)):
            raise CheckpointError(
                f"gradproj state is malformed (steps={steps!r}, strategies={strategies!r}); the checkpoint is "
                "corrupted -- resume from another one"
            )
        mine = [s.name for s in self.strategies.specs]
        if list(strategies) != mine:
            raise CheckpointError(
                f"checkpoint was written with strategies {list(strategies)} but this optimizer "
                f"uses {mine}; wrap with the same strategy to resume"
            )
        if version >= 2:
            saved = state.get("config")
            if not isinstance(saved, dict):
                raise CheckpointError(f"gradproj state is malformed (config={saved!r}); the checkpoint is corrupted")
            current = self.config.to_dict()
            changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            if changed:
                diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
                raise CheckpointError(
                    f"checkpoint was written with other gradproj settings ({diffs}); wrap with the settings "
                    "it was written with to resume exactly. To change them deliberately, drop the "
                    "'gradproj' entry from the state dict before loading it"
                )
        return steps

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (see :meth:`check_state_dict` for what is refused)."""
        self.steps = self.check_state_dict(state)
