"""Version ranges of the frameworks whose internals an integration relies on (checked at import)."""

from __future__ import annotations

import importlib.metadata

__all__ = ["parse_version", "check_version"]


def parse_version(version: str) -> tuple[int, ...]:
    """``"0.9.1"``, ``"1.16.0.dev0"``, ``"2.13.0+cpu"`` -> a comparable tuple of the first three numbers."""
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_version(distribution: str, supported: tuple[str, str], user: str, why: str, installed: str | None = None) -> str:
    """Return the installed version of ``distribution``; raise ImportError naming the range otherwise.

    Args:
        distribution: the PyPI name (``"trl"``, ``"verl"``).
        supported: ``(lowest, first unsupported)``.
        user: the integration asking (``"gradproj.integrations.trl"``), for the message.
        why: what internals it relies on, for the message.
        installed: the version to check (default: the installed one).
    """
    low, high = supported
    pin = f"pip install '{distribution}>={low},<{high}'"
    if installed is None:
        try:
            installed = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            raise ImportError(f"{user} needs {distribution}: {pin}") from None
    if not (parse_version(low) <= parse_version(installed) < parse_version(high)):
        raise ImportError(
            f"{user} supports {distribution} >={low},<{high} ({why}); {distribution} {installed} is installed. "
            f"Install a supported version: {pin}"
        )
    return installed
