"""Layer handler for fused MoE experts: transformers 5's ``Qwen3MoeExperts``, ``MixtralExperts``,
``Qwen2MoeExperts``, ``OlmoeExperts``, ``GptOssExperts``, ... -- and any module that computes the same.

Recognised by structure, not by class: a module holding 3-D ``gate_up_proj`` and ``down_proj``
parameters (and optionally ``gate_up_proj_bias``/``down_proj_bias``), called as
``experts(tokens (N, d), top_k_index (N, K), top_k_weights (N, K))``, whose class forward -- under
whichever ``experts_implementation`` the model's config selects -- reproduces
`gradproj.capture.expert_op.experts_forward` with its own gating function on a probe input.

The tokens arrive flattened (``(B*T, d)`` or packed ``(total, d)``); which sequence each row
belongs to comes from the rows' provenance (`gradproj.capture.token_rows`) and the
microbatch's layout. Expert ``e``'s slice of each parameter gets the sequence gradients of a linear
weight (or bias) over the tokens routed to ``e`` only, grouped by sequence
(`gradproj.linalg.expert_grads`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradproj.capture.captured_call import CapturedCall, captures
from gradproj.capture.expert_op import ExpertsForm, ExpertsOp, experts_forward
from gradproj.capture.forwards import install_forward, runs_class_forward
from gradproj.capture.handlers import LayerHandler, compute_dtype
from gradproj.capture.layout import PaddedLayout
from gradproj.capture.probe import ProbedForms, class_forward_on
from gradproj.capture.token_rows import flattened_token_shape
from gradproj.linalg.expert_grads import ExpertStackGrads, index_counts, rows_by_sequence
from gradproj.linalg.linear_grads import BlockedLinearGrads, GhostLinearGrads, choose_linear_form
from gradproj.linalg.sequence_grads import TokenSumGrads
from gradproj.plugins.hookspecs import hookimpl

__all__ = ["EXPERT_PARAMS", "FusedExpertsHandler", "expert_factors", "install_experts_capture", "recognise_experts"]

#: the parameters of a fused experts module (the biases are optional)
EXPERT_PARAMS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


def _default_gate(module: nn.Module):
    act_fn: Any = module.act_fn

    def gate(h: torch.Tensor) -> torch.Tensor:
        g, u = h.chunk(2, dim=-1)
        return act_fn(g) * u

    return gate


def _gate_of(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    apply_gate: Any = getattr(module, "_apply_gate", None)
    if callable(apply_gate):
        return apply_gate
    return _default_gate(module) if callable(getattr(module, "act_fn", None)) else None


def recognise_experts(module: nn.Module) -> ExpertsForm | None:
    """The module's form if its class forward computes fused experts (float64 probe), else None."""
    own = dict(module.named_parameters(recurse=False))
    gate_up, down = own.get("gate_up_proj"), own.get("down_proj")
    if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3 or set(own) - set(EXPERT_PARAMS):
        return None
    if any(True for child in module.children() for _ in child.parameters()):
        return None
    gate = _gate_of(module)
    if gate is None:
        return None
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):  # grouped_mm has no float64
        form = _probe(module, own, gate, dtype, rtol)
        if form is not None:
            return form
    return None


def _probe(module: nn.Module, own: dict, gate, dtype: torch.dtype, rtol: float) -> ExpertsForm | None:
    gate_up, down = own["gate_up_proj"], own["down_proj"]
    num_experts = gate_up.shape[0]
    generator = torch.Generator().manual_seed(0)
    probe: dict[str, torch.Tensor | None] = dict.fromkeys(EXPERT_PARAMS)
    probe.update({name: torch.randn(p.shape, generator=generator, dtype=dtype) for name, p in own.items()})
    declared = bool(getattr(module, "is_transposed", False))
    for transposed in (declared, not declared):
        hidden = gate_up.shape[1] if transposed else gate_up.shape[2]
        if (down.shape[2] if transposed else down.shape[1]) != hidden:
            continue
        form = ExpertsForm(transposed, gate)
        n, k_top = 6, min(2, num_experts)
        x = torch.randn(n, hidden, generator=generator, dtype=dtype)
        index = torch.stack([torch.randperm(num_experts, generator=generator)[:k_top] for _ in range(n)])
        weights = torch.rand(n, k_top, generator=generator, dtype=dtype)
        expected = class_forward_on(module, probe, x, index, weights)
        try:
            with torch.no_grad():
                got, _ = experts_forward(form, x, index, weights, probe["gate_up_proj"], probe["down_proj"],
                                         probe["gate_up_proj_bias"], probe["down_proj_bias"])
        except Exception:
            continue
        if (
            isinstance(expected, torch.Tensor)
            and expected.shape == got.shape
            and torch.allclose(expected, got, rtol=rtol, atol=rtol * float(got.abs().max()))
        ):
            return form
    return None


