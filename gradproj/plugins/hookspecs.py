"""Hook specifications of the ``gradproj`` plugin project.

A plugin is any module or object with functions marked ``@gradproj.hookimpl`` whose names match
the specifications below. Hooks are called once, when the registry is built (at ``wrap()``
time), never inside a per-layer backward hook.
"""

from __future__ import annotations

import pluggy

PROJECT = "gradproj"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def gradproj_strategies():
    """Return a list of `gradproj.strategies.StrategySpec` this plugin provides.

    Names must be unique across all installed plugins.
    """


@hookspec
def gradproj_layer_handlers():
    """Return a list of `gradproj.capture.handlers.LayerHandler` instances.

    A handler declares the module types it covers; the most specific registered type wins.
    """
