"""Prompt groups and rewards of one optimizer step, as the pipeline supplies them.

GRPO samples several responses per prompt (a *group*); statistics such as a group's reward std
need every response of the group, and a group's rows may be spread over several microbatches
(TRL shuffles rows). So the pipeline hands gradproj the whole step's ``group_ids`` and
``rewards`` once (``opt.set_groups``), and each ``opt.microbatch(..., group_ids=...)`` says which
groups its rows belong to.
"""

from __future__ import annotations

import statistics
from collections.abc import Hashable, Sequence

import torch

from gradproj.errors import InputError, ProtocolError

__all__ = ["StepGroups", "as_group_ids", "require_groups"]


def as_group_ids(values, where: str) -> list:
    """Group ids as a list of hashable scalars (ints from tensors, or any hashable values)."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise InputError(f"{where}: group_ids must be one-dimensional, got shape {tuple(values.shape)}")
        if values.is_floating_point() or values.is_complex():
            raise InputError(f"{where}: group_ids must be integers (or hashable labels), got dtype {values.dtype}")
        return values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InputError(f"{where}: group_ids must be a 1-D tensor or a sequence of labels, got {type(values).__name__}")
    out = list(values)
    for value in out:
        try:
            hash(value)
        except TypeError:
            raise InputError(f"{where}: group id {value!r} is not hashable; use ints or strings") from None
    return out


class StepGroups:
    """The step's per-sequence group ids and rewards, with per-group statistics.

    Args:
        group_ids: one label per sequence of the step (prompt index, prompt text, uid...).
        rewards: one finite reward per sequence (a 1-D tensor or sequence of numbers).
    """

    def __init__(self, group_ids: torch.Tensor | Sequence[Hashable], rewards: torch.Tensor | Sequence[float]) -> None:
        where = "opt.set_groups()"
        ids = as_group_ids(group_ids, where)
        r = torch.as_tensor(rewards.detach().cpu() if isinstance(rewards, torch.Tensor) else rewards, dtype=torch.float64)
        if r.dim() != 1:
            raise InputError(f"{where}: rewards must be one-dimensional (one per sequence), got shape {tuple(r.shape)}")
        if r.numel() != len(ids):
            raise InputError(f"{where}: {len(ids)} group ids but {r.numel()} rewards; give one of each per sequence")
        if not len(ids):
            raise InputError(f"{where}: no sequences given")
        if not bool(torch.isfinite(r).all()):
            raise InputError(f"{where}: rewards contain NaN or inf; fix the reward function before training on them")
        self.group_ids = ids
        self.rewards = r
        # host numbers (the rewards were copied to the host above): statistics read inside the
        # backward never wait for a device
        self._values = r.tolist()
        members: dict = {}
        for index, gid in enumerate(ids):
            members.setdefault(gid, []).append(index)
        self.members = {gid: torch.tensor(rows) for gid, rows in members.items()}
        self._rows = members

    def __len__(self) -> int:
        return len(self.group_ids)

    def same_as(self, other: StepGroups) -> bool:
        """Whether ``other`` gives the same groups and rewards (a repeated ``set_groups`` call)."""
        return list(self.group_ids) == list(other.group_ids) and torch.equal(self.rewards, other.rewards)

    def group_std(self, unbiased: bool = True) -> dict:
        """``{group id: reward std}`` (Bessel-corrected like ``torch.std`` unless ``unbiased=False``).

        A group with one member has std 0.
        """
        return {gid: _std([self._values[i] for i in rows], unbiased) for gid, rows in self._rows.items()}

    def batch_std(self, unbiased: bool = True) -> float:
        """The std of all the step's rewards."""
        return _std(self._values, unbiased)

    def check_known(self, ids: list, where: str) -> None:
        """Refuse microbatch group ids that were not given to ``opt.set_groups``."""
        unknown = [gid for gid in ids if gid not in self.members]
        if unknown:
            raise InputError(
                f"{where}: group id(s) {unknown[:5]} are not among the step's groups given to "
                "opt.set_groups(); pass the same labels to both (set_groups once per step, before the "
                "first microbatch)"
            )


def _std(values: list[float], unbiased: bool) -> float:
    """Standard deviation of host numbers (0 for fewer than two)."""
    if len(values) < 2:
        return 0.0
    return statistics.stdev(values) if unbiased else statistics.pstdev(values)


def require_groups(context, who: str, need_ids: bool = True) -> StepGroups:
    """The step's groups from a microbatch ``context``, or a `ProtocolError` saying how to give them."""
    groups = context.step_groups
    if groups is None:
        raise ProtocolError(
            f"{context.where}: {who} needs the step's rewards and prompt groups; call "
            "opt.set_groups(group_ids, rewards) with all sequences of the step before its first "
            "microbatch"
        )
    if need_ids:
        if context.group_ids is None:
            raise ProtocolError(
                f"{context.where}: {who} needs to know which group each row belongs to; pass "
                "opt.microbatch(logp, mask, group_ids=...) with one id per row"
            )
        groups.check_known(context.group_ids, context.where)
    return groups

