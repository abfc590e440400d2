"""A finished layer's way to ``.grad``: sequence gradients, transforms, the rule, the sink.

Once every use of a covered module in a microbatch has reached its handler's backward, the
handler builds the layer's sequence gradients (`gradproj.linalg`); for each parameter the
per-layer coefficient transforms and the accumulation rule turn them and the running gradient into
an update (a single-tensor `gradproj.work.LayerBatch`), which the gradient sink stages or
writes. Tied parameters wait for all their modules; small batched parameters only fill their row
of a shared buffer and run as one stacked batch per group when the microbatch closes.
"""

from __future__ import annotations

from time import perf_counter

import torch

from gradproj.capture.layer import LayerCapture
from gradproj.capture.plan import CapturePlan
from gradproj.capture.sinks import GradientSink
from gradproj.capture.step_metrics import StepMetrics
from gradproj.diagnostics.gradients import GradientDiagnostics
from gradproj.diagnostics.update_monitor import UpdateMonitor
from gradproj.errors import ProtocolError
from gradproj.linalg.sequence_grads import Workspace
from gradproj.linalg.sum_grads import SumGrads
from gradproj.work import LayerBatch, ResolvedStrategies, Update

__all__ = ["LayerUpdates", "DEFERRED_WRITES_MAX_BYTES"]

#: With direct writes, deferred updates held before the rule is asked to finish them (bytes)
DEFERRED_WRITES_MAX_BYTES = 16 << 20


