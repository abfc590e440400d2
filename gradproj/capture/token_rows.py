"""Which sequence each row of a flattened activation belongs to: the provenance of ``(B*T, d)`` rows.

MoE blocks run their routers, shared experts and experts on tokens flattened to ``(B*T, d)``
(``hidden_states.view(-1, d)``): the sequence axis is gone from the tensor, but not from the
computation. `flattened_token_shape` recovers it from how the tensor was made, at the
forward of a captured call, and answers only when the rows are provably the batch-major tokens of a
``(B, T, ...)`` activation (row ``r`` is token ``r % T`` of sequence ``r // T``):

* a tensor made without autograd that is a view of a contiguous ``(B, T, d)`` tensor with the same
  storage (``x._base``), or
* a tensor whose autograd graph leads back, through operations that keep rows apart (elementwise
  operations, casts, splits and slices of the feature axis, a matmul's activation operand), to
  such a view -- the output of a shared expert's ``gate_proj``/``up_proj`` feeding its ``down_proj``,
  peft's LoRA branch -- with every path that leads to a row source agreeing, and that source not
  made by moving its first axis (a transpose of (T, B, ...) activations is not batch-major).

Rows gathered or reordered (``x[token_idx]``, ``index_select``, a permute), rows of no known
provenance, and tensors made under ``no_grad`` that are not views answer ``None``: the caller then
keeps the 2-D activation, and the layout refuses it at the backward with an `InputError`
rather than guessing.
"""

from __future__ import annotations

import torch

from gradproj.capture.layout import sequence_reorder

__all__ = ["flattened_token_shape", "as_token_rows"]

#: autograd nodes whose output row r depends only on row r of each input that has the same rows
#: (inputs broadcast along the rows -- a weight, a (d,) bias -- lead to leaves or other shapes)
_ROWWISE = frozenset(
    f"{name}Backward{n}"
    for name in (
        "Mul", "Add", "Sub", "Div", "Neg", "Silu", "Gelu", "Sigmoid", "Tanh", "Relu", "Exp", "Log", "Sqrt",
        "Rsqrt", "Pow", "Clamp", "ClampMin", "ClampMax", "ToCopy", "Clone", "Where", "Softplus", "Elu",
        "LeakyRelu", "Hardtanh", "Abs", "Reciprocal", "Erf", "Sin", "Cos", "Maximum", "Minimum", "Lerp",
        "NativeDropout", "Dropout", "Alias", "Contiguous",
    )
    for n in (0, 1, 2)
)
#: nodes that cut or split the feature (last) axis: row-wise if the saved dim is not the first
_FEATURE_CUTS = ("SplitBackward", "SplitWithSizesBackward", "SliceBackward", "UnsafeSplitBackward", "NarrowBackward")
#: matmuls ``rows @ W``: the output's rows are the first operand's (the child at this position)
_MATMUL_ROWS = {"MmBackward0": 0, "AddmmBackward0": 1}
_VIEWS = ("ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "AsStridedBackward")


def _from_base(x: torch.Tensor) -> tuple[int, int] | None:
    base = x._base
    if base is None or base.dim() != 3 or x.dim() != 2:
        return None
    b, t, d = base.shape
    if (
        b * t == x.shape[0]
        and d == x.shape[1]
        and base.is_contiguous()
        and x.is_contiguous()
        and x.data_ptr() == base.data_ptr()
    ):
        return (b, t)
    return None


def _walk(node, rows: int, limit: int) -> tuple[int, int] | None:
    """The (B, T) every row source reachable from ``node`` agrees on, or ``None``."""
    found: set[tuple[int, int]] = set()
    stack, seen = [node], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if len(seen) > limit:
            return None
        name = node.name()
        if name == "torch::autograd::AccumulateGrad" or name.startswith("AccumulateGrad"):
            continue  # a leaf (a parameter): broadcast along the rows, or the matmul's other operand
        children = [child for child, _ in node.next_functions]
        if name in _ROWWISE:
            stack.extend(children)
        elif name.startswith(_FEATURE_CUTS):
            if int(getattr(node, "_saved_dim", 0)) == 0:
                return None
            stack.extend(children)
        elif name in _MATMUL_ROWS:
            stack.append(children[_MATMUL_ROWS[name]])
        elif name.startswith(_VIEWS):
            sizes = tuple(int(n) for n in (getattr(node, "_saved_self_sym_sizes", ()) or ()))
            if len(sizes) == 3 and sizes[0] * sizes[1] == rows:
                if _reordered_source(children[0] if children else None):
                    return None
                found.add((sizes[0], sizes[1]))
            elif len(sizes) == 2 and sizes[0] == rows:
                stack.extend(children)  # a view that keeps the rows (e.g. a reshape to the same shape)
            else:
                return None
        else:
            return None  # anything else may move rows: no answer
    return found.pop() if len(found) == 1 else None


def _reordered_source(node) -> bool:
    """Whether the (B, T, ...) tensor a view flattened was made by moving its first axis (a
    transpose, permute, index, flip, ... -- seen through copies made to flatten it)."""
    for _ in range(8):
        if node is None:
            return False
        if sequence_reorder(node) is not None:
            return True
        if not node.name().startswith(("CloneBackward", "ToCopyBackward", "AliasBackward", "ContiguousBackward")):
            return False
        node = node.next_functions[0][0] if node.next_functions else None
    return False


def flattened_token_shape(x: torch.Tensor, limit: int = 64) -> tuple[int, int] | None:
    """``(B, T)`` if the rows of the 2-D ``x`` are provably the batch-major flattening of a
    ``(B, T, ...)`` activation, else ``None`` (see the module doc)."""
    if x.dim() != 2:
        return None
    if x.grad_fn is None:  # made without autograd: only a view of a (B, T, d) tensor tells
        return _from_base(x)
    return _walk(x.grad_fn, x.shape[0], limit)


def as_token_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(B, T, d)`` when it is a 2-D flattening of provable provenance, else ``x``."""
    if x.dim() != 2:
        return x
    shape = flattened_token_shape(x)
    return x if shape is None else x.reshape(shape[0], shape[1], x.shape[1])
