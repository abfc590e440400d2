"""The TRL versions this adapter is written against (it uses GRPOTrainer internals)."""

from __future__ import annotations

from gradproj.integrations._versions import check_version

__all__ = ["SUPPORTED_TRL", "check_trl_version"]

#: ``(lowest, first unsupported)`` TRL versions.
SUPPORTED_TRL = ("1.16.0", "1.17.0")


def check_trl_version(installed: str | None = None) -> str:
    """Return the installed TRL version; raise ImportError naming the supported range otherwise."""
    return check_version(
        "trl", SUPPORTED_TRL, "gradproj.integrations.trl", "it relies on GRPOTrainer internals that change between releases",
        installed,
    )
