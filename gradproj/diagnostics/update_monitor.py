"""Monitoring without a reference model: the policy's token entropy and the KL each update caused.

Both come from what a step already computes -- no reference model, no extra forward or backward:

* **Entropy** (always on): the mean surprisal ``-log pi(y_t | y_<t)`` of the sampled response
  tokens, from the log-probs given to ``opt.microbatch``. When the tokens were sampled from the
  current policy (on-policy), its expectation is the policy's mean token entropy: an unbiased
  Monte Carlo *estimate*, not the exact entropy (which needs the whole distribution at each
  position).
* **Per-step KL** (``wrap(..., kl_estimate=True)``): the KL between the policies before and after
  the previous optimizer step, to second order ``KL ~ 1/2 E_y[<s(y), dtheta>^2]`` -- the sequence-level
  Fisher quadratic form, with ``s(y) = grad log pi(y)`` the sequence gradients the capture
  builds in this step's backward and ``dtheta`` the previous update (parameters after minus before
  the inner step). Averaged over this step's sequences (sampled from the updated policy), it
  estimates ``KL(pi_after || pi_before)`` of that update; it is reported with the step after the
  update (none at the first step). Costs one copy of the trainable parameters (the update) and one
  inner product ``<s_i, dtheta>`` per parameter tensor and microbatch; with FSDP2 the update is
  gathered once per step (each rank then holds it in full) and each rank reports its own sequences.

Metrics (``gradproj/...``): ``entropy`` (nats per token), ``kl_estimate/per_token`` (the
sequence KL summed over the step's sequences, divided by their response tokens: the token-mean KL
PPO implementations log) and ``kl_estimate/per_sequence``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradproj.linalg.device_sums import DeviceSums

__all__ = ["UpdateMonitor", "StepReading"]


class UpdateMonitor:
    """Gathers the entropy and (optionally) the per-step KL estimate of one optimizer step.

    Args:
        params: the trainable parameters (whose update the KL estimate measures).
        kl: estimate the per-step KL (keeps a copy of the last update).
    """

    def __init__(self, params: Sequence[torch.Tensor], kl: bool) -> None:
        self.kl = kl
        self._params = [p for p in params if p.requires_grad]
        self._before: list[torch.Tensor] | None = None  # parameters during the inner step
        self._delta: dict[int, torch.Tensor] = {}  # id(param) -> the last update
        self._stepped = False
        self._entropy = DeviceSums(2)  # sum of -logp over valid tokens, valid tokens
        self._kl = DeviceSums(3)  # sum_i <s_i, dtheta>^2, sequences, their valid tokens
        self._open: tuple[torch.Tensor, torch.Tensor] | None = None  # this microbatch's entropy sums
        self._dots: torch.Tensor | None = None  # this microbatch's (k,) <s_i, dtheta>, summed over tensors

    # -- microbatches ----------------------------------------------------------------------
    def start(self, logp: torch.Tensor, mask: torch.Tensor) -> None:
        """A microbatch opened: its sampled tokens' surprisal (device tensors, read at metrics)."""
        surprisal = torch.where(mask, -logp.detach().double(), 0.0)  # (-inf log-probs off the mask: not NaN)
        self._open = (surprisal.sum(), mask.to(torch.float64).sum())
        self._dots = None

    def observe(self, param: torch.Tensor, seq) -> None:
        """One parameter tensor's sequence gradients (anything with ``inner``) in the open microbatch."""
        delta = self._delta.get(id(param))
        if delta is not None:
            self._add(seq.inner(delta))

    def observe_stacked(self, params: list[torch.Tensor], sequence_grads: torch.Tensor) -> None:
        """Stacked small tensors: ``sequence_grads`` is (L, k, numel), member l's rows."""
        for index, param in enumerate(params):
            delta = self._delta.get(id(param))
            if delta is not None:
                rows = sequence_grads[index]
                self._add(rows.double() @ delta.reshape(-1).to(device=rows.device, dtype=torch.float64))

    def _add(self, dots: torch.Tensor) -> None:
        dots = dots.reshape(-1).double()
        self._dots = dots if self._dots is None else self._dots + dots.to(self._dots.device)

    def close(self, applied: bool, k: int) -> None:
        """The microbatch closed: count it if its update was applied (not dropped, not failed)."""
        if applied and self._open is not None:
            surprisal, tokens = self._open
            self._entropy.add(surprisal, tokens)
            if self._dots is not None:
                self._kl.add((self._dots**2).sum(), float(k), tokens.to(self._dots.device))
        self._open, self._dots = None, None

    # -- the optimizer step ----------------------------------------------------------------
    def before_update(self) -> None:
        """Right before the inner optimizer's step: keep the parameters."""
        if self.kl:
            self._delta = {}  # every microbatch of the step has used it: at most one copy is held
            self._before = [p.detach().clone() for p in self._params]

    def after_update(self) -> None:
        """Right after the inner step: the update ``after - before`` replaces the kept copy."""
        if not self.kl or self._before is None:
            return
        delta = {}
        for param, before in zip(self._params, self._before):
            before.sub_(param.detach()).neg_()
            # FSDP2: each rank holds a shard of the update; its sequences need all of it (one all-gather
            # per parameter and step, in the same order on every rank)
            full = getattr(before, "full_tensor", None)
            delta[id(param)] = full() if full is not None else before
        self._delta = delta
        self._before = None
        self._stepped = True

    def end_step(self) -> None:
        """The optimizer step closed; a step whose inner step did not run (skipped) made no update."""
        if not self._stepped:
            self._delta = {}
        self._stepped = False

    # -- metrics ---------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """The step in progress: its entropy and KL estimate (one read from the device)."""
        return _read(self._entropy, self._kl)

    def take(self) -> StepReading:
        """The step's sums, to be read only if its metrics are asked for (no read at the step: a
        training loop that never looks costs no host synchronisation); the monitor starts anew."""
        reading = StepReading(self._entropy, self._kl)
        self._entropy, self._kl = DeviceSums(2), DeviceSums(3)
        return reading

    def release(self) -> None:
        """Drop the kept update and copies (the optimizer was detached)."""
        self._delta, self._before = {}, None
        self.reset()

    def reset(self) -> None:
        """Start a new step's sums (the last update is kept for the next step's estimate)."""
        self._entropy.clear()
        self._kl.clear()


class StepReading:
    """A finished step's monitor sums, read (once) when its metrics are asked for."""

    def __init__(self, entropy: DeviceSums, kl: DeviceSums) -> None:
        self._sums: tuple[DeviceSums, DeviceSums] | None = (entropy, kl)
        self._values: dict[str, float] = {}

    def values(self) -> dict[str, float]:
        """The metrics (read from the device at the first call)."""
        if self._sums is not None:
            self._values = _read(*self._sums)
            self._sums = None
        return dict(self._values)


def _read(entropy: DeviceSums, kl: DeviceSums) -> dict[str, float]:
    out: dict[str, float] = {}
    surprisal, tokens = entropy.values()
    if tokens > 0:
        out["entropy"] = surprisal / tokens
    squares, sequences, kl_tokens = kl.values()
    if sequences > 0:
        out["kl_estimate/per_sequence"] = 0.5 * squares / sequences
        if kl_tokens > 0:
            out["kl_estimate/per_token"] = 0.5 * squares / kl_tokens
    return out
