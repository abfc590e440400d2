"""What a coefficient transform may read of one microbatch (a read-only view)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradproj.work.groups import StepGroups

__all__ = ["MicrobatchContext"]


@dataclass(frozen=True)
class MicrobatchContext:
    """One ``opt.microbatch(...)`` block, as coefficient transforms see it.

    Attributes:
        index: position of the microbatch in the current optimizer step (0-based).
        where: how error messages name it (``"opt.microbatch() #2 of this step"``).
        k: number of sequences (rows of ``logp``).
        group_ids: the prompt group of each row (``None`` if the pipeline gave none).
        step_groups: the step's `StepGroups` from ``opt.set_groups`` (or ``None``).
        mask: (k, T) bool, the valid tokens of each row (as given to ``opt.microbatch``).
    """

    index: int
    where: str
    k: int
    group_ids: list | None
    step_groups: StepGroups | None
    mask: torch.Tensor
