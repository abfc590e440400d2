"""One microbatch: validated inputs, the log-prob hook and the per-sequence coefficients.

The hook registered on ``logp`` receives ``w = dL/dlogp`` (shape (B, T)). It checks that ``w`` is
constant on the valid tokens of each row (SPEC section 1), stores ``c_i`` and returns the mask
instead, so every layer below receives the *unweighted* output gradients of
``sum_t mask[i, t] logp[i, t]``; the strategies re-apply ``c_i`` per sequence.
"""

from __future__ import annotations

from typing import Any

import torch

from gradproj.capture.layout import make_layout
from gradproj.errors import CoefficientError, InputError
from gradproj.work.context import MicrobatchContext
from gradproj.work.groups import as_group_ids

__all__ = ["Microbatch", "validate_inputs", "sequence_coefficients"]

_FIX_CONSTANT = (
    "The single-pass capture needs one loss coefficient per sequence. This usually means PPO "
    "clipping with a ratio != 1 (several epochs over the same rollouts, or off-policy data), a "
    "per-token KL penalty, an entropy bonus, or per-token advantages (token-level credit such as "
    "T-SPMO's) in the loss. Fix: train on-policy (one update per rollout, ratio == 1) or disable "
    "clipping, move the KL penalty into the reward, drop the entropy bonus -- or use "
    "strategy='none', which accepts any loss (per-token losses and advantages included)."
)


def validate_inputs(logp, mask, where: str):
    """Check ``logp`` and ``mask`` and return ``(mask_bool, seed)``; raise `InputError`.

    ``seed`` is the mask in ``logp``'s dtype -- the gradient the hook returns.
    """
    if not isinstance(logp, torch.Tensor):
        raise InputError(f"{where}: logp must be a torch.Tensor of per-token log-probs, got {type(logp).__name__}")
    if logp.dim() != 2:
        raise InputError(
            f"{where}: logp must have shape (sequences, tokens), got {tuple(logp.shape)}; gather the "
            "log-probs of the sampled tokens first (e.g. log_softmax(logits).gather(-1, ids))"
        )
    if not logp.is_floating_point():
        raise InputError(f"{where}: logp must be a floating-point tensor, got dtype {logp.dtype}")
    if not logp.requires_grad:
        raise InputError(
            f"{where}: logp does not require grad -- it was computed under torch.no_grad() / "
            "inference_mode, detached, or the model has no trainable parameters. Compute the "
            "policy's log-probs with gradients enabled (only reference/old log-probs go under no_grad)."
        )
    if mask is None:
        mask_bool = torch.ones(logp.shape, dtype=torch.bool, device=logp.device)
    else:
        if not isinstance(mask, torch.Tensor):
            raise InputError(f"{where}: mask must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(logp.shape):
            raise InputError(
                f"{where}: mask has shape {tuple(mask.shape)} but logp has shape {tuple(logp.shape)}; "
                "pass the response mask aligned with logp (same rows and token positions)"
            )
        if mask.dtype == torch.bool:
            mask_bool = mask
        elif mask.is_complex():
            raise InputError(f"{where}: mask must be bool or 0/1 valued, got dtype {mask.dtype}")
        else:
            values_ok = bool(((mask == 0) | (mask == 1)).all())
            if not values_ok:
                raise InputError(
                    f"{where}: mask (dtype {mask.dtype}) has values other than 0 and 1; it must mark "
                    "which tokens count, not weight them -- put token weights into the loss instead"
                )
            mask_bool = mask != 0
        if mask_bool.device != logp.device:
            raise InputError(f"{where}: mask is on {mask_bool.device} but logp is on {logp.device}; move it")
    return mask_bool.detach(), mask_bool.detach().to(logp.dtype)


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-5}.get(dtype, 1e-2)


def sequence_coefficients(w: torch.Tensor, mask: torch.Tensor, where: str) -> torch.Tensor | None:
    """Per-row coefficients ``c_i`` (float64) from ``w = dL/dlogp``; ``None`` if ``w`` is not finite.

    Raises:
        CoefficientError: ``w`` varies along the valid tokens of a row, or is non-zero on a
            masked-out token (that gradient could not be represented).
    """
    w64 = w.detach().to(torch.float64)
    counts = mask.sum(dim=1)
    coeffs = (w64 * mask).sum(dim=1) / counts.clamp(min=1)
    # relative to each row's own largest weight: a row whose weights are all small (advantage 0 with a
    # per-token penalty) is judged on its own scale, not the microbatch's
    scale = (w64.abs() * mask).amax(dim=1) if w64.shape[1] else coeffs * 0
    tol_rows = _tolerance(w.dtype) * scale
    tol = _tolerance(w.dtype) * (w64.abs().amax() if w64.numel() else w64.new_zeros(()))
    deviation = ((w64 - coeffs[:, None]).abs() * mask).amax(dim=1) if w64.shape[1] else coeffs * 0
    leaked = (w64.abs() * (~mask)).amax(dim=1) if w64.shape[1] else coeffs * 0
    # every check in one read from the device: the only host synchronisation of the backward
    finite, varying, leaking = torch.stack(
        [torch.isfinite(w64).all(), (deviation > tol_rows).sum(), (leaked > tol).sum()]
    ).tolist()
    if not finite:
        return None
    if varying:
        row = int(torch.nonzero(deviation > tol_rows).flatten()[0])
        raise CoefficientError(
            f"{where}: the loss's per-token weights dL/dlogp are not constant along row {row} "
            f"(max deviation {float(deviation[row]):.3g} from the row mean {float(coeffs[row]):.3g} over "
            f"{int(counts[row])} valid tokens; {int(varying)} row(s) affected). {_FIX_CONSTANT}"
        )
    if leaking:
        row = int(torch.nonzero(leaked > tol).flatten()[0])
        raise CoefficientError(
            f"{where}: the loss has a non-zero gradient ({float(leaked[row]):.3g}) on masked-out tokens "
            f"of row {row}; gradproj only sees the tokens the mask marks. Multiply the per-token loss "
            "by the same mask you pass to opt.microbatch(), or pass the mask the loss really uses."
        )
    return coeffs


