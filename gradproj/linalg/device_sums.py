"""Running sums kept on the device until they are read (metrics without host synchronisation).

Strategies gather per-step metrics inside the backward (how much a projection removed, ranks used,
...). Reading each value on the host there would stop the GPU's queue once per layer; instead the
values are added up as tensors where they were computed, and read once, when the step's metrics are
asked for.
"""

from __future__ import annotations

import torch

__all__ = ["DeviceSums"]


class DeviceSums:
    """``size`` float64 running sums, one vector per device the values came from.

    Args:
        size: how many sums.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._sums: dict[torch.device, torch.Tensor] = {}

    def add(self, *values: torch.Tensor | float) -> None:
        """Add one value to each sum (0-dim tensors, all on one device, or Python numbers)."""
        if len(values) != self.size:
            raise ValueError(f"DeviceSums.add() takes {self.size} values, got {len(values)}")
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
        row = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
        current = self._sums.get(device)
        self._sums[device] = row if current is None else current + row

    def values(self) -> list[float]:
        """The sums, read to the host (one transfer per device)."""
        total = [0.0] * self.size
        for sums in self._sums.values():
            for index, value in enumerate(sums.tolist()):
                total[index] += value
        return total

    def clear(self) -> None:
        """Start from zero."""
        self._sums.clear()
