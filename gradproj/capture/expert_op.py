"""The captured computation of a fused MoE experts module (transformers 5's ``*Experts``).

``y_t = sum over t's routed (expert e, weight w) of  w * down_e(gate(gate_up_e(x_t)))`` where
``gate_up_e``/``down_e`` are expert ``e``'s slices of the fused 3-D parameters (stored (E, out, in),
or (E, in, out) when transposed, with optional per-expert biases) and ``gate`` is the module's own
gating (``module._apply_gate``: SwiGLU, gpt-oss's clamped variant, ...). Token-expert pairs are
sorted by expert once per call; the experts' projections run as one grouped matmul each
(``torch.nn.functional.grouped_mm``, float32/bf16 with 16-byte aligned rows) or, otherwise
(float64, odd sizes), a loop of one matmul per expert on its own tokens -- never a dense
materialisation over all experts. The gating function is row-wise and runs on all rows at once. Expert ids outside ``[0, E)`` (transformers' sentinel for
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
from gradproj.linalg.expert_grads import index_counts

__all__ = ["ExpertsForm", "ExpertsOp", "experts_forward"]


@dataclass(frozen=True)
class ExpertsForm:
    """How a fused experts module computes: storage orientation and gating function."""

    transposed: bool
    gate: Callable[[torch.Tensor], torch.Tensor] = field(compare=False)


#: dtypes torch's grouped matmul takes (CPU and CUDA); float64 runs the per-expert loop
_GROUPED_DTYPES = (torch.float32, torch.bfloat16)


def _grouped_ok(rows: torch.Tensor, mat_b: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or rows.dtype not in _GROUPED_DTYPES or mat_b.dtype != rows.dtype:
        return False
    size = rows.element_size()
    return all(n * size % 16 == 0 for n in (rows.shape[-1], mat_b.shape[-2], mat_b.shape[-1])) and rows.shape[0] > 0


def expert_matmul(rows: torch.Tensor, mat_b: torch.Tensor, counts: list[int], offsets: torch.Tensor) -> torch.Tensor:
    """``rows[slice_e] @ mat_b[e]`` for the rows of each expert (sorted by expert, ``counts`` per
    expert): one grouped matmul where torch has one for the dtype and alignment, else a loop."""
    if _grouped_ok(rows, mat_b):
        try:
            return F.grouped_mm(rows, mat_b, offs=offsets)
        except RuntimeError:  # a layout this build's kernel does not take: the loop below
            pass
    out = rows.new_empty(rows.shape[0], mat_b.shape[-1])
    for e, part in _slices(counts):
        torch.mm(rows[part], mat_b[e], out=out[part])
    return out


def _route(top_k_index: torch.Tensor, num_experts: int, token_shape=None):
    """``(pairs, tokens, experts, counts, widths)``: the valid token-expert pairs sorted by expert
    (stable), their token rows and experts, and the number of pairs per expert -- a host list: the
    per-expert matmuls and sequence gradients are shaped by it; the one synchronisation of the call.

    With ``token_shape = (B, T)`` (the rows are a flattened (B, T) batch), the same read also brings
    each expert's largest number of rows from one of the B sequences (``widths``, else ``None``):
    the padded width of its per-sequence gradients, which the backward then needs not read."""
    flat = top_k_index.reshape(-1)
    pairs = torch.nonzero((flat >= 0) & (flat < num_experts)).squeeze(1)
    experts = flat.index_select(0, pairs)
    order = torch.sort(experts, stable=True).indices
    pairs, experts = pairs.index_select(0, order), experts.index_select(0, order)
    tokens = pairs // top_k_index.shape[-1]
    counts_t = index_counts(experts, num_experts)
    if token_shape is None or token_shape[0] * token_shape[1] != top_k_index.shape[0]:
        return pairs, tokens, experts, counts_t.tolist(), None
    batch = token_shape[0]
    slot = experts * batch + torch.div(tokens, token_shape[1], rounding_mode="floor")
    per_sequence = index_counts(slot, num_experts * batch).view(num_experts, batch).amax(dim=1)
    read = torch.cat([counts_t, per_sequence]).tolist()
    return pairs, tokens, experts, read[:num_experts], read[num_experts:]


def _slices(counts):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


def _in_out(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The expert weights as (E, in, out): ``rows @ W_e`` applies expert e."""
    return weight if transposed else weight.transpose(-2, -1)


def experts_forward(form: ExpertsForm, x, top_k_index, top_k_weights, gate_up, down, gate_up_bias=None, down_bias=None,
                    token_shape=None):
    """The module's output, plus ``(pairs, tokens, experts, counts, gate_up outputs, down outputs, weights,
    widths)`` (``widths``: see `_route`)."""
    pairs, tokens, experts, counts, widths = _route(top_k_index, gate_up.shape[0], token_shape)
    offsets = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
    xs = x.index_select(0, tokens)
    weights = top_k_weights.reshape(-1).index_select(0, pairs)
    h_all = expert_matmul(xs, _in_out(gate_up, form.transposed), counts, offsets)
    if gate_up_bias is not None:
        h_all = h_all + gate_up_bias.index_select(0, experts)
    o_all = expert_matmul(form.gate(h_all), _in_out(down, form.transposed), counts, offsets)
    if down_bias is not None:
        o_all = o_all + down_bias.index_select(0, experts)
    out = torch.zeros_like(x)
    out.index_add_(0, tokens, (o_all * weights.unsqueeze(-1).to(o_all.dtype)).to(out.dtype))
    return out, (pairs, tokens, experts, counts, h_all, o_all, weights, widths)


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
                out, route = experts_forward(self.form, x.to(dtype), top_k_index, top_k_weights, gate_up_c, down_c, gub, db,
                                             token_shape)
            out = out.to(x.dtype)
        else:
            gate_up_c, down_c = gate_up, down
            out, route = experts_forward(self.form, x, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias,
                                         token_shape)
        pairs, tokens, _, counts, h_all, o_all, weights, widths = route
        meta: dict[str, Any] = {"counts": counts, "widths": widths, "token_shape": token_shape, "rows": x.shape[0],
                                "k_top": top_k_weights.shape}
        return out, (x, pairs, tokens, h_all, o_all, weights, gate_up_c, down_c), meta

    def _backward(self, meta, saved, grad_out):
        """Everything the backward needs, computed once per call (kept in ``meta``)."""
        if "backward" in meta:
            return meta["backward"]
        x, pairs, tokens, h_all, o_all, weights, gate_up, down = saved
        counts = meta["counts"]
        offsets = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        g = grad_out.to(o_all.dtype).index_select(0, tokens)
        d_weights = (g * o_all).sum(-1)
        d_out = g * weights.unsqueeze(-1).to(g.dtype)  # the down projection's output gradients
        xs = x.to(h_all.dtype).index_select(0, tokens)
        d_a = expert_matmul(d_out, _in_out(down, self.form.transposed).transpose(-2, -1), counts, offsets)
        with torch.enable_grad():  # the gate's derivative, on every row at once (it is row-wise)
            h = h_all.detach().requires_grad_(True)
            a = self.form.gate(h)
            (d_h,) = torch.autograd.grad(a, h, d_a) if h.shape[0] else (torch.zeros_like(h),)
        d_xs = expert_matmul(d_h, _in_out(gate_up, self.form.transposed).transpose(-2, -1), counts, offsets)
        meta["backward"] = result = (xs, d_h, a.detach(), d_out, d_xs, d_weights)
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
        return (saved[2], meta["counts"], meta["rows"], meta["token_shape"], xs, d_h, a_all, d_out, meta["widths"])
