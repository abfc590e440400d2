"""peft LoRA on model *parameters* (``target_parameters``): fused MoE expert tensors and routers --
what ``target_modules="all-linear"`` selects on Qwen3-MoE, Mixtral, ... with peft >= 0.17.

peft wraps the module in a ``ParamWrapper`` per targeted parameter (nested when several are
targeted). During the forward, each wrapper parametrizes its parameter as ``W = W0 + s * B A``
(per expert for a fused (E, ., .) tensor, ``get_delta_factors``), from ``lora_A`` of shape (r*E, in)
-- expert e's ``A_e`` is rows ``e*r:(e+1)*r`` -- and ``lora_B`` of shape (out, r*E) -- ``B_e`` is
the columns ``j*E + e`` (E = 1 for a router's 2-D weight). The adapters never run as modules, so
nothing of theirs can be captured; the wrapped module can. It runs captured on the parametrized
weights (fused experts: `gradproj.capture.expert_op`; a router: its ``F.linear``,
`gradproj.capture.functional_linear`), its backward returns no gradient for them (none
reaches ``lora_A``/``lora_B`` through autograd) and hands the engine the token factors of each
projection -- its input ``x_t`` and output gradient ``y_t``. Per expert and sequence (whatever the
storage orientation)::

    dA_e = s * sum_t (B_e^T y_t) x_t^T        dB_e = s * sum_t y_t (A_e x_t)^T

-- linear-weight sequence gradients over the expert's tokens, in the blocks of ``lora_A``
(leading) and ``lora_B`` (trailing) (`gradproj.linalg.expert_grads.ExpertStackGrads`).

Covered: one active, unmerged adapter per wrapper, without DoRA or ``lora_bias``, on ``gate_up_proj``
and/or ``down_proj`` of a module `gradproj.capture.experts_handler.FusedExpertsHandler`
recognises, or on the ``weight`` of a module that uses it only through ``F.linear`` (a router); the
wrapped module's own parameters frozen. Token-factor strategies (``intra_proma``) project each
expert's block of ``lora_A``/``lora_B`` with that expert's tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradproj.capture.experts_handler import expert_factors, install_experts_capture, recognise_experts
from gradproj.capture.forwards import runs_class_forward
from gradproj.capture.functional_linear import install_linear_capture, uses_only_linear
from gradproj.capture.handlers import LayerHandler, compute_dtype
from gradproj.capture.probe import ProbedForms
from gradproj.linalg.expert_grads import ExpertStackGrads
from gradproj.linalg.linear_grads import linear_weight_grads
from gradproj.plugins.hookspecs import hookimpl

__all__ = ["ParamLoraHandler"]


def _is_wrapper(module: nn.Module) -> bool:
    """peft's ``ParamWrapper`` (LoRA on a parameter), recognised by its interface."""
    return all(hasattr(module, name) for name in ("parameter_name", "lora_A", "lora_B", "scaling", "base_layer"))


def _chain(module: Any) -> list[tuple[str, Any]] | None:
    """``[(path prefix, wrapper)]`` from ``module`` inwards, or ``None`` if it is not a wrapper."""
    chain, prefix = [], ""
    while _is_wrapper(module):
        chain.append((prefix, module))
        prefix += "base_layer."
        module = module.base_layer
    return chain or None


def _adapter(wrapper: Any) -> str | None:
    """The wrapper's one active LoRA adapter, if the wrapper is in a form this handler computes."""
    active = [a for a in getattr(wrapper, "active_adapters", ()) if a in wrapper.lora_A]
    if len(active) != 1 or getattr(wrapper, "merged_adapters", None):
        return None
    name = active[0]
    if getattr(wrapper, "use_dora", {}).get(name) or wrapper.lora_B[name].bias is not None:
        return None
    return name


def _projection_dims(base: Any, kind: str) -> dict[str, tuple[int, int]]:
    """``{parameter name: (in, out)}`` of the wrapped module's projections."""
    if kind == "linear":
        out_features, in_features = base.weight.shape
        return {"weight": (int(in_features), int(out_features))}
    form = recognise_experts(base)
    assert form is not None
    gate_up, down = base.gate_up_proj.shape, base.down_proj.shape
    if form.transposed:  # stored (E, in, out)
        return {"gate_up_proj": (int(gate_up[1]), int(gate_up[2])), "down_proj": (int(down[1]), int(down[2]))}
    return {"gate_up_proj": (int(gate_up[2]), int(gate_up[1])), "down_proj": (int(down[2]), int(down[1]))}


