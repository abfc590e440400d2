"""Per-head attention logits broadcast over the batch: gpt-oss's attention *sinks*.

gpt-oss's attention module holds ``sinks`` (one logit per head) that the attention function joins
to every query's scores: ``sinks.reshape(1, -1, 1, 1).expand(B, -1, T, -1)`` is concatenated to
the (B, heads, T, keys) logits before the softmax. The gradient of sequence i is the sum, over its
query positions, of the gradient reaching its (head, query) copy of the sink logit, so the
expansion is captured: while the module's forward runs, a torch-function mode replaces that
``reshape`` + ``expand`` with a captured broadcast whose backward hands the engine the (B, T, heads)
gradient of the copies -- per-token rows of a vector parameter, summed per sequence
(`gradproj.linalg.sequence_grads.TokenSumGrads`).

Recognised by structure: an attention module whose only own trainable parameter is a vector with one
entry per attention head (``config.num_attention_heads``). Its use is checked at every captured
forward: any other operation on the parameter -- an attention kernel that takes the sinks as an
argument (``flash_attention`` with ``s_aux``), a broadcast over other axes -- raises a
`gradproj.errors.CoverageError` in the forward, before any gradient exists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from gradproj.capture.captured_call import CapturedCall, CapturedOp, captures
from gradproj.capture.forwards import install_forward, runs_class_forward
from gradproj.capture.handlers import LayerHandler, compute_dtype
from gradproj.errors import CoverageError
from gradproj.linalg.sequence_grads import TokenSumGrads
from gradproj.plugins.hookspecs import hookimpl

__all__ = ["AttentionSinksHandler"]


class _BroadcastOp(CapturedOp):
    """``param.reshape(1, H, 1, 1).expand(B, H, T, 1)`` (materialised); the engine gets the (B, T, H)
    gradient of the copies."""

    n_inputs, n_params = 2, 1

    def forward(self, batch, tokens, param):
        heads = param.shape[0]
        return param.reshape(1, heads, 1, 1).expand(batch, heads, tokens, 1).clone(), (), None

    def input_grads(self, meta, saved, grad_out, needs):
        return (None, None)

    def param_grads(self, meta, saved, grad_out, needs):
        return (grad_out.sum(dim=(0, 2, 3)) if needs[0] else None,)

    def use(self, meta, saved, grad_out):
        return grad_out[..., 0].transpose(1, 2)  # (B, T, H)


_BROADCAST = _BroadcastOp()


def _heads(module: nn.Module) -> int | None:
    config = getattr(module, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    return heads if isinstance(heads, int) else None


class _CaptureBroadcast(TorchFunctionMode):
    """Route ``param.reshape(1, H, 1, 1).expand(B, -1, T, -1)`` through the captured broadcast;
    refuse any other use of the parameter."""

    def __init__(self, layer, name: str, param: torch.Tensor) -> None:
        super().__init__()
        self.layer, self.name, self.param = layer, name, param
        self.reshaped: torch.Tensor | None = None

    def _refuse(self, func) -> None:
        what = getattr(func, "__name__", str(func))
        raise CoverageError(
            f"{self.layer.name}.{self.name} is used by {what} in the attention forward, which gradproj does not capture: "
            "it covers per-head sink logits joined to the scores as param.reshape(1, -1, 1, 1).expand(B, -1, T, -1), "
            "as transformers' eager attention does. Use attn_implementation='eager' for the policy's forward, or freeze "
            f"or exclude the parameter (wrap(..., exclude=['*.{self.name}']))"
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__get__":
            return func(*args, **kwargs)
        first = args[0] if args else None
        if first is self.param:
            shape = [int(n) for n in (args[1:] if len(args) > 2 else (args[1] if len(args) == 2 else ()))]
            if func in (torch.Tensor.reshape, torch.Tensor.view) and shape in ([1, -1, 1, 1], [1, self.param.shape[0], 1, 1]):
                self.reshaped = func(*args, **kwargs)
                return self.reshaped
            self._refuse(func)
        if first is not None and first is self.reshaped:
            sizes = [int(n) for n in (args[1:] if len(args) > 2 else args[1])]
            heads = self.param.shape[0]
            if func is torch.Tensor.expand and len(sizes) == 4 and sizes[1] in (-1, heads) and sizes[3] in (-1, 1):
                return CapturedCall.apply(_BROADCAST, self.layer, sizes[0], sizes[2], self.param)
            self._refuse(func)
        if any(t is self.param or (self.reshaped is not None and t is self.reshaped) for t in _flat(args, kwargs)):
            self._refuse(func)
        return func(*args, **kwargs)


def _flat(args, kwargs):
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


class AttentionSinksHandler(LayerHandler):
    """Per-head attention sink logits (gpt-oss): see the module doc."""

    module_types: tuple[type, ...] = ()
    structural = True
    provides_tokens = True

    def accepts(self, module: nn.Module) -> bool:
        """Attention modules whose one own trainable parameter has an entry per attention head."""
        own = [(n, p) for n, p in module.named_parameters(recurse=False)]
        heads = _heads(module)
        return (
            runs_class_forward(module)
            and heads is not None
            and len(own) == 1
            and own[0][1].dim() == 1
            and own[0][1].shape[0] == heads
            and any(True for _ in module.children())
        )

    def covered_parameters(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The module's sink vector."""
        return [(n, p) for n, p in module.named_parameters(recurse=False)]

    def install(self, module: nn.Module, layer) -> Callable[[], None]:
        """Run the module's forward with the sinks' broadcast captured."""
        original = type(module).forward
        (name, _), = module.named_parameters(recurse=False)

        def forward(*args, **kwargs):
            param = getattr(module, name)
            if not captures(layer, param):
                return original(module, *args, **kwargs)
            with _CaptureBroadcast(layer, name, param):
                return original(module, *args, **kwargs)

        return install_forward(module, forward)

    def sequence_gradients(self, layer, uses, layout, gram: str, workspace=None, slots=None) -> dict:
        """Per-sequence sums of the sink copies' gradients."""
        (name, param), = layer.module.named_parameters(recurse=False)
        dtype = compute_dtype(param.dtype)
        rows = [layout.rows(grad, layer, "sink gradients").to(dtype) for grad in uses]
        return {name: TokenSumGrads(rows[0] if len(rows) == 1 else torch.cat(rows, dim=1))}


@hookimpl
def gradproj_layer_handlers():
    """Register the handler for per-head attention sinks."""
    return [AttentionSinksHandler()]
