"""Token -> sequence maps: how a layer's activations are split into the microbatch's sequences.

* `PaddedLayout` -- batch-first activations (k, T, ...): row i is sequence i.
* `PackedLayout` -- remove-padding / packed activations (1, total, ...) or (total, ...), with
  sequence i at positions ``cu_seqlens[i]:cu_seqlens[i+1]`` (flash-attention's convention).

Handlers call `rows` to get a (k, positions, features) view or zero-padded copy; positions a
sequence does not have carry zero output gradients, so sums over them are exact.
"""

from __future__ import annotations

import torch

from gradproj.errors import InputError

__all__ = ["PaddedLayout", "PackedLayout", "make_layout", "cu_seqlens_from_position_ids", "check_row_order", "sequence_reorder"]


class PaddedLayout:
    """Batch-first activations: the first dimension is the sequence.

    Args:
        k: the number of sequences.
        token_axis: whether the sequences have several tokens each (``logp`` has more than one
            column), so that activations are (k, tokens, features); then a 2-D activation
            (rows, features) holds one row per *token* -- flattened or gathered tokens, e.g. MoE
            experts -- and is refused even when it happens to have k rows. With one token per
            sequence (or ``None``: unknown) a 2-D activation is one row per sequence.
    """

    def __init__(self, k: int, token_axis: bool | None = None) -> None:
        self.k = k
        self.token_axis = token_axis

    def rows(self, tensor: torch.Tensor, layer, what: str) -> torch.Tensor:
        """(k, positions, features) view of a batch-first ``tensor`` (..., features)."""
        if tensor.dim() == 2 and self.token_axis:
            raise InputError(
                f"layer {layer.name!r} saw {what} of shape {tuple(tensor.shape)}: one row per token with the "
                "sequence axis gone (tokens flattened or gathered across sequences, as in MoE experts, routers "
                "or shared experts), while each sequence has several tokens. gradproj cannot tell which "
                "sequence each row belongs to. Freeze or exclude this layer (wrap(..., exclude=['<glob>'])), "
                "or train a model whose layers see (sequences, tokens, features) activations."
            )
        if tensor.dim() < 2 or tensor.shape[0] != self.k:
            raise InputError(
                f"layer {layer.name!r} saw {what} of shape {tuple(tensor.shape)} but the microbatch has "
                f"k={self.k} sequences (rows of logp). gradproj needs batch-first activations whose "
                "first dimension is the sequence, from one forward of the model over the k sequences "
                "(log-probs of several forwards concatenated into one logp are not supported: one block "
                "per forward); for packed / remove-padding batches pass cu_seqlens= (or position_ids=) to "
                "opt.microbatch(). Broadcast inputs (e.g. position ids of shape (1, T)) cannot give "
                "per-sequence gradients: pass them per row."
            )
        return tensor.reshape(self.k, -1, tensor.shape[-1])

    def sequence_of_rows(self, rows: torch.Tensor, n: int, token_shape, layer) -> torch.Tensor:
        """The sequence of each of ``rows`` (indices into a flattened activation of ``n`` rows whose
        provenance ``token_shape`` -- ``(B, T)`` or ``None`` -- was recorded at the forward)."""
        if token_shape is not None and token_shape[0] == self.k and token_shape[0] * token_shape[1] == n:
            return torch.div(rows, token_shape[1], rounding_mode="floor")
        if token_shape is None and not self.token_axis and n == self.k:
            return rows
        raise InputError(
            f"layer {layer.name!r} saw {n} flattened token rows (MoE experts) "
            + (f"from a batch of {token_shape[0]} sequences of {token_shape[1]} tokens, " if token_shape else "")
            + f"but the microbatch has k={self.k} sequences"
            + ("" if token_shape else "; gradproj could not trace those rows back to the (sequences, tokens, features) "
               "activation they were flattened from (a view of it, or through elementwise operations and matmuls), so "
               "it cannot tell which sequence each row belongs to. Flatten with .view(-1, d)/.reshape(-1, d) of the "
               "model's (B, T, d) activations, or freeze or exclude this layer (wrap(..., exclude=['<glob>']))")
        )

    def ids(self, ids: torch.Tensor, layer) -> torch.Tensor:
        """(k, positions) view of batch-first integer ids."""
        if ids.dim() < 1 or ids.shape[0] != self.k:
            raise InputError(
                f"layer {layer.name!r} looked up ids of shape {tuple(ids.shape)} but the microbatch has "
                f"k={self.k} sequences; pass batch-first ids, or cu_seqlens= for packed batches"
            )
        return ids.reshape(self.k, -1)


