"""Exceptions raised by gradproj.

Every error gradproj raises is a `GradProjError`. Subclasses also derive from the
built-in exception that fits (``ValueError`` for bad input, ``RuntimeError`` for a wrong call
order), so existing ``except ValueError`` code keeps working. Messages say what was wrong,
where, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "GradProjError",
    "ConfigError",
    "InputError",
    "CoefficientError",
    "LossTermError",
    "CoverageError",
    "ProtocolError",
    "CheckpointError",
]


class GradProjError(Exception):
    """Base class of every error raised by gradproj."""


class ConfigError(GradProjError, ValueError):
    """An unknown strategy or option, or an option value out of range."""


class InputError(GradProjError, ValueError):
    """Bad tensors handed to `GradProjOptimizer.microbatch` (shape, dtype, grad)."""


class CoefficientError(GradProjError, ValueError):
    """The loss's per-token weights ``w = dL/dlogp`` are not constant along a sequence."""


class LossTermError(CoefficientError):
    """A term of the loss reaches the trainable parameters without passing through the log-probs
    given to ``opt.microbatch`` (an entropy bonus, a z-loss or router auxiliary loss, a penalty on
    hidden states or weights): gradproj would re-weight it per sequence as if it were part of them."""


class CoverageError(GradProjError, ValueError):
    """A trainable parameter is reached by the backward pass but no layer handler covers it."""


class ProtocolError(GradProjError, RuntimeError):
    """Calls in the wrong order: nested microbatches, ``step()`` inside a microbatch, ..."""


class CheckpointError(GradProjError, ValueError):
    """A ``state_dict`` that does not belong to this optimizer or this gradproj version."""
