"""Refusing loss terms that reach the covered parameters without passing through ``logp``.

Before each backward started inside an open microbatch block, the loss graph is walked from its
roots (`gradproj.capture.backward_watch.path_around`), stopping at the edge into ``logp``.
Reaching a captured layer of this engine, the gradient accumulator of a covered parameter, or a
reentrant checkpoint segment (whose layers the walk cannot see) means part of the loss bypasses
the per-sequence weights gradproj re-applies: a `gradproj.LossTermError`, raised before
anything changed. A hook registered on ``logp`` after gradproj's own is refused too.
"""

from __future__ import annotations

from gradproj.capture import backward_watch
from gradproj.capture.layer import CHECKPOINT_FUNCTION, LayerCapture
from gradproj.errors import CoefficientError, LossTermError

__all__ = ["LossTermCheck"]


class LossTermCheck:
    """The check one engine runs on each backward call inside its open microbatch.

    Args:
        engine: the engine whose layers count as covered.
        covered: ``id(param) -> name`` of the covered parameters.
    """

    def __init__(self, engine: object, covered: dict[int, str]) -> None:
        self.engine = engine
        self.covered = covered

    def __call__(self, mb, roots) -> None:
        """Raise (and record as ``mb.error``) if this backward's loss has a term gradproj would
        scale wrongly; the microbatch is then discarded when it closes."""
        later = [key for key in getattr(mb.logp, "_backward_hooks", None) or () if key > mb.hook_id]
        if later:
            mb.error = CoefficientError(
                f"{mb.where}: a hook was registered on logp inside the block, after gradproj's: it would change "
                "the unweighted gradient gradproj sends down (per-token weights that no check sees). Register it "
                "before opening the block (then gradproj sees its weights), or put the weights into the loss"
            )
            raise mb.error
        path = backward_watch.path_around(roots, mb.logp_edge, self.is_covered_node)
        if path is None:
            return
        target = path[-1]
        layer = getattr(target, "layer", None)
        if isinstance(layer, LayerCapture):
            where = f"layer {layer.name!r}"
        else:
            where = self.covered.get(id(getattr(target, "variable", None)), "a covered parameter")
        chain = " -> ".join(backward_watch.node_name(node) for node in path[-8:])
        mb.error = LossTermError(
            f"{mb.where}: a term of the loss reaches {where} without passing through the log-probs given "
            f"to opt.microbatch() (backward path {'... -> ' if len(path) > 8 else ''}{chain}). gradproj "
            "re-weights each layer's gradient per sequence from the weights the loss puts on those "
            "log-probs, so such a term (an entropy bonus, a z-loss or other penalty on the logits, an MoE "
            "router auxiliary loss, a penalty on hidden states or weights, a second model output) would be "
            "scaled wrongly. Remove it from the loss -- shape the reward instead -- or use strategy='none', "
            "which accepts any loss. Nothing was changed."
        )
        raise mb.error

    def is_covered_node(self, node) -> bool:
        """A captured layer's backward (its autograd Function's ctx carries the layer), the
        gradient accumulator of a covered parameter, or a reentrant checkpoint segment."""
        layer = getattr(node, "layer", None)
        if isinstance(layer, LayerCapture):
            return layer.engine is self.engine
        if getattr(node, "_forward_cls", None) is CHECKPOINT_FUNCTION:
            return True
        variable = getattr(node, "variable", None)  # AccumulateGrad of a leaf
        return variable is not None and id(variable) in self.covered
