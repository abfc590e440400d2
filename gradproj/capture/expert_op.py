"""The captured computation of a fused MoE experts module (transformers 5's ``*Experts``).

``y_t = sum over t's routed (expert e, weight w) of  w * down_e(gate(gate_up_e(x_t)))`` where
``gate_up_e``/``down_e`` are expert ``e``'s slices of the fused 3-D parameters (stored (E, out, in),
or (E, in, out) when transposed, with optional per-expert biases) and ``gate`` is the module's own
gating (``module._apply_gate``: SwiGLU, gpt-oss's clamped variant, ...). Token-expert pairs are
sorted by expert once per call; each expert runs two matmuls on its own tokens (no dense
materialisation over all experts). Expert ids outside ``[0, E)`` (transformers' sentinel for
dropped tokens) are skipped, as the module does.

The backward returns the gradients of the tokens and of the routing weights (so the router's own
gradient is exact) and hands the engine, per use, the token-level factors of every expert's
weights: ``(token rows, counts per expert, inputs, gate_up output grads, gate outputs, down output
grads)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from gradproj.capture.captured_call import CapturedOp

__all__ = ["ExpertsForm", "ExpertsOp", "experts_forward"]


@dataclass(frozen=True)
class ExpertsForm:
    """How a fused experts module computes: storage orientation and gating function."""

    transposed: bool
    gate: Callable[[torch.Tensor], torch.Tensor] = field(compare=False)


def _linear(x, weight, bias, transposed: bool):
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


def _route(top_k_index: torch.Tensor, num_experts: int):
    """``(pairs, tokens, counts)``: the valid token-expert pairs sorted by expert (stable), their
    token rows, and the number of pairs per expert (a host list: the per-expert loop needs it)."""
    flat = top_k_index.reshape(-1)
    pairs = torch.nonzero((flat >= 0) & (flat < num_experts)).squeeze(1)
    experts = flat.index_select(0, pairs)
    order = torch.sort(experts, stable=True).indices
    pairs = pairs.index_select(0, order)
    counts = torch.bincount(experts, minlength=num_experts).tolist()  # one host sync per call
    return pairs, pairs // top_k_index.shape[-1], counts


def _slices(counts):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


def experts_forward(form: ExpertsForm, x, top_k_index, top_k_weights, gate_up, down, gate_up_bias=None, down_bias=None):
    """The module's output, plus ``(pairs, tokens, counts, gate_up outputs, down outputs, weights)``."""
    pairs, tokens, counts = _route(top_k_index, gate_up.shape[0])
    xs = x.index_select(0, tokens)
    weights = top_k_weights.reshape(-1).index_select(0, pairs)
    h_all = xs.new_empty(xs.shape[0], gate_up.shape[2] if form.transposed else gate_up.shape[1])
    o_all = xs.new_empty(xs.shape[0], down.shape[2] if form.transposed else down.shape[1])
    for e, rows in _slices(counts):
        h = _linear(xs[rows], gate_up[e], None if gate_up_bias is None else gate_up_bias[e], form.transposed)
        o = _linear(form.gate(h), down[e], None if down_bias is None else down_bias[e], form.transposed)
        h_all[rows] = h
        o_all[rows] = o
    out = torch.zeros_like(x)
    out.index_add_(0, tokens, (o_all * weights.unsqueeze(-1).to(o_all.dtype)).to(out.dtype))
    return out, (pairs, tokens, counts, h_all, o_all, weights)


