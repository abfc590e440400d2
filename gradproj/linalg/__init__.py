"""Linear algebra on per-sequence gradients, independent of how they were captured.

The bottom layer of gradproj: it imports nothing of the rest.

* `gradproj.linalg.sequence_grads` -- the protocol of the sequence gradients of one parameter
  tensor in one microbatch (``gram`` / ``inner`` / ``gram_with`` / ``combine``), the generic forms
  and token-level factors; its representations: `gradproj.linalg.linear_grads` (a linear
  weight: materialised, in blocks of rows, or the "ghost" Gram form),
  `gradproj.linalg.embedding_grads` (an embedding table, per distinct token),
  `gradproj.linalg.sum_grads` (a tied parameter: the sum over its modules);
* `gradproj.linalg.projection` -- k x k solvers that turn a Gram matrix and inner products
  into projection coefficients;
* `gradproj.linalg.subspace` and `gradproj.linalg.factored` -- top subspaces of
  token-level factors and the factored (Kronecker) projection Intra-PROMA uses.
"""

from gradproj.linalg.embedding_grads import EmbeddingGrads
from gradproj.linalg.linear_grads import BlockedLinearGrads, GhostLinearGrads, MaterializedLinearGrads, choose_linear_form
from gradproj.linalg.projection import gram_schmidt_coefficients, solve_coefficients
from gradproj.linalg.sequence_grads import MaterializedGrads, SequenceGradients, TokenSumGrads
from gradproj.linalg.sum_grads import SumGrads

__all__ = [
    "SequenceGradients",
    "MaterializedGrads",
    "TokenSumGrads",
    "GhostLinearGrads",
    "MaterializedLinearGrads",
    "BlockedLinearGrads",
    "EmbeddingGrads",
    "SumGrads",
    "choose_linear_form",
    "solve_coefficients",
    "gram_schmidt_coefficients",
]
