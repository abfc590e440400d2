"""The public, non-context microbatch API adapters build on: ``opt.begin_microbatch()`` -> handle -> ``close(exc)``."""

from __future__ import annotations

from gradproj.errors import ProtocolError

__all__ = ["MicrobatchHandle"]


class MicrobatchHandle:
    """An open microbatch, from `GradProjOptimizer.begin_microbatch`: close it exactly once,
    after its backward (``close()``) or when the code between failed (``close(exc)``)."""

    __slots__ = ("_engine", "_microbatch", "closed")

    def __init__(self, engine, microbatch) -> None:
        self._engine = engine
        self._microbatch = microbatch
        self.closed = False

    @property
    def k(self) -> int:
        """The number of sequences (rows of ``logp``)."""
        return self._microbatch.k

    @property
    def microbatch(self):
        """The engine's state of this microbatch (what the ``with`` block yields)."""
        return self._microbatch

    def close(self, exc: BaseException | None = None) -> None:
        """Close the microbatch: its updates reach ``.grad`` -- or, with ``exc`` (what ended your code
        between ``begin_microbatch`` and here), none do and ``.grad`` is left as it was.

        Raises:
            ProtocolError: closed twice; or gradproj's own check failed in the backward (the
                microbatch is discarded).
        """
        if self.closed:
            raise ProtocolError("this microbatch was already closed")
        self.closed = True
        self._engine.close(self._microbatch, exc)
