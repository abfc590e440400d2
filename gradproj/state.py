"""gradproj's entry in an optimizer state dict: write it, and check it before anything is loaded.

Tensor/primitive-only (it loads with ``torch.load(weights_only=True)``): the format version, the
strategy names, the whole configuration (options included) and the step count. A checkpoint
written with another strategy or other settings is refused -- resuming with them would silently
change the run.
"""

from __future__ import annotations

from typing import Any

from gradproj.config import GradProjConfig
from gradproj.errors import CheckpointError

__all__ = ["STATE_VERSION", "STATE_KEY", "gradproj_state", "check_gradproj_state"]

STATE_VERSION = 2
#: the key of gradproj's entry in the optimizer state dict
STATE_KEY = "gradproj"


def gradproj_state(config: GradProjConfig, strategies: list[str], steps: int) -> dict[str, Any]:
    """The entry `gradproj.GradProjOptimizer.state_dict` adds under ``"gradproj"``."""
    return {"version": STATE_VERSION, "strategies": list(strategies), "config": config.to_dict(), "steps": steps}


def check_gradproj_state(state: Any, config: GradProjConfig, strategies: list[str]) -> int:
    """Validate a `gradproj_state` entry against this optimizer without changing anything;
    return the step count to restore.

    Raises:
        CheckpointError: not gradproj state, another format version, another strategy or other
            options.
    """
    if not isinstance(state, dict):
        raise CheckpointError(
            f"the 'gradproj' entry of this optimizer state dict is a {type(state).__name__}, not the dict "
            "GradProjOptimizer.state_dict() writes; the checkpoint is corrupted or from another program"
        )
    version = state.get("version")
    if version not in (1, STATE_VERSION):
        raise CheckpointError(
            f"gradproj state has version {version!r}, this gradproj reads versions 1 and {STATE_VERSION}; "
            "load it with the gradproj version that wrote it"
        )
    steps = state.get("steps", 0)
    saved_strategies = state.get("strategies")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0 or not isinstance(saved_strategies, (list, tuple)):
        raise CheckpointError(
            f"gradproj state is malformed (steps={steps!r}, strategies={saved_strategies!r}); the checkpoint is "
            "corrupted -- resume from another one"
        )
    if list(saved_strategies) != list(strategies):
        raise CheckpointError(
            f"checkpoint was written with strategies {list(saved_strategies)} but this optimizer "
            f"uses {list(strategies)}; wrap with the same strategy to resume"
        )
    if version >= 2:
        saved = state.get("config")
        if not isinstance(saved, dict):
            raise CheckpointError(f"gradproj state is malformed (config={saved!r}); the checkpoint is corrupted")
        current = config.to_dict()
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise CheckpointError(
                f"checkpoint was written with other gradproj settings ({diffs}); wrap with the settings "
                "it was written with to resume exactly. To change them deliberately, drop the "
                "'gradproj' entry from the state dict before loading it"
            )
    return steps