class PackedLayout:
    """Packed activations: sequence i occupies positions ``cu_seqlens[i]:cu_seqlens[i+1]``."""

    def __init__(self, cu_seqlens: torch.Tensor) -> None:
        self.cu_seqlens = cu_seqlens
        self.k = cu_seqlens.numel() - 1
        self.total = int(cu_seqlens[-1])
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        self.max_len = int(lengths.max()) if self.k else 0
        seq = torch.repeat_interleave(torch.arange(self.k, device=cu_seqlens.device), lengths)
        offset = torch.arange(self.total, device=cu_seqlens.device) - cu_seqlens[:-1].repeat_interleave(lengths)
        self._dest = seq * self.max_len + offset  # packed position -> slot in (k * max_len)

    def _flat(self, tensor: torch.Tensor, layer, what: str, feature_dim: bool) -> torch.Tensor:
        lead = tensor.shape[:-1] if feature_dim else tensor.shape
        if lead.numel() != self.total or (len(lead) == 2 and lead[0] != 1) or len(lead) > 2:
            raise InputError(
                f"layer {layer.name!r} saw {what} of shape {tuple(tensor.shape)} but cu_seqlens describes a "
                f"packed batch of {self.total} tokens in {self.k} sequences: expected (1, {self.total}, ...) "
                f"or ({self.total}, ...)"
            )
        return tensor.reshape(self.total, -1) if feature_dim else tensor.reshape(self.total)

    def _token_major(self, tensor: torch.Tensor, layer, what: str) -> torch.Tensor:
        """``tensor`` as (total, rows per token, features): the token axis is found among the leading
        axes, so per-head activations -- (1, total, heads, d) or (1, heads, total, d) -- work too."""
        lead = list(tensor.shape[:-1])
        if lead and lead[0] == 1 and len(lead) > 1:
            tensor, lead = tensor.squeeze(0), lead[1:]
        axes = [i for i, n in enumerate(lead) if n == self.total]
        if len(axes) != 1 or tensor.dim() < 2:
            raise InputError(
                f"layer {layer.name!r} saw {what} of shape {tuple(tensor.shape)} but cu_seqlens describes a packed batch "
                f"of {self.total} tokens in {self.k} sequences: expected (1, {self.total}, ...) or ({self.total}, ...)"
                + (" (several axes have that length; cannot tell which one is the token axis)" if len(axes) > 1 else "")
            )
        moved = tensor.movedim(axes[0], 0)
        return moved.reshape(self.total, -1, moved.shape[-1])

    def rows(self, tensor: torch.Tensor, layer, what: str) -> torch.Tensor:
        """(k, max_len * rows per token, features) zero-padded copy of a packed ``tensor``."""
        flat = self._token_major(tensor, layer, what)
        per_token = flat.shape[1]
        out = flat.new_zeros(self.k * self.max_len, per_token, flat.shape[-1])
        return out.index_copy_(0, self._dest, flat).view(self.k, self.max_len * per_token, -1)

    def sequence_of_rows(self, rows: torch.Tensor, n: int, token_shape, layer) -> torch.Tensor:
        """The sequence of each of ``rows`` (indices into the packed tokens; ``n`` must be the total)."""
        if n != self.total:
            raise InputError(
                f"layer {layer.name!r} saw {n} flattened token rows but cu_seqlens describes a packed batch of "
                f"{self.total} tokens in {self.k} sequences"
            )
        return torch.searchsorted(self.cu_seqlens[1:], rows, right=True)

    def ids(self, ids: torch.Tensor, layer) -> torch.Tensor:
        """(k, max_len) ids, padded with the first id of the batch (those positions carry no gradient)."""
        flat = self._flat(ids, layer, "ids", False)
        size = self.k * self.max_len  # (the first id as a device tensor: nothing read on the host)
        out = flat[:1].expand(size).clone() if self.total else flat.new_zeros(size)
        return out.index_copy_(0, self._dest, flat).view(self.k, self.max_len)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Sequence boundaries of a packed batch from its position ids (a new sequence starts at 0)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    total = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, total]).to(torch.int64)


