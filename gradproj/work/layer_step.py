"""The per-layer work item: one parameter tensor in one microbatch, as a strategy sees it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradproj.linalg.sequence_grads import SequenceGradients

__all__ = ["LayerStep"]


@dataclass
class LayerStep:
    """One parameter tensor in one microbatch, as seen by a strategy.

    Attributes:
        name: the parameter's qualified name in the model (``"model.layers.0.mlp.up_proj.weight"``).
        param: the parameter itself.
        grad: the running gradient ``G`` before this microbatch (``param.grad``; ``None`` = 0).
        coefficients: float64 (k,) per-sequence loss coefficients ``c_i = dL/dlogp`` on row i.
        seq: the microbatch's sequence gradients of this tensor (gram / inner / combine); valid
            only during the strategy call (it may live in a shared scratch buffer).
        out: a scratch tensor the update may be written into (or ``None``); use :meth:`combine`.
        finite: a strategy may set this to True when it has established that its update is
            finite (e.g. from a finite Gram of the sequence gradients); the engine then skips its
            own non-finite check of that update.
        deferrable: set by the engine when the returned update is applied only after
            :meth:`Strategy.finish_microbatch` (staged by reference, or under direct writes held for
            a rule with ``may_defer``): the strategy may then finish it in place until that call
            (e.g. to batch small work across layers).
        deferred: set by the strategy when it returned such an unfinished update (only allowed if
            ``deferrable``); :meth:`Strategy.finish_microbatch` then vouches for its finiteness.
    """

    name: str
    param: torch.Tensor
    grad: torch.Tensor | None
    coefficients: torch.Tensor
    seq: SequenceGradients
    out: torch.Tensor | None = None
    finite: bool = False
    deferrable: bool = False
    deferred: bool = False

    def host_coefficients(self):
        """``coefficients`` as a float64 NumPy array on the host."""
        return self.coefficients.cpu().numpy()

    def combine(self, gamma: torch.Tensor) -> torch.Tensor:
        """``sum_i gamma_i s_i`` -- the usual way for a strategy to build its update."""
        return self.seq.combine(gamma, self.out)