class ExpertsOp(CapturedOp):
    """The captured op of one fused experts module.

    Args of a call: ``x`` (N, d), ``top_k_index`` (N, K), ``top_k_weights`` (N, K), ``token_shape``
    (a constant: ``(B, T)`` of the flattened tokens, or ``None``), then ``gate_up``, ``down`` and the
    two biases (``None`` when absent).
    """

    n_inputs, n_params = 4, 4

    def __init__(self, form: ExpertsForm) -> None:
        self.form = form

    def forward(self, x, top_k_index, top_k_weights, token_shape, gate_up, down, gate_up_bias, down_bias):
        device_type = x.device.type
        if x.is_floating_point() and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            gate_up_c, down_c = gate_up.to(dtype), down.to(dtype)
            gub = None if gate_up_bias is None else gate_up_bias.to(dtype)
            db = None if down_bias is None else down_bias.to(dtype)
            with torch.autocast(device_type, enabled=False):
                out, route = experts_forward(self.form, x.to(dtype), top_k_index, top_k_weights, gate_up_c, down_c, gub, db)
            out = out.to(x.dtype)
        else:
            gate_up_c, down_c = gate_up, down
            out, route = experts_forward(self.form, x, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias)
        pairs, tokens, counts, h_all, o_all, weights = route
        meta: dict[str, Any] = {"counts": counts, "token_shape": token_shape, "rows": x.shape[0], "k_top": top_k_weights.shape}
        return out, (x, pairs, tokens, h_all, o_all, weights, gate_up_c, down_c), meta

    def _backward(self, meta, saved, grad_out):
        """Everything the backward needs, computed once per call (kept in ``meta``)."""
        if "backward" in meta:
            return meta["backward"]
        x, pairs, tokens, h_all, o_all, weights, gate_up, down = saved
        g = grad_out.to(o_all.dtype).index_select(0, tokens)
        d_weights = (g * o_all).sum(-1)
        d_out = g * weights.unsqueeze(-1).to(g.dtype)  # the down projection's output gradients
        xs = x.to(h_all.dtype).index_select(0, tokens)
        d_h, a_all = torch.empty_like(h_all), None
        d_xs = torch.empty_like(xs)
        for e, rows in _slices(meta["counts"]):
            with torch.enable_grad():
                h = h_all[rows].detach().requires_grad_(True)
                a = self.form.gate(h)
                d_a = d_out[rows] @ (down[e].T if self.form.transposed else down[e])
                (d_h[rows],) = torch.autograd.grad(a, h, d_a)
            if a_all is None:
                a_all = a.new_empty(h_all.shape[0], a.shape[1])
            a_all[rows] = a.detach()
            d_xs[rows] = d_h[rows] @ (gate_up[e].T if self.form.transposed else gate_up[e])
        if a_all is None:
            a_all = h_all.new_empty(0, 0)
        meta["backward"] = result = (xs, d_h, a_all, d_out, d_xs, d_weights)
        return result

    def input_grads(self, meta, saved, grad_out, needs):
        xs, d_h, a_all, d_out, d_xs, d_weights = self._backward(meta, saved, grad_out)
        x, pairs, tokens = saved[0], saved[1], saved[2]
        dx = None
        if needs[0]:
            dx = torch.zeros(x.shape, dtype=d_xs.dtype, device=x.device).index_add_(0, tokens, d_xs).to(x.dtype)
        dw = None
        if needs[2]:
            n, k_top = meta["k_top"]
            dw = torch.zeros(n * k_top, dtype=d_weights.dtype, device=x.device).index_copy_(0, pairs, d_weights)
            dw = dw.view(n, k_top).to(saved[5].dtype)
        return (dx, None, dw, None)

    def param_grads(self, meta, saved, grad_out, needs):
        xs, d_h, a_all, d_out, _, _ = self._backward(meta, saved, grad_out)
        gate_up, down = saved[6], saved[7]
        grads: list = [None, None, None, None]
        if needs[0]:
            grads[0] = torch.zeros(gate_up.shape, dtype=d_h.dtype, device=d_h.device)
        if needs[1]:
            grads[1] = torch.zeros(down.shape, dtype=d_out.dtype, device=d_out.device)
        if needs[2]:
            grads[2] = torch.zeros(gate_up.shape[0], d_h.shape[1], dtype=d_h.dtype, device=d_h.device)
        if needs[3]:
            grads[3] = torch.zeros(down.shape[0], d_out.shape[1], dtype=d_out.dtype, device=d_out.device)
        for e, rows in _slices(meta["counts"]):
            if grads[0] is not None:
                grads[0][e] = xs[rows].T @ d_h[rows] if self.form.transposed else d_h[rows].T @ xs[rows]
            if grads[1] is not None:
                grads[1][e] = a_all[rows].T @ d_out[rows] if self.form.transposed else d_out[rows].T @ a_all[rows]
            if grads[2] is not None:
                grads[2][e] = d_h[rows].sum(0)
            if grads[3] is not None:
                grads[3][e] = d_out[rows].sum(0)
        meta.pop("backward", None)
        return tuple(grads)

    def use(self, meta, saved, grad_out):
        xs, d_h, a_all, d_out, _, _ = self._backward(meta, saved, grad_out)
        meta.pop("backward", None)
        return (saved[2], meta["counts"], meta["rows"], meta["token_shape"], xs, d_h, a_all, d_out)