def make_layout(
    k: int, cu_seqlens: torch.Tensor | None, position_ids: torch.Tensor | None, where: str, token_axis: bool | None = None
):
    """The layout of a microbatch of ``k`` sequences (padded unless ``cu_seqlens``/``position_ids``);
    ``token_axis`` as in `PaddedLayout`."""
    if cu_seqlens is None and position_ids is None:
        return PaddedLayout(k, token_axis)
    if cu_seqlens is not None and position_ids is not None:
        raise InputError(f"{where}: pass cu_seqlens= or position_ids=, not both")
    if cu_seqlens is None:
        if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point():
            raise InputError(f"{where}: position_ids must be an integer tensor")
        if position_ids.numel() == 0 or int(position_ids.reshape(-1)[0]) != 0:
            raise InputError(f"{where}: packed position_ids must start at 0 (each sequence restarts at 0)")
        cu_seqlens = cu_seqlens_from_position_ids(position_ids)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise InputError(f"{where}: cu_seqlens must be a 1-D integer tensor of k+1 boundaries")
    cu_seqlens = cu_seqlens.to(torch.int64)
    if cu_seqlens.numel() != k + 1:
        raise InputError(
            f"{where}: cu_seqlens has {cu_seqlens.numel() - 1} sequences but logp has {k} rows; row i of "
            "logp must be packed sequence i"
        )
    if int(cu_seqlens[0]) != 0 or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise InputError(f"{where}: cu_seqlens must start at 0 and be non-decreasing, got {cu_seqlens.tolist()}")
    return PackedLayout(cu_seqlens)


#: graph nodes where the walk of `check_row_order` stops: the model's output layer
_MODEL_NODES = ("MmBackward", "AddmmBackward", "BmmBackward", "LinearBackward", "MatmulBackward", "AccumulateGrad")


def _dim(value, sizes) -> int | None:
    """A saved dimension as a non-negative index (``None`` if negative and the rank is unknown)."""
    value = int(value)
    if value >= 1 << 63:  # saved as unsigned
        value -= 1 << 64
    if value < 0:
        return value + len(sizes) if sizes else None
    return value


def _identity(index, k) -> bool:
    index = index.detach()
    if index.dtype == torch.bool:
        return index.dim() == 1 and index.numel() == k and bool(index.all())
    return index.dim() == 1 and index.numel() == k and torch.equal(index.cpu(), torch.arange(k))


def sequence_reorder(node) -> str | None:
    """How ``node`` reorders or mixes the first (sequence) axis, or ``None``."""
    name = node.name()
    sizes = tuple(getattr(node, "_saved_self_sym_sizes", ()) or ())
    if name.startswith("IndexBackward"):
        indices = getattr(node, "_saved_indices", ()) or ()
        if indices and indices[0] is not None and not (sizes and _identity(indices[0], sizes[0])):
            return "an index on the sequence axis"
    elif name.startswith(("IndexSelectBackward", "GatherBackward")):
        if _dim(getattr(node, "_saved_dim", -1), sizes) == 0:
            index = getattr(node, "_saved_index", None)
            if not (name.startswith("IndexSelect") and index is not None and sizes and _identity(index, sizes[0])):
                return f"{name[:-len('Backward0')]} on the sequence axis"
    elif name.startswith(("FlipBackward", "RollBackward")):
        if any(_dim(d, sizes) == 0 for d in getattr(node, "_saved_dims", ())):
            return f"{name[:-len('Backward0')].lower()} of the sequence axis"
    elif name.startswith("PermuteBackward"):
        dims = getattr(node, "_saved_dims", ())
        if dims and _dim(dims[0], sizes) != 0:
            return "a permute that moves the sequence axis"
    elif name.startswith("TransposeBackward"):
        pair = (_dim(getattr(node, "_saved_dim0", 0), sizes), _dim(getattr(node, "_saved_dim1", 0), sizes))
        if 0 in pair and pair[0] != pair[1]:
            return "a transpose of the sequence axis"
    return None


def check_row_order(logp: torch.Tensor, where: str, limit: int = 64) -> None:
    """Refuse padded-batch log-probs whose rows were reordered after the model's output layer
    (``logp[perm]``, ``flip``/``roll``/``index_select`` on rows, a transpose): row i of ``logp`` must be
    row i of the model's activations, or each sequence's coefficient would reach another's gradient.

    Walks ``logp``'s graph from ``logp`` to the model's output layer (a matmul, a captured layer or a
    parameter), at most ``limit`` nodes -- the few operations of a log-prob computation. Reordering
    inside the model itself is not seen."""
    stack: list = [logp.grad_fn]
    seen: set = set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "layer", None) is not None or node.name().startswith(_MODEL_NODES):
            continue
        problem = sequence_reorder(node)
        if problem is not None:
            raise InputError(
                f"{where}: the rows of logp were reordered after the model ({problem}, {node.name()}): row i of logp "
                "must be sequence i of the model's batch, or each sequence's loss weight would reach another "
                "sequence's gradient. Reorder the model's inputs instead (or the advantages and mask to match logp)"
            )
        stack.extend(child for child, _ in node.next_functions)
