"""``intra_proma``: intra-microbatch, low-rank factored PROMA (SPEC 2.3; seed ``proma.md``).

Per microbatch and layer, the microbatch gradient is projected off the dominant *factored*
subspace of its own tokens before it is accumulated -- independent of every other microbatch, so
it commutes with data-parallel all-reduce::

    g_m' = g_m - U_D U_D^T g_m U_A U_A^T        (projector="complement", default)
    g_m' = (I - U_D U_D^T) g_m (I - U_A U_A^T)  (projector="kron")
    G <- G + g_m'

``U_A`` / ``U_D``: top-``rank`` subspaces of the layer inputs / unweighted output gradients of the
tokens that carry a gradient (see :mod:`gradproj.linalg.subspace` and :mod:`gradproj.linalg.factored`).

Where the engine allows it (``step.deferrable``), the projection of a layer waits until
:data:`DEFER_MAX_BYTES` of token factors are pending or the engine asks for the updates: the
subspaces of all pending layers are then computed together, their small per-factor algebra
batched (inside a backward pass every small operation is costly). The result is the same.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from gradproj.errors import ProtocolError
from gradproj.linalg.factored import SubspaceCache, project_factored_batch
from gradproj.linalg.sequence_grads import TokenFactors
from gradproj.plugins.hookspecs import hookimpl
from gradproj.strategies.base import Strategy, StrategyOptions, StrategySpec
from gradproj.work import Capabilities, LayerBatch, Update

#: Token factors (bytes) held back for one batched projection; more, and the pending layers are
#: projected at once. Holding them delays freeing those layers' activations and output gradients
#: by up to this much memory.
DEFER_MAX_BYTES = 16 << 20


def _factor_bytes(factors: TokenFactors) -> int:
    return sum(t.numel() * t.element_size() for t in (factors.rows, factors.cols) if t is not None)


class IntraPromaOptions(StrategyOptions):
    """Options of ``intra_proma``.

    Attributes:
        rank: dimension r of each dominant subspace (capped by the tokens and the numerical rank);
            with ``energy`` set, the largest rank allowed.
        energy: if set, the smallest rank whose top singular values hold this fraction of the
            factor's squared Frobenius norm (per side, per layer, per microbatch).
        projector: ``"complement"`` (remove the factored rank-r block) or ``"kron"`` (project both
            sides: ``(I - P_D) g (I - P_A)``).
        solver: ``"auto"`` (exact while min(tokens, width) <= 64, else randomized), ``"exact"``
            (eigendecomposition of the smaller Gram) or ``"randomized"`` (range finder).
        oversample: extra columns of the randomized range finder.
        niter: power iterations of the randomized range finder.
    """

    rank: int = Field(default=8, ge=1)
    energy: float | None = Field(default=None, gt=0.0, le=1.0)
    projector: Literal["complement", "kron"] = "complement"
    solver: Literal["auto", "exact", "randomized"] = "auto"
    oversample: int = Field(default=4, ge=0)
    niter: int = Field(default=1, ge=0)


class IntraProma(Strategy):
    """Project each microbatch gradient off its own dominant factored subspace, then add it."""

    options: IntraPromaOptions

    capabilities = Capabilities(needs_tokens=True, may_defer=True)

    def __init__(self, options: IntraPromaOptions) -> None:
        super().__init__(options)
        self._cache = SubspaceCache()
        self._pending: list = []  # (g, factors) whose projection is deferred
        self._pending_bytes = 0
        self._finite = True
        self.reset_metrics()

    def start_microbatch(self) -> None:
        """Input subspaces are shared within a microbatch only."""
        self._release()

    def end_microbatch(self) -> None:
        """Release the cached subspaces, pending layers and the references to their factors."""
        self._release()

    def _release(self) -> None:
        self._cache.clear()
        self._pending.clear()
        self._pending_bytes = 0
        self._finite = True

    def reset_metrics(self) -> None:
        """Zero the per-step sums behind ``projected_fraction`` and ``mean_rank``."""
        self._removed_sq = 0.0
        self._total_sq = 0.0
        self._rank_sum = 0
        self._sides = 0

    def accumulate(self, batch: LayerBatch) -> Update:
        """``g_m'`` of the batch's tensor (or ``g_m``, projected in place before the microbatch closes).

        ``needs_tokens``: the engine never stacks tensors for this rule, so a batch has one member."""
        if getattr(batch.seq, "token_factors", None) is None:
            raise ProtocolError(
                f"intra_proma needs token-level factors of {batch.names[0]}, but its sequence gradients "
                f"({type(batch.seq).__name__}) do not provide them; exclude this parameter or use proma"
            )
        (factors,) = batch.token_factors()
        (g,) = batch.combine(batch.coefficients)
        if batch.deferrable and isinstance(factors, TokenFactors):
            self._pending.append((g, factors))
            self._pending_bytes += _factor_bytes(factors)
            if self._pending_bytes >= DEFER_MAX_BYTES:
                self._flush()
            return Update([g], deferred=True)
        # g finite (its norm is) and the removed block finite (so are the bases) => g' finite: both
        # projectors are orthogonal, ||g'|| <= ||g||; the engine can skip its own check
        return Update([g], finite=self._project([(g, factors)]))

    def finish_microbatch(self) -> bool:
        """Project the layers still pending; False if some projected update is not finite."""
        self._flush()
        return self._finite

    def _flush(self) -> None:
        entries, self._pending, self._pending_bytes = self._pending, [], 0
        if entries and not self._project(entries):
            self._finite = False

    def _project(self, entries: list) -> bool:
        """Project ``[(g, factors)]`` in place; whether every result is finite."""
        opts: IntraPromaOptions = self.options
        # metrics: the compute dtype is enough
        if len(entries) == 1:
            norms: list[float] = [float(torch.linalg.vector_norm(entries[0][0]))]
        else:
            norms = torch.stack(torch._foreach_norm([g for g, _ in entries])).double().cpu().tolist()
        results = project_factored_batch(
            entries, rank=opts.rank, energy=opts.energy, projector=opts.projector,
            solver=opts.solver, oversample=opts.oversample, niter=opts.niter, cache=self._cache,
        )
        finite = True
        for norm, (g, removed_sq, ranks) in zip(norms, results):
            total_sq = float(norm) ** 2
            if math.isfinite(total_sq) and math.isfinite(removed_sq):
                self._total_sq += total_sq
                self._removed_sq += removed_sq
            elif not bool(torch.isfinite(g).all()):
                finite = False
            self._rank_sum += sum(ranks)
            self._sides += len(ranks)
        return finite

    def step_metrics(self) -> dict[str, float]:
        """``intra_proma/projected_fraction`` = sqrt(sum ||g - g'||^2 / sum ||g||^2); mean rank used."""
        fraction = math.sqrt(self._removed_sq / self._total_sq) if self._total_sq > 0 else 0.0
        rank = self._rank_sum / self._sides if self._sides else 0.0
        return {"intra_proma/projected_fraction": fraction, "intra_proma/mean_rank": rank}


@hookimpl
def gradproj_strategies():
    """Register ``intra_proma``."""
    return [
        StrategySpec(
            "intra_proma",
            IntraProma,
            IntraPromaOptions,
            summary="low-rank factored projection inside each microbatch (data-parallel safe)",
        )
    ]
