"""FSDP2 (``fully_shard``): running gradients of sharded parameters.

Under FSDP2 a parameter is a ``DTensor`` sharded over the ranks, while the layer's forward and
backward see the unsharded weight -- so a captured layer's sequence gradients, and the strategy's
update, are full-size. gradproj therefore keeps each rank's running gradient of the covered
parameters as a plain full-size tensor (as FSDP2 itself does when gradient synchronisation is off
during accumulation), lets the strategy work on it, and at `ShardedGradients.sync` (once per
optimizer step: ``opt.sync_gradients()`` or ``opt.step()``) averages it over the ranks and writes
each rank's shard into ``param.grad`` as a ``DTensor`` with the parameter's placements.

Between microbatches ``param.grad`` is therefore ``None``; the running gradient is the rank-local
one (same data-parallel semantics as DDP: see `gradproj.capture.data_parallel`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["ShardedGradients", "is_sharded"]


def is_sharded(params) -> bool:
    """Whether any parameter is a ``DTensor`` (FSDP2 / tensor parallel)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)


class ShardedGradients:
    """Rank-local full-size running gradients of the covered parameters of an FSDP2 model."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.local: dict[int, torch.Tensor] = {}
        self.synced = False

    def get(self, param: torch.Tensor) -> torch.Tensor | None:
        """The running gradient of ``param`` on this rank (``None`` = 0)."""
        return self.local.get(id(param))

    def empty(self) -> bool:
        """Whether no running gradient is held (the step's first microbatch is still to come)."""
        return not self.local

    def set(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Replace the running gradient of ``param``."""
        self.local[id(param)] = value

    def sync(self) -> None:
        """Average over the ranks and write the shards into ``param.grad``; once per step."""
        if self.synced:
            return
        from torch.distributed.tensor import DTensor, distribute_tensor

        for param in self.params:
            if not param.requires_grad:
                continue
            full = self.local.get(id(param))
            if full is None:
                full = torch.zeros(param.shape, dtype=param.dtype, device=param.device)
            if isinstance(param, DTensor):
                group = param.device_mesh.get_group()
                dist.all_reduce(full, group=group)
                full.div_(dist.get_world_size(group))
                param.grad = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
            else:
                param.grad = full.to(param.dtype)
        self.local.clear()
        self.synced = True

    def reset(self) -> None:
        """A new optimizer step begins: forget the running gradients."""
        self.local.clear()
        self.synced = False