class LayerUpdates:
    """Runs the strategies on finished layers of the open microbatch and commits their updates.

    Args:
        plan: the capture plan (batching groups, tied parameters, block size).
        sink: where updates go.
        strategies: the resolved strategies.
        gram: the ``gram`` setting handlers use (``"auto"``, ``"materialize"``, ``"ghost"``).
        metrics: the step's counters (strategy time is added to them).
        diagnostics: the gradient diagnostics, or ``None``.
        monitor: the entropy / per-step KL monitor, or ``None``.
    """

    def __init__(
        self, plan: CapturePlan, sink: GradientSink, strategies: ResolvedStrategies, gram: str, metrics: StepMetrics,
        diagnostics: GradientDiagnostics | None = None, monitor: UpdateMonitor | None = None,
    ) -> None:
        self.plan = plan
        self.sink = sink
        self.rule = strategies.accumulate
        self.layer_transforms = strategies.layer_transforms
        self.gram = gram
        self.metrics = metrics
        self.diagnostics = diagnostics
        #: sees each tensor's sequence gradients only when it estimates the per-step KL
        self.kl_monitor = monitor if monitor is not None and monitor.kl else None
        self.workspace = Workspace(plan.block_numel)

    def finalize(self, layer: LayerCapture, mb, uses) -> None:
        """Every use of ``layer`` in ``mb`` arrived: build its sequence gradients and accumulate
        each parameter (a tied one once all its modules are in)."""
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
        plan = self.plan
        slots = None
        for attr, param, _ in layer.params:
            entry = plan.batched.get(id(param))
            if entry is not None and param.requires_grad:
                group, index = entry
                slots = slots or {}
                slots[attr] = group.slot(index, mb.k)
                mb.filled.setdefault(group, []).append(index)
        shared = any(id(param) in plan.shared for _, param, _ in layer.params)
        # tied pieces outlive this call: a workspace of their own (still blocking an outlier layer)
        workspace = Workspace(self.workspace.block_numel) if shared else self.workspace
        seqs = layer.handler.sequence_gradients(layer, uses, mb.layout, self.gram, workspace, slots)
        for attr, param, qname in layer.params:
            seq = seqs.get(attr)
            if seq is None:
                continue
            if id(param) in plan.shared:
                _, _, pieces = mb.pieces.setdefault(id(param), (param, qname, []))
                pieces.append(seq)
                expected = sum(1 for user in plan.shared[id(param)] if user.pending > 0 or user in mb.touched)
                if len(pieces) < expected:
                    continue  # wait for the parameter's other modules
                del mb.pieces[id(param)]
                seq = pieces[0] if len(pieces) == 1 else SumGrads(pieces)
            self.accumulate(mb, param, qname, seq)

    def accumulate(self, mb, param: torch.Tensor, qname: str, seq) -> None:
        """Run the accumulation rule on one parameter tensor (a single-tensor batch) and commit --
        or, for a deferred update under direct writes, hold -- its update."""
        sink, rule = self.sink, self.rule
        grad = sink.running_grad(param)
        out = sink.out_buffer(mb, param, grad, rule.capabilities.may_defer)
        start = perf_counter()
        batch = LayerBatch.single(qname, param, grad, mb.coefficients, seq, out)
        # staged by reference (or, with direct writes, held) until finish_microbatch(): the rule may finish it later
        batch.deferrable = self._deferrable(param) and (not sink.writes_directly or rule.capabilities.may_defer)
        for transform in self.layer_transforms:
            batch.coefficients = transform.transform_layer(batch)
        if self.diagnostics is not None:
            self.diagnostics.observe(qname, seq.gram(), batch.coefficients.reshape(-1, batch.k)[0], mb.group_ids)
        if self.kl_monitor is not None:
            self.kl_monitor.observe(param, seq)
        update = self._run(batch)
        self.metrics.strategy_seconds += perf_counter() - start
        (tensor,) = update.tensors
        if update.deferred and sink.writes_directly:
            mb.deferred_writes.append((param, tensor))
            mb.deferred_bytes += tensor.numel() * tensor.element_size()
            if mb.deferred_bytes >= DEFERRED_WRITES_MAX_BYTES:
                self.finish_deferred(mb)
            return
        sink.commit(mb, param, tensor, True if update.deferred else update.finite)

    def _run(self, batch: LayerBatch) -> Update:
        """The rule's update of ``batch``, checked against the contract."""
        update = self.rule.accumulate(batch)
        if not isinstance(update, Update) or len(update.tensors) != len(batch):
            raise ProtocolError(
                f"strategy {type(self.rule).__name__}.accumulate() must return an Update with one tensor per "
                f"member of the batch ({len(batch)}: {', '.join(batch.names[:3])}), got {update!r:.80}"
            )
        if update.deferred and not batch.deferrable:
            raise ProtocolError(
                f"strategy {type(self.rule).__name__} deferred the update of {', '.join(batch.names)}, which this engine "
                "applies at once (batch.deferrable is False); finish it in accumulate()"
            )
        return update

    def _deferrable(self, param: torch.Tensor) -> bool:
        """Neither tied (its pieces are summed first) nor FSDP2-sharded (applied at once)."""
        return id(param) not in self.plan.shared and self.sink.sharded is None

    def finish_deferred(self, mb) -> None:
        """Have the rule finish its deferred updates; with direct writes, then write them."""
        start = perf_counter()
        finished = self.rule.finish_microbatch()
        self.metrics.strategy_seconds += perf_counter() - start
        writes, mb.deferred_writes, mb.deferred_bytes = mb.deferred_writes, [], 0
        if isinstance(finished, torch.Tensor):  # the rule's flag on the device: read at the close
            mb.finite_flags.append(finished.reshape(()))
        elif not finished:
            mb.drop()
            return
        for param, update in writes:
            self.sink.commit(mb, param, update, True)

    def finish(self, mb) -> None:
        """The backward is over: finish layers still waiting for a use that never came (forwards
        whose output was not used), tied parameters some of whose modules got no gradient, the
        batched groups and the deferred updates -- unless the microbatch was dropped."""
        for layer, uses in list(mb.uses.items()):
            if mb.dropped:
                break
            self.finalize(layer, mb, uses)
        for param, qname, pieces in list(mb.pieces.values()):
            if mb.dropped:
                break
            self.accumulate(mb, param, qname, pieces[0] if len(pieces) == 1 else SumGrads(pieces))
        mb.pieces.clear()
        if not mb.dropped:
            self._finish_groups(mb)
            self.finish_deferred(mb)

    def _finish_groups(self, mb) -> None:
        """Run the strategy once per group of small parameters filled in this microbatch."""
        for group, indices in mb.filled.items():
            batch = group.batch(indices, mb.coefficients, self.sink.running_grad)
            start = perf_counter()
            for transform in self.layer_transforms:
                batch.coefficients = transform.transform_layer(batch)
            if self.diagnostics is not None:
                _observe_batch(self.diagnostics, batch, mb)
            if self.kl_monitor is not None:
                self.kl_monitor.observe_stacked(batch.params, batch.sequence_grads)
            update = self._run(batch)
            self.metrics.strategy_seconds += perf_counter() - start
            for param, tensor in zip(batch.params, update.tensors):
                self.sink.commit(mb, param, tensor.view(param.shape), update.finite)
        mb.filled.clear()

    def release(self) -> None:
        """Free the workspace (the engine was detached)."""
        self.workspace.clear()


def _observe_batch(diagnostics: GradientDiagnostics, batch: LayerBatch, mb) -> None:
    """Hand each member's Gram and coefficients to the diagnostics (kept on the device)."""
    grams = batch.grams()
    coeffs = batch.coefficients
    for index, name in enumerate(batch.names):
        diagnostics.observe(name, grams[index], coeffs if coeffs.dim() == 1 else coeffs[index], mb.group_ids)
