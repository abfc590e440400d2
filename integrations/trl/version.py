"""The TRL versions this adapter is written against (it uses GRPOTrainer internals)."""

from __future__ import annotations

import importlib.metadata

__all__ = ["SUPPORTED_TRL", "check_trl_version"]

#: ``(lowest, first unsupported)`` TRL versions.
SUPPORTED_TRL = ("1.16.0", "1.17.0")


def _parse(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_trl_version(installed: str | None = None) -> str:
    """Return the installed TRL version; raise ImportError naming the supported range otherwise."""
    if installed is None:
        try:
            installed = importlib.metadata.version("trl")
        except importlib.metadata.PackageNotFoundError:
            raise ImportError(
                f"gradproj.integrations.trl needs TRL: pip install 'trl>={SUPPORTED_TRL[0]},<{SUPPORTED_TRL[1]}'"
            ) from None
    low, high = SUPPORTED_TRL
    if not (_parse(low) <= _parse(installed) < _parse(high)):
        raise ImportError(
            f"gradproj.integrations.trl supports TRL >={low},<{high} (it relies on GRPOTrainer internals that change "
            f"between releases); TRL {installed} is installed. Install a supported version: "
            f"pip install 'trl>={low},<{high}'"
        )
    return installed
