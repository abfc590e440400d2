"""The verl versions this plugin is written against (it wraps private methods of verl's FSDP engine)."""

from __future__ import annotations

from gradproj.integrations._versions import check_version

__all__ = ["SUPPORTED_VERL", "check_verl_version"]

#: ``(lowest, first unsupported)`` verl versions.
SUPPORTED_VERL = ("0.9.1", "0.10.0")


def check_verl_version(installed: str | None = None) -> str:
    """Return the installed verl version; raise ImportError naming the supported range otherwise."""
    return check_version(
        "verl", SUPPORTED_VERL, "gradproj.integrations.verl",
        "it wraps private methods of verl's FSDP engine and engine worker", installed,
    )
