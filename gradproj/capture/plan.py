"""The capture plan: what ``wrap()`` decides once about a model, before anything is installed.

Which modules are covered and by which handler, each covered parameter's name, the parameters
shared by several covered modules (tied weights), which small parameters are batched into shared
buffers (`gradproj.capture.batching`) and how large a layer must be to be materialised in
blocks. Building the plan changes nothing; every refusal (an uncovered trainable parameter, a
layer without the token factors the strategy needs) comes before any hook is installed.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from gradproj.capture.batching import BATCH_MAX_BYTES, BATCH_MAX_NUMEL, BATCH_ROWS_ESTIMATE, ParamGroup
from gradproj.capture.guards import list_names
from gradproj.capture.handlers import compute_dtype
from gradproj.capture.layer import LayerCapture
from gradproj.errors import CoverageError

__all__ = ["CapturePlan", "build_plan", "BLOCK_MIN_NUMEL"]

#: blocks of a blocked layer hold at least this many elements of its sequence gradients
BLOCK_MIN_NUMEL = 1 << 18


@dataclass
class CapturePlan:
    """What is captured, decided at ``wrap()``.

    Attributes:
        layers: the covered modules, in ``named_modules`` order.
        covered: ``id(param) -> qualified name`` of every covered parameter (a tied parameter has
            the name of its first module).
        covered_params: the covered parameters, one entry per (layer, parameter) use.
        shared: ``id(param) -> layers`` for parameters used by several covered modules.
        batched: ``id(param) -> (group, row)`` for small parameters batched into shared buffers.
        groups: the batching groups.
        block_numel: elements per sequence above which (twice over) a layer is materialised a
            block at a time.
        frozen: trainable parameters ``exclude`` matched (``wrap()`` freezes them).
    """

    layers: list[LayerCapture] = field(default_factory=list)
    covered: dict[int, str] = field(default_factory=dict)
    covered_params: list[torch.nn.Parameter] = field(default_factory=list)
    shared: dict[int, list[LayerCapture]] = field(default_factory=dict)
    batched: dict[int, tuple[ParamGroup, int]] = field(default_factory=dict)
    groups: list[ParamGroup] = field(default_factory=list)
    block_numel: int = BLOCK_MIN_NUMEL
    frozen: list[torch.nn.Parameter] = field(default_factory=list)


def _claim_descendants(engine, model: nn.Module, registry, frozen_ids: set, plan: CapturePlan) -> set:
    """Layers of handlers that cover their module's submodules' parameters (``covers_descendants``,
    e.g. peft's LoRA on fused expert tensors), outermost module first; the ids of those parameters."""
    handlers = [h for h in registry.handlers if getattr(h, "covers_descendants", False)]
    claimed: set = set()
    if not handlers:
        return claimed
    skip: list[str] = []
    for mod_name, module in model.named_modules():
        if any(mod_name.startswith(prefix) for prefix in skip):
            continue
        handler = next((h for h in handlers if h.accepts(module)), None)
        if handler is None:
            continue
        params = []
        for attr, param in handler.covered_parameters(module):
            if param.requires_grad and id(param) not in frozen_ids:
                qname = f"{mod_name}.{attr}" if mod_name else attr
                plan.covered.setdefault(id(param), qname)
                params.append((attr, param, plan.covered[id(param)]))
                claimed.add(id(param))
        if params:
            plan.layers.append(LayerCapture(engine, module, mod_name, handler, params))
        skip.append(f"{mod_name}." if mod_name else "")
    return claimed


def _refuse_functional_adapters(model: nn.Module, handled: set) -> None:
    """Refuse trainable parameters that reach the model through a *weight* rather than through
    their module's forward: torch parametrizations (``torch.nn.utils.parametrize``) and peft's
    ``target_parameters`` (LoRA on a model parameter -- fused MoE experts --, whose adapters are
    multiplied into the weight functionally). Their gradient never passes a captured layer."""
    for name, module in model.named_modules():
        parametrized = getattr(module, "parametrizations", None)
        wrapper = hasattr(module, "parameter_name") and hasattr(module, "lora_A")  # peft's ParamWrapper
        if not (isinstance(parametrized, nn.ModuleDict) or wrapper):
            continue
        trained = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in handled]
        if not trained:
            continue
        what = (
            "LoRA on a model parameter (peft target_parameters, e.g. fused MoE experts)"
            if wrapper
            else "a torch parametrization (torch.nn.utils.parametrize)"
        )
        raise CoverageError(
            f"{name or 'the model'} trains {list_names(trained)} through {what}: the adapter is multiplied "
            "into the weight outside any module's forward, so gradproj cannot capture its sequence gradients. "
            "Use peft target_modules (e.g. 'all-linear': attention and shared-expert Linears) and train the "
            "expert parameters fully or freeze them, or exclude these parameters (wrap(..., exclude=['<glob>']))"
        )


