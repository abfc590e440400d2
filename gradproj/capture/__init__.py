"""Single-pass capture: per-sequence gradient algebra inside the backward the user already runs.

The engine and what it is made of:

* `gradproj.capture.engine` -- the microbatch state machine (open, the log-prob hook, each
  layer's backward, close: apply, drop or poison);
* `gradproj.capture.setup` / `gradproj.capture.step` -- attaching to a model and its
  coverage checks / the optimizer step around the microbatches;
* `gradproj.capture.plan` -- what ``wrap()`` decides once: covered layers, tied parameters,
  batching groups (`gradproj.capture.batching`), block sizes;
* `gradproj.capture.layer_updates` -- a finished layer's sequence gradients through the
  strategies; `gradproj.capture.sinks` -- where the updates go, one class per write mode
  (staged, direct, FSDP2 rank-local; `gradproj.capture.sharded`,
  `gradproj.capture.data_parallel`);
* `gradproj.capture.step_metrics` -- the step's counters;
* `gradproj.capture.microbatch` -- one microbatch's inputs, per-sequence coefficients and
  staging; `gradproj.capture.layout` -- padded and packed batches;
* checks: `gradproj.capture.loss_terms` (loss terms bypassing ``logp``, over
  `gradproj.capture.backward_watch`), `gradproj.capture.guards` (the model and ``.grad``).

Layer handlers and their interface:

* `gradproj.capture.layer` -- `LayerCapture`, the whole interface between a handler
  and the engine; `gradproj.capture.captured_call` -- the one capture mechanism every handler
  uses (a module's computation as a ``CapturedOp``, run by ``CapturedCall``);
  `gradproj.capture.forwards` -- installing a forward;
* `gradproj.capture.handlers` (``nn.Linear``, ``Conv1D``), `gradproj.capture.norm_handlers`,
  `gradproj.capture.embedding_handler` -- the built-in handlers, registered as plugins.
"""

from gradproj.capture.engine import CaptureEngine
from gradproj.capture.handlers import LayerHandler, LinearHandler
from gradproj.capture.layer import LayerCapture
from gradproj.capture.microbatch import Microbatch

__all__ = ["CaptureEngine", "LayerCapture", "LayerHandler", "LinearHandler", "Microbatch"]
