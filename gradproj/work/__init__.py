"""What capture and strategies share (``gradproj.work``): the units of work capture hands to strategies.

It sits right above :mod:`gradproj.linalg` and below both :mod:`gradproj.capture` and
:mod:`gradproj.strategies`, which never import each other:

* :class:`LayerStep` -- one parameter tensor in one microbatch (the per-layer work item);
* :class:`LayerBatch` -- several small same-sized parameter tensors in one microbatch;
* :class:`MicrobatchContext` -- what coefficient transforms read of a microbatch (read-only);
* :class:`StepGroups` -- the step's prompt groups and rewards (``opt.set_groups``);
* :class:`ResolvedStrategies` -- the strategies of one optimizer, in the order capture runs them.
"""

from gradproj.work.context import MicrobatchContext
from gradproj.work.groups import StepGroups, as_group_ids, require_groups
from gradproj.work.layer_batch import LayerBatch
from gradproj.work.layer_step import LayerStep
from gradproj.work.resolved import ResolvedStrategies

__all__ = [
    "LayerStep",
    "LayerBatch",
    "MicrobatchContext",
    "StepGroups",
    "as_group_ids",
    "require_groups",
    "ResolvedStrategies",
]