class FusedExpertsHandler(LayerHandler):
    """Fused MoE experts (see the module doc): every expert's slice exact, per sequence."""

    module_types: tuple[type, ...] = ()
    structural = True
    parameter_names = EXPERT_PARAMS
    provides_tokens = True

    def __init__(self) -> None:
        #: the module's recognised form (probed once per module), or ``None``
        self.form: ProbedForms[ExpertsForm | None] = ProbedForms(recognise_experts)

    def accepts(self, module: nn.Module) -> bool:
        """Modules running their class forward that compute fused experts."""
        return runs_class_forward(module) and self.form(module) is not None

    def install(self, module: nn.Module, layer) -> Callable[[], None]:
        """Run the experts through the captured op while capture is on."""
        form = self.form(module)
        assert form is not None  # (accepted)
        return install_experts_capture(module, layer, form)

    def sequence_gradients(self, layer, uses, layout, gram: str, workspace=None, slots=None) -> dict:
        """Per expert, the sequence gradients of its slices over the tokens routed to it."""
        module = layer.module
        form = self.form(module)
        assert form is not None  # (accepted)
        num_experts = module.gate_up_proj.shape[0]
        dtype = compute_dtype(module.gate_up_proj.dtype)
        trained = {name for name in EXPERT_PARAMS if getattr(module, name, None) is not None and getattr(module, name).requires_grad}
        blocks: dict[str, list] = {name: [None] * num_experts for name in trained}
        for e, factors in enumerate(expert_factors(layer, uses, layout, num_experts, dtype)):
            if factors is None:
                continue
            x_, h_, a_, o_ = factors  # only the trained tensors' sequence gradients are built
            if "gate_up_proj" in trained:
                blocks["gate_up_proj"][e] = _weight(x_, h_, gram, form.transposed, workspace)
            if "down_proj" in trained:
                blocks["down_proj"][e] = _weight(a_, o_, gram, form.transposed, workspace)
            if "gate_up_proj_bias" in trained:
                blocks["gate_up_proj_bias"][e] = TokenSumGrads(h_)
            if "down_proj_bias" in trained:
                blocks["down_proj_bias"][e] = TokenSumGrads(o_)
        return {name: ExpertStackGrads(blocks[name], layout.k, getattr(module, name).shape, dtype,
                                       getattr(module, name).device) for name in trained}


def install_experts_capture(module: nn.Module, layer, form: ExpertsForm) -> Callable[[], None]:
    """Install on the fused experts ``module`` a forward that runs `ExpertsOp` for ``layer``
    while capture is on; the parameters are read at each call (peft's LoRA parametrizes them)."""
    op = ExpertsOp(form)
    original = type(module).forward
    signature = inspect.signature(original)

    def forward(*args, **kwargs):
        params = [getattr(module, name, None) for name in EXPERT_PARAMS]
        if not captures(layer, *params):
            return original(module, *args, **kwargs)
        bound = signature.bind(module, *args, **kwargs)
        x, index, weights = list(bound.arguments.values())[1:4]
        return CapturedCall.apply(op, layer, x, index, weights, flattened_token_shape(x), *params)

    return install_forward(module, forward)


def expert_factors(layer, uses, layout, num_experts: int, dtype: torch.dtype) -> list:
    """Per expert, its tokens' factors grouped by sequence -- ``(inputs, gate_up output grads, gate
    outputs, down output grads)``, each (k, C, .) in ``dtype`` -- or ``None`` if no token reached it.
    ``uses`` are `gradproj.capture.expert_op.ExpertsOp` uses."""
    pieces: list[list] = [[] for _ in range(num_experts)]
    known: list | None = [0] * num_experts  # widths the forwards read with their routing (padded layouts)
    for tokens, counts, rows, token_shape, xs, d_h, a_all, d_out, forward_widths in uses:
        padded = isinstance(layout, PaddedLayout) and token_shape is not None and token_shape[0] == layout.k
        if known is not None and padded and forward_widths is not None:
            known = [a + b for a, b in zip(known, forward_widths)]  # (several uses: an upper bound, still exact)
        else:
            known = None
        sequence = layout.sequence_of_rows(tokens, rows, token_shape, layer)
        start = 0
        for e, n in enumerate(counts):
            if n:
                part = slice(start, start + n)
                pieces[e].append((sequence[part], xs[part], d_h[part], a_all[part], d_out[part]))
            start += n
    columns: list[Any] = [None if not parts else tuple(torch.cat(c) if len(parts) > 1 else c[0] for c in zip(*parts)) for parts in pieces]
    # the padded width of every expert: read with the routing in the forward (padded layouts), else
    # here for every expert at once -- one host synchronisation per layer, not per expert
    present = [e for e, c in enumerate(columns) if c is not None]
    widths: dict[int, int] = {}
    if known is not None:
        widths = {e: known[e] for e in present}
    elif present:
        largest = torch.stack([index_counts(columns[e][0], layout.k).max() for e in present])
        widths = dict(zip(present, largest.tolist()))
    out: list = []
    for e, column in enumerate(columns):
        if column is None:
            out.append(None)
            continue
        sequence, xs, d_h, a_all, d_out = column
        grouped = rows_by_sequence(sequence, layout.k, xs, d_h, a_all, d_out, width=widths[e])
        out.append(tuple(t if t.dtype == dtype else t.to(dtype) for t in grouped))
    return out


def _weight(inputs: torch.Tensor, out_grads: torch.Tensor, gram: str, transposed: bool, workspace):
    """One expert's weight slice: ``s_i = D_i^T A_i`` stored (out, in), or ``A_i^T D_i`` transposed.

    Ghost form when the cost rule picks it; otherwise the slice's k sequence gradients are built in
    the shared workspace only while its Gram is computed, and combinations come from the factors
    (`gradproj.linalg.linear_grads.BlockedLinearGrads` with one block): memory for one
    expert's slice at a time, never all experts' at once."""
    left, right = (inputs, out_grads) if transposed else (out_grads, inputs)  # s_i = left_i^T right_i
    k, tokens = right.shape[0], right.shape[0] * right.shape[1]
    seq: GhostLinearGrads | BlockedLinearGrads
    if choose_linear_form(k, tokens, right.shape[-1], left.shape[-1], gram) == "ghost":
        seq = GhostLinearGrads(right, left)
    else:
        seq = BlockedLinearGrads(right, left, workspace, block_rows=left.shape[-1])
    if transposed:
        seq.out_side = "A"
    return seq


@hookimpl
def gradproj_layer_handlers():
    """Register the structural handler for fused MoE experts."""
    return [FusedExpertsHandler()]
