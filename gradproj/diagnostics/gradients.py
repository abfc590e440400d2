"""Gradient diagnostics from the Gram of the sequence gradients (already there for the strategies).

Per parameter tensor and microbatch, with ``K`` the Gram of ``s_1..s_k`` and ``c`` the coefficients
the accumulation rule receives (after transforms):

* prompt-group gradients ``h_g = sum_{i in g} c_i s_i`` for the groups present in the microbatch
  (``group_ids`` of ``opt.microbatch``; without them every sequence is its own group); their Gram
  is ``M^T K M`` with ``M_ig = c_i [g(i) = g]``. Pairs of non-zero group gradients give
  ``|cos|``; reported: the mean |cos| and the fraction of pairs with |cos| < 0.15 (seed
  ``grpo-normalization``: > 90% of prompt pairs there), pooled over the step's microbatches, per
  layer and averaged over layers;
* sequence-gradient norms ``||s_i|| = sqrt(K_ii)`` (mean per layer, and over layers).

Only groups met in the same microbatch can be compared (cross-microbatch inner products would need
the sequence gradients of earlier microbatches, which are gone).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["GradientDiagnostics", "group_cosines", "ORTHOGONAL_BELOW"]

#: |cos| below this counts as "orthogonal" (the seed's threshold).
ORTHOGONAL_BELOW = 0.15


def group_cosines(gram: np.ndarray, coefficients: np.ndarray, group_ids) -> np.ndarray:
    """|cos| between the non-zero group gradients of one microbatch (upper-triangle pairs)."""
    k = gram.shape[0]
    labels = list(range(k)) if group_ids is None else list(group_ids)
    order = list(dict.fromkeys(labels))
    member = np.zeros((k, len(order)))
    for i, label in enumerate(labels):
        member[i, order.index(label)] = coefficients[i]
    h = member.T @ gram @ member
    norms = np.sqrt(np.maximum(np.diag(h), 0.0))
    alive = norms > 0.0
    h, norms = h[np.ix_(alive, alive)], norms[alive]
    if h.shape[0] < 2:
        return np.zeros(0)
    cos = np.abs(h / np.outer(norms, norms))
    upper = np.triu_indices(h.shape[0], 1)
    return np.minimum(cos[upper], 1.0)


class GradientDiagnostics:
    """Accumulates the step's diagnostics; the engine feeds it every parameter tensor's Gram."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new step."""
        self._cos: dict[str, list[np.ndarray]] = {}
        self._norms: dict[str, list[np.ndarray]] = {}
        self._pending: list[tuple] = []  # (name, gram, coefficients, group_ids) still on the device

    def observe(self, name: str, gram, coefficients, group_ids) -> None:
        """One parameter tensor in one microbatch: (k, k) Gram and (k,) coefficients (float64).

        Tensors are kept where they are and read when `metrics` is called (observing runs
        inside the backward: no host synchronisation there)."""
        self._pending.append((name, gram, coefficients, group_ids))

    def _read_pending(self) -> None:
        pending, self._pending = self._pending, []
        for name, gram, coefficients, group_ids in pending:
            gram = gram.detach().cpu().numpy() if isinstance(gram, torch.Tensor) else np.asarray(gram)
            if isinstance(coefficients, torch.Tensor):
                coefficients = coefficients.detach().cpu().numpy()
            if not np.isfinite(gram).all():
                continue
            self._cos.setdefault(name, []).append(group_cosines(gram, np.asarray(coefficients), group_ids))
            self._norms.setdefault(name, []).append(np.sqrt(np.maximum(np.diag(gram), 0.0)))

    def metrics(self, step_groups=None) -> dict[str, float]:
        """``diagnostics/...`` keys: averaged over layers, and ``diagnostics/layer/<name>/...``."""
        self._read_pending()
        out: dict[str, float] = {}
        layer_means, layer_fractions, layer_norms = [], [], []
        for name, chunks in self._cos.items():
            values = np.concatenate(chunks) if chunks else np.zeros(0)
            norms = np.concatenate(self._norms[name])
            out[f"diagnostics/layer/{name}/seq_grad_norm_mean"] = float(norms.mean()) if norms.size else 0.0
            layer_norms.append(float(norms.mean()) if norms.size else 0.0)
            if values.size:
                mean, fraction = float(values.mean()), float((values < ORTHOGONAL_BELOW).mean())
                out[f"diagnostics/layer/{name}/group_cos_abs_mean"] = mean
                out[f"diagnostics/layer/{name}/group_cos_below_0.15"] = fraction
                layer_means.append(mean)
                layer_fractions.append(fraction)
        if layer_means:
            out["diagnostics/group_cos_abs_mean"] = sum(layer_means) / len(layer_means)
            out["diagnostics/group_cos_below_0.15"] = sum(layer_fractions) / len(layer_fractions)
        if layer_norms:
            out["diagnostics/seq_grad_norm_mean"] = sum(layer_norms) / len(layer_norms)
        if step_groups is not None:
            stds = list(step_groups.group_std().values())
            out["diagnostics/reward_std_mean"] = sum(stds) / len(stds)
            out["diagnostics/zero_std_group_fraction"] = sum(1 for s in stds if s == 0.0) / len(stds)
        return {k: v for k, v in out.items() if math.isfinite(v)}