def _recognise(module: nn.Module) -> str | None:
    """``"experts"``/``"linear"`` if ``module`` is the outermost of a chain of LoRA wrappers over
    recognised fused experts or an ``F.linear``-only module (a router), else ``None``."""
    chain = _chain(module)
    if chain is None:
        return None
    base: Any = chain[-1][1].base_layer
    if not runs_class_forward(base) or any(p.requires_grad for p in base.parameters(recurse=False)):
        return None  # (training a module and its adapters at once: refused by the plan)
    if recognise_experts(base) is not None:
        kind, experts = "experts", base.gate_up_proj.shape[0]
    elif not isinstance(base, nn.Linear) and uses_only_linear(base):
        kind, experts = "linear", 1
    else:
        return None
    dims = _projection_dims(base, kind)
    for _, wrapper in chain:
        name = _adapter(wrapper)
        if name is None or wrapper.parameter_name not in dims or getattr(wrapper, "num_experts", experts) != experts:
            return None
        weight_a, weight_b = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight
        if weight_a.shape[0] % experts or weight_b.shape[1] != weight_a.shape[0]:
            return None
        if (weight_a.shape[1], weight_b.shape[0]) != dims[wrapper.parameter_name]:
            return None
    return kind


class ParamLoraHandler(LayerHandler):
    """peft LoRA adapters on fused expert tensors and routers (see the module doc)."""

    module_types: tuple[type, ...] = ()
    covers_descendants = True
    provides_tokens = True

    def __init__(self) -> None:
        #: what a module wraps, if it is the outermost LoRA wrapper of a covered module (probed once)
        self.kind: ProbedForms[str | None] = ProbedForms(_recognise)

    def accepts(self, module: nn.Module) -> bool:
        """The outermost peft ``ParamWrapper`` of a chain over recognised experts or a router."""
        return self.kind(module) is not None

    def covered_parameters(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Every wrapper's ``lora_A``/``lora_B`` weights of its active adapter, as dotted paths."""
        out = []
        for prefix, wrapper in _chain(module) or []:
            name = _adapter(wrapper)
            for side in ("lora_A", "lora_B"):
                out.append((f"{prefix}{side}.{name}.weight", getattr(wrapper, side)[name].weight))
        return out

    def install(self, module: nn.Module, layer) -> Callable[[], None]:
        """Run the wrapped module captured, on its parametrized weights."""
        chain = _chain(module)
        assert chain is not None  # (accepted)
        base: Any = chain[-1][1].base_layer
        if self.kind(module) == "linear":
            return install_linear_capture(base, layer)
        form = recognise_experts(base)
        assert form is not None
        return install_experts_capture(base, layer, form)  # on W0 + s * B A while peft's forward runs

    def sequence_gradients(self, layer, uses, layout, gram: str, workspace=None, slots=None) -> dict:
        """``dA_e``/``dB_e`` per expert and sequence from the wrapped module's token factors."""
        chain = _chain(layer.module)
        assert chain is not None
        base: Any = chain[-1][1].base_layer
        first = chain[0][1]
        dtype = compute_dtype(first.lora_A[_adapter(first)].weight.dtype)
        if self.kind(layer.module) == "linear":
            experts = 1
            a = torch.cat([layout.rows(x, layer, "inputs") for x, _ in uses], dim=1).to(dtype)
            d = torch.cat([layout.rows(dy, layer, "output gradients") for _, dy in uses], dim=1).to(dtype)
            factors: dict[str, list] = {"weight": [(a, d)]}
        else:
            experts = int(base.gate_up_proj.shape[0])
            found = expert_factors(layer, uses, layout, experts, dtype)
            factors = {"gate_up_proj": [None if f is None else (f[0], f[1]) for f in found],
                       "down_proj": [None if f is None else (f[2], f[3]) for f in found]}
        wanted = {attr for attr, param, _ in layer.params if param.requires_grad}
        out = {}
        for prefix, wrapper in chain:
            name = _adapter(wrapper)
            weight_a, weight_b, scale = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight, float(wrapper.scaling[name])
            a_blocks = weight_a.detach().to(dtype).view(experts, -1, weight_a.shape[-1])  # (E, r, in)
            b_blocks = weight_b.detach().to(dtype).view(weight_b.shape[0], -1, experts)  # (out, r, E)
            grads_a: list = [None] * experts
            grads_b: list = [None] * experts
            for e, pair in enumerate(factors[wrapper.parameter_name]):
                if pair is None:
                    continue
                inputs, out_grads = pair
                grads_a[e] = linear_weight_grads(inputs, scale * (out_grads @ b_blocks[:, :, e]), gram)
                grads_b[e] = linear_weight_grads(scale * (inputs @ a_blocks[e].T), out_grads, gram)
            key_a, key_b = f"{prefix}lora_A.{name}.weight", f"{prefix}lora_B.{name}.weight"
            rank = a_blocks.shape[1]
            if key_a in wanted:
                out[key_a] = grads_a[0] if experts == 1 else ExpertStackGrads(
                    grads_a, layout.k, weight_a.shape, dtype, weight_a.device, block_shape=(rank, weight_a.shape[-1]))
            if key_b in wanted:
                out[key_b] = grads_b[0] if experts == 1 else ExpertStackGrads(
                    grads_b, layout.k, weight_b.shape, dtype, weight_b.device,
                    block_shape=(weight_b.shape[0], rank), expert_axis="trailing")
        return out


@hookimpl
def gradproj_layer_handlers():
    """Register the handler for peft LoRA on model parameters (fused experts, routers)."""
    return [ParamLoraHandler()]
