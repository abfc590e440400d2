"""What capture and strategies share (``gradproj.work``): the units of work capture hands to strategies.

It sits right above `gradproj.linalg` and below both `gradproj.capture` and
`gradproj.strategies`, which never import each other:

* `LayerBatch` -- the work item: parameter tensors of one microbatch handled by one strategy
  call (several small same-sized ones, or one large one); `Update` -- what a rule returns;
* `Capabilities` -- what a strategy declares about itself;
* `MicrobatchContext` -- what coefficient transforms read of a microbatch (read-only);
* `StepGroups` -- the step's prompt groups and rewards (``opt.set_groups``);
* `ResolvedStrategies` -- the strategies of one optimizer, in the order capture runs them.
"""

from gradproj.work.capabilities import Capabilities
from gradproj.work.context import MicrobatchContext
from gradproj.work.groups import StepGroups, as_group_ids, require_groups
from gradproj.work.layer_batch import LayerBatch, Update
from gradproj.work.resolved import ResolvedStrategies

__all__ = [
    "LayerBatch",
    "Update",
    "Capabilities",
    "MicrobatchContext",
    "StepGroups",
    "as_group_ids",
    "require_groups",
    "ResolvedStrategies",
]
