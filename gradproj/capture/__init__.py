"""Single-pass capture: per-sequence gradient algebra inside the backward the user already runs.

* :mod:`gradproj.capture.microbatch` -- one microbatch: input validation, the hook on the
  log-probs that records ``w = dL/dlogp`` and sends the mask down instead, per-sequence coefficients.
* :mod:`gradproj.capture.handlers` -- the layer-handler registry (``nn.Linear`` built in).
* :mod:`gradproj.capture.engine` -- installs handlers on a model, routes each layer's backward to
  the strategies, stages updates and writes them to ``param.grad`` when the microbatch closes.
"""

from gradproj.capture.engine import CaptureEngine
from gradproj.capture.handlers import LayerHandler, LinearHandler
from gradproj.capture.microbatch import Microbatch

__all__ = ["CaptureEngine", "LayerHandler", "LinearHandler", "Microbatch"]