def build_plan(
    engine,
    model: nn.Module,
    registry,
    exclude: list[str],
    needs_capture: bool,
    needs_tokens: bool,
    rule: str,
) -> CapturePlan:
    """Plan the capture of ``model`` for ``engine`` (the owner of the `LayerCapture` s).

    ``rule``: the strategy names, for messages. Raises `CoverageError` when a trainable
    parameter is not covered, or a covered layer lacks token factors a strategy needs."""
    named = list(model.named_parameters())
    frozen = [p for n, p in named if p.requires_grad and any(fnmatch.fnmatchcase(n, g) for g in exclude)]
    frozen_ids = {id(p) for p in frozen}
    plan = CapturePlan(frozen=frozen)
    if not needs_capture:
        return plan
    claimed = _claim_descendants(engine, model, registry, frozen_ids, plan)
    _refuse_functional_adapters(model, frozen_ids | claimed)
    uncovered: list[str] = []
    for mod_name, module in model.named_modules():
        own = [(a, p) for a, p in module.named_parameters(recurse=False)
               if p.requires_grad and id(p) not in frozen_ids and id(p) not in claimed]
        if not own:
            continue
        handler = registry.handler_for(module)
        handled = {attr for attr, _ in handler.covered_parameters(module)} if handler is not None else set()
        params = []
        for attr, param in own:
            qname = f"{mod_name}.{attr}" if mod_name else attr
            if attr not in handled:
                uncovered.append(f"{qname} ({type(module).__name__})")
                continue
            plan.covered.setdefault(id(param), qname)  # tied weights: one name, several modules
            params.append((attr, param, plan.covered[id(param)]))
        if params:
            plan.layers.append(LayerCapture(engine, module, mod_name, handler, params))
    if uncovered:
        raise CoverageError(
            f"{len(uncovered)} trainable parameter(s) are not covered by a gradproj layer "
            f"handler: {list_names(uncovered)}. Their gradients would not be projected. "
            "Freeze them (param.requires_grad_(False)), exclude them with "
            "wrap(..., exclude=['<glob>']) (excluded parameters are frozen), or register a "
            "handler for their module type."
        )
    if needs_tokens:
        _check_tokens(plan.layers, rule)
    users: dict[int, list[LayerCapture]] = {}
    for layer in plan.layers:
        for _, param, _ in layer.params:
            users.setdefault(id(param), []).append(layer)
    plan.shared = {key: layers for key, layers in users.items() if len(layers) > 1}
    plan.covered_params = [param for layer in plan.layers for _, param, _ in layer.params]
    # handlers that fill slots are the ones that materialise k sequence gradients per weight
    plan.block_numel = block_numel([p for layer in plan.layers if layer.handler.supports_slots for _, p, _ in layer.params])
    if not needs_tokens:  # batched rows would lose the token-level factors such a strategy needs
        _plan_batching(plan)
    return plan


def block_numel(params: list[torch.Tensor]) -> int:
    """The block size (elements per sequence) for layers far larger than all others.

    ``params``: the parameters whose sequence gradients may be materialised. A weight more than
    twice this size (typically a large vocabulary's lm_head) is materialised a
    block at a time (`gradproj.linalg.linear_grads.BlockedLinearGrads`), so the
    workspace is sized by the second-largest parameter, not by that one.
    """
    sizes = sorted({id(p): p.numel() for p in params}.values(), reverse=True)
    return max(sizes[1] if len(sizes) > 1 else 0, BLOCK_MIN_NUMEL)


def _check_tokens(layers: list[LayerCapture], rule: str) -> None:
    """Strategies that need token-level factors: every covered layer must provide them."""
    bad = [f"{layer.name} ({type(layer.module).__name__})" for layer in layers if not layer.handler.provides_tokens]
    if bad:
        raise CoverageError(
            f"strategy {rule} needs token-level factors (input and output-gradient subspaces), which "
            f"the handler of {list_names(bad)} does not provide; exclude those parameters "
            "(wrap(..., exclude=['<glob>']) freezes them) or use strategy='proma'"
        )


def _plan_batching(plan: CapturePlan) -> None:
    """Group small parameters by (element count, compute dtype, device) within the memory budget.

    The budget is `gradproj.capture.batching.BATCH_MAX_BYTES`, and where some layer is too
    large to batch, no more than the workspace the largest such layer's materialised sequence
    gradients need anyway (one block of a blocked layer): batching then at most doubles gradproj's
    scratch memory. Smallest parameters are batched first.
    """
    groups: dict[tuple, ParamGroup] = {}
    candidates, largest = [], 0
    for layer in plan.layers:
        for _attr, param, qname in layer.params:
            dtype = compute_dtype(param.dtype)
            cost = BATCH_ROWS_ESTIMATE * param.numel() * torch.finfo(dtype).bits // 8
            if layer.handler.supports_slots and id(param) not in plan.shared and param.numel() <= BATCH_MAX_NUMEL:
                candidates.append((param.numel(), cost, param, qname, dtype))
            elif param.requires_grad:  # tied weights are summed over their modules first
                if param.numel() > 2 * plan.block_numel:  # materialised in blocks
                    cost = BATCH_ROWS_ESTIMATE * plan.block_numel * torch.finfo(dtype).bits // 8
                largest = max(largest, cost)
    budget = BATCH_MAX_BYTES if largest == 0 else min(BATCH_MAX_BYTES, largest)
    for numel, cost, param, qname, dtype in sorted(candidates, key=lambda c: c[0]):
        if cost > budget:
            break
        budget -= cost
        key = (numel, dtype, param.device)
        if key not in groups:
            groups[key] = ParamGroup(numel, dtype, param.device)
        plan.batched[id(param)] = (groups[key], groups[key].add(param, qname))
    plan.groups = list(groups.values())
