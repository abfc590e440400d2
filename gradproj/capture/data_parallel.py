"""Data parallel (DDP): gradproj takes over DistributedDataParallel's gradient all-reduce.

Captured layers hand their parameter gradients to the strategy instead of autograd, so DDP's
reducer -- which all-reduces a parameter when autograd produces its gradient -- would never see
them. When a strategy captures, gradproj therefore runs the DDP model permanently in ``no_sync``
mode (``require_backward_grad_sync = False``): every rank accumulates its own microbatches with the
strategy, and `DataParallelSync.sync` averages the resulting ``.grad`` over the ranks once per
optimizer step (``opt.sync_gradients()``, or automatically in ``opt.step()``).

Semantics (SPEC 2.2, issue 5): ``none`` and ``intra_proma`` give the average over ranks of each
rank's sum of microbatch gradients, i.e. one process accumulating the union of all ranks'
microbatches with the loss scaled by ``1 / world_size``; ``proma`` projects locally per rank (each
rank's running gradient against its own microbatches), then averages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gradproj.errors import ProtocolError

__all__ = ["DataParallelSync", "is_ddp"]


def is_ddp(model) -> bool:
    """Whether ``model`` is a ``torch.nn.parallel.DistributedDataParallel``."""
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


class DataParallelSync:
    """Owns the gradient synchronisation of one DDP model while gradproj is attached."""

    def __init__(self, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        self.ddp = ddp
        self.group = ddp.process_group
        self.synced = False
        self._previous = ddp.require_backward_grad_sync
        ddp.require_backward_grad_sync = False

    @property
    def world_size(self) -> int:
        """Number of ranks in the DDP process group."""
        return dist.get_world_size(self.group)

    def check_not_synced(self, where: str) -> None:
        """Refuse a microbatch after the step's gradients were already averaged."""
        if self.synced:
            raise ProtocolError(
                f"{where}: the gradients of this step were already averaged over the ranks "
                "(opt.sync_gradients()); call it after the last microbatch, before clipping and opt.step()"
            )

    def sync(self, params: list[torch.nn.Parameter]) -> None:
        """Average ``.grad`` of ``params`` over the ranks (missing gradients count as zero); once per step."""
        if self.synced:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for index, grad in enumerate(grads):
            by_dtype.setdefault(grad.dtype, []).append(index)
        world = self.world_size
        for indices in by_dtype.values():
            flat = torch.cat([grads[i].reshape(-1) for i in indices])
            dist.all_reduce(flat, group=self.group)
            flat.div_(world)
            offset = 0
            for i in indices:
                p = params[i]
                value = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is None:
                    p.grad = value.clone()
                else:
                    p.grad.copy_(value)
        self.synced = True

    def reset(self) -> None:
        """A new optimizer step begins."""
        self.synced = False

    def release(self) -> None:
        """Give the synchronisation back to DDP."""
        self.ddp.require_backward_grad_sync = self._previous
