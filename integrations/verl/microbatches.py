"""One verl training micro-batch as one ``opt.microbatch(...)`` block.

verl's FSDP engine runs each training micro-batch as ``forward_step`` (forward, then the loss) and
``loss.backward()``, both inside ``_gradient_sync_context(is_last_micro_batch=...)``. gradproj opens
the block where the log-probs meet the loss (the ``gradproj`` policy loss) and closes it when that
context exits, right after the backward; after the last micro-batch it averages the running
gradients over the data-parallel ranks (``opt.sync_gradients()``), before verl clips them.

A `MicroBatchSlot` carries what the three places know: the optimizer (sync context), the
token layout of the micro-batch (``forward_step``: packed ``cu_seqlens`` with remove-padding, else
padded rows) and the open block (policy loss).
"""

from __future__ import annotations

import torch

from gradproj import MicrobatchHandle
from gradproj.errors import InputError, ProtocolError

__all__ = ["MicroBatchSlot", "current_slot", "push_slot", "pop_slot"]

_SLOTS: list[MicroBatchSlot] = []


class MicroBatchSlot:
    """The gradproj state of one training micro-batch of one verl engine."""

    def __init__(self, engine, optimizer, is_last: bool) -> None:
        self.engine = engine
        self.optimizer = optimizer
        self.is_last = is_last
        #: whether the strategy needs per-sequence gradients (else the micro-batch runs plainly)
        self.capture = bool(optimizer.captures)
        self.cu_seqlens: torch.Tensor | None = None
        self.described = False
        self.block: MicrobatchHandle | None = None

    def describe(self, micro_batch) -> None:
        """Record the micro-batch's token layout (called by the engine's ``forward_step``)."""
        from verl.utils import tensordict_utils as tu

        packed = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
        input_ids = micro_batch["input_ids"]
        if packed:
            if not getattr(input_ids, "is_nested", False):
                raise InputError(
                    "verl handed gradproj a remove-padding micro-batch whose input_ids are not a nested "
                    "(jagged) tensor; gradproj needs verl's NO_PADDING batches (the default data path)"
                )
            cu_seqlens = input_ids.offsets().to(torch.long)
            pad = self.engine._get_packed_pad_size(int(cu_seqlens[-1]))
            if pad:
                raise InputError(
                    f"verl pads the packed micro-batch by {pad} tokens (engine pad_to_length / bucketing); "
                    "gradproj needs the packed tokens unpadded: unset actor_rollout_ref.actor.fsdp_config.pad_to_length"
                )
            self.cu_seqlens = cu_seqlens
        else:
            self.cu_seqlens = None
        self.described = True

    def open(self, log_prob: torch.Tensor, response_mask: torch.Tensor) -> None:
        """Open ``opt.microbatch(log_prob, response_mask)`` (called by the policy loss)."""
        if not self.capture:
            return
        if self.block is not None:
            raise ProtocolError(
                "verl computed the 'gradproj' policy loss twice in one micro-batch; gradproj needs exactly one "
                "policy-loss term per micro-batch (no distillation or auxiliary policy losses)"
            )
        if not self.described:
            raise ProtocolError(
                "the 'gradproj' policy loss ran outside verl's FSDPEngineWithLMHead.forward_step; gradproj "
                "supports verl's FSDP language-model actor engine"
            )
        self.block = self.optimizer.begin_microbatch(log_prob, response_mask, cu_seqlens=self.cu_seqlens)

    def close(self, exc: BaseException | None) -> None:
        """Close the block after the backward (or abort it when the micro-batch raised)."""
        block, self.block = self.block, None
        if block is None:
            if self.capture and (exc is None or isinstance(exc, ProtocolError)):
                raise ProtocolError(
                    "a verl training micro-batch ran without the 'gradproj' policy loss, so gradproj saw no "
                    "log-probs: set actor_rollout_ref.actor.policy_loss.loss_mode=gradproj"
                ) from exc
            return
        block.close(exc)


def push_slot(slot: MicroBatchSlot) -> None:
    """Make ``slot`` the current training micro-batch."""
    _SLOTS.append(slot)


def pop_slot(slot: MicroBatchSlot) -> None:
    """Forget ``slot`` (the micro-batch is over)."""
    if slot in _SLOTS:
        _SLOTS.remove(slot)


def current_slot(engine=None) -> MicroBatchSlot | None:
    """The innermost open training micro-batch (of ``engine`` when given), or ``None``."""
    for slot in reversed(_SLOTS):
        if engine is None or slot.engine is engine:
            return slot
    return None
