"""Checks of the model and of ``.grad`` that keep the capture from being silently wrong.

Each refuses, with a `gradproj.GradProjError` saying what and how to fix it, a setting in
which the engine's per-sequence decomposition would no longer be the gradient of the loss:

* `refuse_sequence_first` -- modules built ``batch_first=False`` (their activations are
  (tokens, sequences, ...), while gradproj reads the first axis as the sequence), at ``wrap()``;
* `refuse_training_batch_norms` -- BatchNorm in training mode (batch statistics mix the
  sequences of a microbatch), at each microbatch;
* `watch_registrations` / `registrations` -- a process-wide count of module and
  parameter registrations, so that a model changed after ``wrap()`` is rescanned for uncovered
  trainable parameters at the next microbatch (and only then);
* `refuse_edited_grads` -- ``.grad`` changed inside a block (the block's update is added to
  the ``.grad`` it found, when it closes);
* `refuse_replaced_forwards` -- a covered module whose forward was replaced after ``wrap()``
  (its log-probs were computed without capture), at each microbatch;
* `turn_off_hub_kernels` -- transformers' hub kernels, which rebind the forwards of decorated
  modules whenever ``model.train()``/``model.eval()`` switches the kernels' mode, at ``wrap()``.
"""

from __future__ import annotations

from torch import nn

from gradproj.errors import CoverageError, InputError, ProtocolError

__all__ = [
    "list_names",
    "refuse_sequence_first",
    "batch_norms",
    "refuse_training_batch_norms",
    "watch_registrations",
    "registrations",
    "refuse_edited_grads",
    "refuse_replaced_forwards",
    "turn_off_hub_kernels",
    "restore_hub_kernels",
]


def list_names(names: list[str], limit: int = 12) -> str:
    """At most ``limit`` names, comma-separated, with how many more there are."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def refuse_sequence_first(model: nn.Module) -> None:
    """Refuse sequence-first modules (``batch_first=False``: ``nn.MultiheadAttention``,
    ``nn.Transformer*``, RNNs): with as many tokens as sequences their (T, B, d) activations would be
    taken for (sequences, tokens, d) without any shape error."""
    found = [
        f"{name or type(model).__name__} ({type(module).__name__})"
        for name, module in model.named_modules()
        if getattr(module, "batch_first", None) is False
    ]
    if found:
        raise InputError(
            f"the model contains sequence-first module(s) {list_names(found)} (batch_first=False): "
            "their activations are (tokens, sequences, ...), but gradproj reads the first axis of "
            "every activation as the sequence. Build them with batch_first=True."
        )


def batch_norms(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm modules (checked at each microbatch: their mode can change)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def refuse_training_batch_norms(norms: list[nn.Module], where: str) -> None:
    """Refuse BatchNorm in training mode: no gradient is then a sum of per-sequence parts."""
    training = [type(m).__name__ for m in norms if m.training]
    if training:
        raise InputError(
            f"{where}: {list_names(training)} in training mode normalise with statistics of the whole "
            "microbatch, which mixes its sequences: no gradient is then a sum of per-sequence parts. Put them "
            "in eval mode (module.eval(): running statistics) or replace them with a per-token norm"
        )


_registrations = 0
_registration_hooks: list = []


def _count_registration(*_args) -> None:
    global _registrations
    _registrations += 1


def watch_registrations() -> None:
    """Count every module and parameter registration in this process from now on (idempotent)."""
    if _registration_hooks:
        return
    from torch.nn.modules import module as nn_module

    for name in ("register_module_module_registration_hook", "register_module_parameter_registration_hook"):
        register = getattr(nn_module, name, None)
        if register is not None:
            _registration_hooks.append(register(_count_registration))


def registrations() -> int:
    """How many modules and parameters were registered (on any module) since watching began."""
    return _registrations


def refuse_edited_grads(seen: list[tuple], names: dict[int, str], where: str) -> None:
    """Refuse a block whose parameters' ``.grad`` changed since it opened.

    ``seen``: ``(param, its .grad, that tensor's version)`` taken when the block opened; ``names``:
    parameter id -> qualified name. ``clip_grad_norm_``, ``model.zero_grad()`` or an edit after
    ``backward()`` inside the block would otherwise be combined with the block's update wrongly.
    """
    changed = [
        names.get(id(param), "a parameter")
        for param, grad, version in seen
        if param.grad is not grad or (grad is not None and grad._version != version)
    ]
    if changed:
        raise ProtocolError(
            f"{where}: .grad of {list_names(changed)} was changed inside the opt.microbatch() block "
            "(clip_grad_norm_, GradScaler.unscale_, zero_grad, or an edit after backward()); the block's update is "
            "added to .grad when the block closes, so do these after it -- clip and unscale once, after the "
            "step's last block. The microbatch was discarded."
        )


def turn_off_hub_kernels(model: nn.Module) -> list[nn.Module]:
    """Turn transformers' hub kernels off on every model inside ``model``; the models turned off.

    Since transformers 5.25, ``from_pretrained`` enables hub kernels whenever the ``kernels`` package
    is installed, and every ``model.train()``/``model.eval()`` that switches the kernels' mode
    kernelizes the model again: the forwards of the decorated modules (RMSNorm, MLPs, ...) are
    rebound, replacing gradproj's capture -- TRL switches modes around every generation. gradproj
    needs the modules' own forwards, so hub kernels stay off on a wrapped model (``use_kernels =
    False`` restores the torch forwards; `restore_hub_kernels` turns them on again)."""
    off = []
    for module in model.modules():
        switch = getattr(type(module), "use_kernels", None)
        if isinstance(switch, property) and switch.fset is not None and getattr(module, "use_kernels", False):
            switch.fset(module, False)  # transformers' setter: resets the kernels (torch forwards)
            off.append(module)
    return off


def restore_hub_kernels(modules: list[nn.Module]) -> None:
    """Turn hub kernels on again on ``modules`` (a failed ``wrap()`` leaves the model as it was)."""
    for module in modules:
        switch = getattr(type(module), "use_kernels", None)
        if isinstance(switch, property) and switch.fset is not None:
            switch.fset(module, True)


def refuse_replaced_forwards(layers, where: str) -> None:
    """Refuse covered modules whose forward is no longer the one gradproj installed."""
    replaced = [layer.name for layer in layers if layer.installed is not None and layer.module.__dict__.get("forward") is not layer.installed]
    if replaced:
        raise CoverageError(
            f"{where}: the forward of covered module(s) {list_names(replaced)} was replaced after wrap(), so the "
            "log-probs were computed without gradproj's capture and the per-sequence gradients would be wrong. "
            "Usual cause: transformers' hub kernels rebinding forwards when model.train()/model.eval() switches "
            "their mode (turn them off: model.use_kernels = False, or from_pretrained(..., use_kernels=False)), or "
            "another library patching module forwards; wrap() after such changes (detach() first)"
        )
