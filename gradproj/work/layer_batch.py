"""The unit of work a strategy receives: parameter tensors of one microbatch, and what it returns.

Every strategy hook takes a `LayerBatch` -- one form for every layer:

* **stacked**: several small parameter tensors with one element count (LoRA adapters, biases).
  Capture groups them at ``wrap()`` and fills each member's row of a shared buffer during the
  backward (`gradproj.capture.batching`); the strategy runs once per group when the microbatch
  closes, with batched operations;
* **single**: one (large) parameter tensor, as soon as its layer finished in the backward; its
  sequence gradients keep their own representation (materialised, ghost, blocked, embedding, a
  tied parameter's sum -- `gradproj.linalg.sequence_grads`), reached through the same
  methods.

An accumulation rule returns an `Update`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gradproj.errors import ProtocolError
from gradproj.linalg.sequence_grads import SequenceGradients

__all__ = ["LayerBatch", "Update"]


@dataclass
class Update:
    """What an accumulation rule returns for a `LayerBatch`: ``G <- G + U`` per member.

    Attributes:
        tensors: one update per member, shaped like its parameter (``batch.combine`` returns them).
        finite: the rule established that every update is finite (e.g. from a finite Gram of the
            sequence gradients); the engine then skips its own non-finite check. A 0-dim bool
            tensor is the rule's flag computed on the device: the engine reads it, with every other
            check of the microbatch, once when the microbatch closes (no host synchronisation in
            the backward).
        deferred: the updates are not finished yet: the rule finishes them in place in
            `gradproj.Strategy.finish_microbatch` (allowed only where ``batch.deferrable``),
            which then vouches for their finiteness.
    """

    tensors: list[torch.Tensor]
    finite: bool | torch.Tensor = False
    deferred: bool = False


class LayerBatch:
    """Parameter tensors of one microbatch handled by one strategy call (see the module doc).

    Attributes:
        names: qualified parameter names (``"model.layers.0.mlp.up_proj.weight"``).
        params: the parameters.
        grads: their running gradients ``G`` before this microbatch (``None`` = 0).
        coefficients: float64 per-sequence loss coefficients ``c_i = dL/dlogp``: (k,), or (L, k)
            once a per-layer transform made them differ between members.
        k: number of sequences.
        deferrable: set by the engine: the updates are applied only after
            `gradproj.Strategy.finish_microbatch`, so a rule may return them unfinished
            (``Update(deferred=True)``) and finish them in place then (e.g. to batch small work
            across layers).
    """

    def __init__(
        self,
        names: list[str],
        params: list[torch.Tensor],
        grads: list[torch.Tensor | None],
        coefficients: torch.Tensor,
        rows: torch.Tensor | None = None,
        seq: SequenceGradients | None = None,
        out: torch.Tensor | None = None,
    ) -> None:
        self.names = names
        self.params = params
        self.grads = grads
        self.coefficients = coefficients
        self.k = coefficients.shape[-1]
        self.deferrable = False
        self._rows = rows  # stacked: (L, k+1, numel), the members' s_i and a scratch row each
        self._seq = seq  # single: the member's sequence gradients (valid during the call only)
        self._out = out  # single: a tensor its update may be written into

    @classmethod
    def stacked(cls, rows: torch.Tensor, names, params, grads, coefficients: torch.Tensor) -> LayerBatch:
        """Small tensors whose flattened sequence gradients are ``rows[:, :k]`` of a (L, k+1, numel) buffer."""
        return cls(names, params, grads, coefficients, rows=rows)

    @classmethod
    def single(cls, name: str, param, grad, coefficients: torch.Tensor, seq: SequenceGradients, out=None) -> LayerBatch:
        """One tensor with its sequence gradients ``seq``; ``out`` may receive its update."""
        return cls([name], [param], [grad], coefficients, seq=seq, out=out)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def seq(self) -> SequenceGradients:
        """The sequence gradients of a single-tensor batch (its own representation)."""
        if self._seq is None:
            raise ProtocolError("batch.seq exists for a single-tensor batch only; use the batched methods")
        return self._seq

    @property
    def sequence_grads(self) -> torch.Tensor:
        """(L, k, numel) view of a stacked batch's sequence gradients."""
        if self._rows is None:
            raise ProtocolError("batch.sequence_grads exists for stacked batches only; use batch.seq")
        return self._rows[:, : self.k]

    def host_coefficients(self) -> np.ndarray:
        """``coefficients`` as a float64 NumPy array on the host."""
        return self.coefficients.cpu().numpy()

    def token_factors(self) -> list:
        """Token-level factors of each member (for rules with ``needs_tokens``: the engine then
        never stacks tensors, so each batch has one member)."""
        factors = getattr(self._seq, "token_factors", None)
        if factors is None:
            raise ProtocolError(
                f"the sequence gradients of {', '.join(self.names)} "
                f"({type(self._seq).__name__ if self._seq is not None else 'stacked rows'}) offer no token-level "
                "factors; exclude those parameters or use a strategy without needs_tokens"
            )
        return [factors()]

    def grams(self) -> torch.Tensor:
        """(L, k, k) float64 Grams ``K = <s_i, s_j>`` per member."""
        if self._rows is None:
            return self.seq.gram()[None]
        seqs = self.sequence_grads
        return torch.bmm(seqs, seqs.transpose(1, 2)).double()

    def gram_with_grads(self) -> torch.Tensor:
        """(L, k+1, k+1) float64 Grams of ``[s_1..s_k, G]`` per member (G = 0 where ``None``)."""
        if self._rows is None:
            grad = self.grads[0]
            if grad is not None:
                return self.seq.gram_with(grad)[None]
            full = torch.zeros(1, self.k + 1, self.k + 1, dtype=torch.float64, device=self.coefficients.device)
            full[0, : self.k, : self.k] = self.seq.gram()
            return full
        rows = self._rows[:, self.k].unbind(0)
        grads = [grad for grad in self.grads if grad is not None]
        if len(grads) == len(self.grads):
            torch._foreach_copy_(list(rows), [grad.reshape(-1) for grad in grads])
        else:
            for row, grad in zip(rows, self.grads):
                row.zero_() if grad is None else row.copy_(grad.reshape(-1))
        return torch.bmm(self._rows, self._rows.transpose(1, 2)).double()

    def combine(self, gamma: torch.Tensor) -> list[torch.Tensor]:
        """``sum_i gamma[l, i] s_i^(l)`` per member, shaped like its parameter, for a (L, k) or (k,)
        float64 ``gamma`` (one matmul per batch)."""
        if self._rows is None:
            return [self.seq.combine(gamma if gamma.dim() == 1 else gamma[0], self._out)]
        gamma = gamma.to(device=self._rows.device, dtype=self._rows.dtype)
        seqs = self.sequence_grads
        flat = torch.matmul(gamma, seqs) if gamma.dim() == 1 else torch.bmm(gamma.unsqueeze(1), seqs).squeeze(1)
        return [row.view(param.shape) for row, param in zip(flat, self.params)]
