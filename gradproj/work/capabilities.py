"""What a strategy declares about itself, once, for the engine to read."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Capabilities"]


@dataclass(frozen=True)
class Capabilities:
    """A strategy's needs and permissions (a class attribute ``capabilities`` of every strategy).

    Attributes:
        needs_capture: it needs the per-sequence gradients of each layer (False only for plain
            accumulation and for layer-independent coefficient transforms).
        plain_when_no_grad: with ``G = 0`` everywhere (the first microbatch of a step) its update is
            just ``g_m``: the engine then lets autograd compute ordinary gradients for that
            microbatch (accumulation rules).
        needs_tokens: it needs token-level factors (``batch.token_factors()``, e.g. Intra-PROMA's
            input and output-gradient subspaces): every batch then holds one tensor.
        may_defer: it may return deferred updates also where the engine writes updates straight
            into ``.grad`` (``nonfinite="propagate"``): the engine then gives it fresh update tensors,
            holds the deferred ones, and calls ``finish_microbatch`` whenever they reach a budget,
            not only when the microbatch closes (accumulation rules).
        per_layer: its new coefficients depend on each layer's sequence gradients (coefficient
            transforms: ``transform_layer``; otherwise ``transform_microbatch``).
    """

    needs_capture: bool = True
    plain_when_no_grad: bool = False
    needs_tokens: bool = False
    may_defer: bool = False
    per_layer: bool = False
