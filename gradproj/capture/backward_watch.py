"""Backward calls made while a microbatch block is open, and loss terms that bypass the log-probs.

gradproj sees the loss only through the gradient that arrives at ``logp``: the hook there records
the per-sequence coefficients and sends the unweighted mask down, and the layer handlers re-apply
the coefficients per sequence. A loss term that reaches the trainable parameters by another path --
an entropy bonus or a z-loss on the logits, an MoE router auxiliary loss, a penalty on hidden states
or on the weights -- would arrive at the covered layers mixed with those unweighted gradients and be
re-weighted as if it were part of them: a wrong gradient.

This module wraps torch's backward entry point (``torch.autograd._engine_run_backward``, which
``Tensor.backward``, ``torch.autograd.backward`` and ``torch.autograd.grad`` all call). When a
backward starts while a block is open, each watcher (one per engine with an open block) sees the
roots first: the engine walks the loss's graph from them, stopping at ``logp``
(`path_around`), and refuses the backward -- before it runs, so nothing has changed -- if a
covered parameter is reachable without passing through ``logp``. Without such a term the walk
visits only the loss's own few nodes. Backward calls nested inside a running backward (reentrant
gradient checkpointing recomputes and backpropagates segments) are not watched; `depth` tells
whether one is running.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["install", "installed", "add_watcher", "remove_watcher", "path_around", "node_name", "depth"]

_watchers: list[Callable] = []
_depth = 0
_original: Callable | None = None


def _run_backward(t_outputs, *args, **kwargs):
    global _depth
    if _depth == 0 and _watchers:
        for watcher in list(_watchers):
            watcher(t_outputs)
    _depth += 1
    try:
        return _original(t_outputs, *args, **kwargs)
    finally:
        _depth -= 1


def install() -> bool:
    """Wrap torch's backward entry point (once per process). False if this torch has none: then
    no backward is watched (loss terms outside the log-probs go undetected)."""
    global _original
    if _original is not None:
        return True
    import torch.autograd as autograd

    original = getattr(autograd, "_engine_run_backward", None)
    if original is None:  # pragma: no cover - torch < 2.3
        return False
    _original = original
    autograd._engine_run_backward = _run_backward
    return True


def depth() -> int:
    """How many watched backward calls are running (nested ones included)."""
    return _depth


def installed() -> bool:
    """Whether backward calls are being watched in this process."""
    return _original is not None


def add_watcher(watcher: Callable[[tuple], None]) -> Callable[[tuple], None]:
    """From now on, ``watcher(roots)`` runs before every (outermost) backward call; returns it."""
    _watchers.append(watcher)
    return watcher


def remove_watcher(watcher: Callable[[tuple], None]) -> None:
    """Stop calling ``watcher`` (idempotent)."""
    if watcher in _watchers:
        _watchers.remove(watcher)


def node_name(node) -> str:
    """A readable name of an autograd graph node (``MulBackward0``, ``CapturedCallBackward``)."""
    try:
        return node.name()
    except Exception:  # any node type
        return type(node).__name__


def _root_edges(roots: Iterable) -> list:
    """``(node, output number)`` of each root of a backward call."""
    edges = []
    for root in roots:
        if isinstance(root, torch.Tensor):
            if root.grad_fn is not None:
                edges.append((root.grad_fn, root.output_nr))
        else:  # a GradientEdge
            node = getattr(root, "node", None)
            if node is not None:
                edges.append((node, getattr(root, "output_nr", 0)))
    return edges


def path_around(roots: Iterable, barrier: tuple | None, is_target: Callable) -> list | None:
    """The chain of graph nodes from a root of the backward to the first node ``is_target``
    accepts, found without passing through the edge ``barrier`` -- ``(logp.grad_fn,
    logp.output_nr)``: a gradient arriving at logp's node through *another* of its outputs (a
    sibling of logp from ``split`` or a fused multi-output kernel) is not stopped. ``None`` if
    there is no such path. Depth-first over ``next_functions``; each node is expanded once."""
    parents: dict = {}
    stack = []
    for node, nr in _root_edges(roots):
        if barrier is not None and node is barrier[0] and nr == barrier[1]:
            continue
        if node not in parents:
            parents[node] = None
            stack.append(node)
    while stack:
        node = stack.pop()
        if is_target(node):
            path = [node]
            while parents[path[-1]] is not None:
                path.append(parents[path[-1]])
            return path[::-1]
        for child, nr in node.next_functions:
            if child is None or child in parents:
                continue
            if barrier is not None and child is barrier[0] and nr == barrier[1]:
                continue  # the gradient enters logp itself: gradproj's hook sees it
            parents[child] = node
            stack.append(child)
    return None
