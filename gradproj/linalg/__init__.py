"""Linear algebra on per-sequence gradients, independent of how they were captured.

* :mod:`gradproj.linalg.sequence_grads` -- the span of the sequence gradients of one parameter
  tensor in one microbatch: materialised (whole or in blocks of rows) or in the "ghost" Gram form.
* :mod:`gradproj.linalg.projection` -- k x k solvers that turn a Gram matrix and inner products
  into projection coefficients.
"""

from gradproj.linalg.projection import gram_schmidt_coefficients, solve_coefficients
from gradproj.linalg.sequence_grads import (
    BlockedLinearGrads,
    GhostLinearGrads,
    MaterializedGrads,
    SequenceGradients,
    choose_linear_form,
)

__all__ = [
    "SequenceGradients",
    "MaterializedGrads",
    "GhostLinearGrads",
    "BlockedLinearGrads",
    "choose_linear_form",
    "solve_coefficients",
    "gram_schmidt_coefficients",
]
