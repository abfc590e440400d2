"""Single-pass capture: per-sequence gradient algebra inside the backward the user already runs.

The engine and what it is made of:

* :mod:`gradproj.capture.engine` -- the microbatch state machine (open, the log-prob hook, each
  layer's backward, close: apply, drop or poison);
* :mod:`gradproj.capture.setup` / :mod:`gradproj.capture.step` -- attaching to a model and its
  coverage checks / the optimizer step around the microbatches;
* :mod:`gradproj.capture.plan` -- what ``wrap()`` decides once: covered layers, tied parameters,
  batching groups (:mod:`gradproj.capture.batching`), block sizes;
* :mod:`gradproj.capture.layer_updates` -- a finished layer's sequence gradients through the
  strategies; :mod:`gradproj.capture.sinks` -- where the updates go, one class per write mode
  (staged, direct, FSDP2 rank-local; :mod:`gradproj.capture.sharded`,
  :mod:`gradproj.capture.data_parallel`);
* :mod:`gradproj.capture.step_metrics` -- the step's counters;
* :mod:`gradproj.capture.microbatch` -- one microbatch's inputs, per-sequence coefficients and
  staging; :mod:`gradproj.capture.layout` -- padded and packed batches;
* checks: :mod:`gradproj.capture.loss_terms` (loss terms bypassing ``logp``, over
  :mod:`gradproj.capture.backward_watch`), :mod:`gradproj.capture.guards` (the model and ``.grad``).

Layer handlers and their interface:

* :mod:`gradproj.capture.layer` -- :class:`LayerCapture`, the whole interface between a handler
  and the engine; :mod:`gradproj.capture.captured_call` -- the one capture mechanism every handler
  uses (a module's computation as a ``CapturedOp``, run by ``CapturedCall``);
  :mod:`gradproj.capture.forwards` -- installing a forward;
* :mod:`gradproj.capture.handlers` (``nn.Linear``, ``Conv1D``), :mod:`gradproj.capture.norm_handlers`,
  :mod:`gradproj.capture.embedding_handler` -- the built-in handlers, registered as plugins.
"""

from gradproj.capture.engine import CaptureEngine
from gradproj.capture.handlers import LayerHandler, LinearHandler
from gradproj.capture.layer import LayerCapture
from gradproj.capture.microbatch import Microbatch

__all__ = ["CaptureEngine", "LayerCapture", "LayerHandler", "LinearHandler", "Microbatch"]