class Microbatch:
    """State of one ``opt.microbatch(...)`` block.

    Attributes:
        k: number of sequences (rows of ``logp``).
        layout: how layer activations map to the k sequences (padded or packed).
        index: position of this microbatch in the current optimizer step (0-based).
        coefficients: ``c`` (float64, (k,)) once the backward reached ``logp``.
        dropped: True once a non-finite value was seen; nothing of it reaches ``.grad``.
        group_ids: the prompt group of each row (``None`` if the pipeline gave none).
        step_groups: the step's `gradproj.work.StepGroups` (or ``None``).
        context: the read-only `gradproj.work.MicrobatchContext` coefficient transforms get.
        error: the error gradproj raised inside this block's backward, if any (the block is then
            discarded even if the user's code caught it).
    """

    def __init__(
        self,
        logp: torch.Tensor,
        mask: torch.Tensor | None,
        index: int,
        cu_seqlens=None,
        position_ids=None,
        group_ids=None,
        step_groups=None,
    ) -> None:
        self.index = index
        self.where = f"opt.microbatch() #{index} of this step"
        self.mask, self.seed = validate_inputs(logp, mask, self.where)
        self._mask_source = mask  # the caller's tensor: changed in place inside the block is refused
        self._mask_version = None if mask is None else mask._version
        self.k = logp.shape[0]
        # log-probs of several tokens per sequence: the model's activations have a token axis
        self.layout = make_layout(self.k, cu_seqlens, position_ids, self.where, token_axis=logp.shape[1] > 1)
        self.group_ids = None if group_ids is None else as_group_ids(group_ids, self.where)
        if self.group_ids is not None and len(self.group_ids) != self.k:
            raise InputError(
                f"{self.where}: {len(self.group_ids)} group ids for {self.k} rows of logp; give one per row"
            )
        self.step_groups = step_groups
        self.context = MicrobatchContext(index, self.where, self.k, self.group_ids, step_groups, self.mask)
        self.coefficients: torch.Tensor | None = None
        self.fired = False
        self.dropped = False
        self.plain = False  # layers return ordinary gradients (G was 0 everywhere)
        self.uses: dict = {}
        self.staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.filled: dict = {}  # ParamGroup -> row indices written in this microbatch
        self.pieces: dict[int, tuple] = {}  # tied parameter -> (param, name, pieces so far)
        self.unverified: list[torch.Tensor] = []  # staged updates still to check for NaN/inf
        self.finite_flags: list[torch.Tensor] = []  # 0-dim bool tensors rules vouched with, read at the close
        self.written: list[torch.Tensor] = []  # parameters whose .grad took an unchecked update
        self.deferred_writes: list = []  # direct writes: (param, update) waiting for finish_microbatch()
        self.deferred_bytes = 0
        self.touched: set = set()  # layers whose backward reached the engine in this microbatch
        self.finalized: set = set()  # layers whose sequence gradients were built in this microbatch
        self.logp_edge: tuple | None = None  # (logp.grad_fn, logp.output_nr): where a walk for stray loss terms stops
        self.fresh = False  # every gradient it may change was empty when the block opened
        self.grads_seen: list = []  # (param, its .grad, that tensor's version) when the block opened
        self.backward_calls = 0  # backward calls started inside the block
        self.error: BaseException | None = None  # an error raised by gradproj inside the backward
        self.failure: BaseException | None = None  # whatever ended the block with an exception
        self.logp: torch.Tensor | None = None
        self.hook_id = -1  # gradproj's hook on logp (hooks registered after it are refused)
        self.hook_handle: Any = None  # its RemovableHandle
        self.watcher: Any = None  # the engine's watcher of backward calls while the block is open

    def check_mask_unchanged(self) -> None:
        """Refuse a mask changed in place after the block opened (the gradient sent down is a copy)."""
        if self._mask_source is not None and self._mask_source._version != self._mask_version:
            raise InputError(
                f"{self.where}: the mask given to opt.microbatch() was changed in place inside the block; gradproj "
                "uses the mask as it was when the block opened. Build the final mask before opening the block"
            )

    def stage(self, param: torch.Tensor, update: torch.Tensor, finite: bool | torch.Tensor = False) -> None:
        """Remember ``update`` for ``param`` (adding up several uses, e.g. tied weights).

        ``finite=False`` updates are checked for NaN/inf before anything is applied; a tensor
        ``finite`` (the rule's own flag, on the device) is read when the microbatch closes.
        """
        key = id(param)
        self.vouch(update, finite)
        if key in self.staged:
            self.staged[key][1].add_(update)
        else:
            self.staged[key] = (param, update)

    def vouch(self, update: torch.Tensor, finite: bool | torch.Tensor) -> None:
        """Note how ``update``'s finiteness is known: checked at the close (``False``), a device
        flag read at the close (a tensor), or established by the rule (``True``)."""
        if isinstance(finite, torch.Tensor):
            self.finite_flags.append(finite.reshape(()))
        elif not finite:
            self.unverified.append(update)

    def drop(self) -> None:
        """Discard everything staged: this microbatch will not change any gradient."""
        self.dropped = True
        self.deferred_writes.clear()
        self.staged.clear()
        self.uses.clear()
        self.filled.clear()
        self.pieces.clear()
        self.unverified.clear()
        self.finite_flags.clear()
        self.written.clear()
