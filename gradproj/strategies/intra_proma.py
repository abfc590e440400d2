"""``intra_proma``: intra-microbatch, low-rank factored PROMA (SPEC 2.3; seed ``proma.md``).

Per microbatch and layer, the microbatch gradient is projected off the dominant *factored*
subspace of its own tokens before it is accumulated -- independent of every other microbatch, so
it commutes with data-parallel all-reduce::

    g_m' = g_m - U_D U_D^T g_m U_A U_A^T        (projector="complement", default)
    g_m' = (I - U_D U_D^T) g_m (I - U_A U_A^T)  (projector="kron")
    G <- G + g_m'

``U_A`` / ``U_D``: top-``rank`` subspaces of the layer inputs / unweighted output gradients of the
tokens that carry a gradient (see `gradproj.linalg.subspace` and `gradproj.linalg.factored`).

Each layer's token factors are reduced to small pending subspaces as the layer finishes (matrix
products only: nothing is read on the host). Where the engine allows it (``batch.deferrable``),
the projection itself waits until `DEFER_MAX_BYTES` of pending subspaces are held or the
engine asks for the updates (when the microbatch closes): the subspaces of all pending layers are
then resolved together -- one batched eigendecomposition per shape class, the only point where the
host waits for the device (torch reads an eigendecomposition's error codes there) -- and the
gradients projected. The result is the same as projecting each layer at once. Layers the engine
applies at once (a tied parameter, FSDP2-sharded ones) are projected right away: one
synchronisation each.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from gradproj.errors import ProtocolError
from gradproj.linalg.device_sums import DeviceSums
from gradproj.linalg.factored import FactoredProjection, SubspaceCache
from gradproj.plugins.hookspecs import hookimpl
from gradproj.strategies.base import Strategy, StrategyOptions, StrategySpec
from gradproj.work import Capabilities, LayerBatch, Update

#: Pending subspaces (bytes: sketches and small Grams) held back for one batched resolve; more, and
#: the pending layers are projected at once (one host synchronisation per resolve).
DEFER_MAX_BYTES = 256 << 20


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
        self._projection = self._new_projection()
        self._finite: list[torch.Tensor] = []  # per resolve: whether every projected update is finite
        self.reset_metrics()

    def _new_projection(self) -> FactoredProjection:
        opts: IntraPromaOptions = self.options
        return FactoredProjection(rank=opts.rank, energy=opts.energy, projector=opts.projector, solver=opts.solver,
                                  oversample=opts.oversample, niter=opts.niter, cache=self._cache)

    def start_microbatch(self) -> None:
        """Input subspaces are shared within a microbatch only."""
        self._release()

    def end_microbatch(self) -> None:
        """Release the cached subspaces, pending layers and the references to their factors."""
        self._release()

    def _release(self) -> None:
        self._cache.clear()
        self._projection = self._new_projection()
        self._finite = []

    def reset_metrics(self) -> None:
        """Zero the per-step sums behind ``projected_fraction`` and ``mean_rank``."""
        self._sums = DeviceSums(3)  # removed ||.||^2, total ||.||^2, ranks -- on the device until read
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
        self._projection.add(g, factors)  # the factors are reduced now; nothing refers to them after
        if batch.deferrable:
            if self._projection.nbytes() >= DEFER_MAX_BYTES:
                self._flush()
            return Update([g], deferred=True)
        # g finite (its norm is) and the removed block finite (so are the bases) => g' finite: both
        # projectors are orthogonal, ||g'|| <= ||g||; the flag goes to the engine, read at the close
        return Update([g], finite=self._flush())

    def finish_microbatch(self) -> bool | torch.Tensor:
        """Project the layers still pending; whether every projected update is finite (a device flag)."""
        self._flush()
        finite, self._finite = self._finite, []
        if not finite:
            return True
        return finite[0] if len(finite) == 1 else torch.stack(finite).all()

    def _flush(self) -> torch.Tensor | bool:
        """Project every pending layer in place; their finiteness as a device flag (also remembered
        for `finish_microbatch`)."""
        results = self._projection.finish()
        if not results:
            return True
        flags = []
        for _, removed_sq, total_sq, ranks in results:
            ok = torch.isfinite(removed_sq) & torch.isfinite(total_sq)
            flags.append(ok)
            rank_sum = torch.stack([torch.as_tensor(r, device=total_sq.device) for r in ranks]).sum() if ranks else 0.0
            self._sums.add(torch.where(ok, removed_sq, 0.0), torch.where(ok, total_sq, 0.0), rank_sum)
            self._sides += len(ranks)
        flag = flags[0] if len(flags) == 1 else torch.stack(flags).all()
        self._finite.append(flag)
        return flag

    def step_metrics(self) -> dict[str, float]:
        """``intra_proma/projected_fraction`` = sqrt(sum ||g - g'||^2 / sum ||g||^2); mean rank used
        (the step's sums are read from the device here, once)."""
        removed_sq, total_sq, rank_sum = self._sums.values()
        fraction = math.sqrt(removed_sq / total_sq) if total_sq > 0 else 0.0
        rank = rank_sum / self._sides if self._sides else 0.0
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
