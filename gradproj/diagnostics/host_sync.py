"""Count host synchronisations -- on any device, the CPU included.

On a GPU, an operation whose result the host must read (``.item()``, ``bool(tensor)``, a copy to
the host, an output whose size depends on the data, a LAPACK-style call whose error codes torch
checks on the host) makes Python wait until the GPU has run everything queued before it. Inside
the backward pass that stalls the autograd engine, once per call. gradproj's capture is written to
do none of that per layer; `count_host_syncs` is how that is checked -- on the CPU, where
nothing actually waits, by recording the operations that *would* synchronise on a GPU::

    with gradproj.diagnostics.count_host_syncs() as syncs:
        loss.backward()
    print(len(syncs), syncs.summary())

What is recorded:

* through a `torch.utils._python_dispatch.TorchDispatchMode`: ``aten._local_scalar_dense``
  (``.item()``, ``float()``, ``int()``, ``bool()`` of a tensor), data-dependent output shapes
  (``nonzero``, ``unique``, ``masked_select``, boolean-mask indexing, ``bincount``,
  ``repeat_interleave`` without ``output_size``) and the linear-algebra kernels whose error codes
  torch reads on the host (``linalg.eigh``/``eigvalsh``, ``svd``, the non-``_ex`` ``solve``,
  ``cholesky``, ``inv``);
* by patching `torch.Tensor`: ``.cpu()``, ``.numpy()``, ``.tolist()`` and ``__array__``
  (copies to the host; on the CPU they copy nothing, but on a GPU each one waits).

Each event keeps the first stack frame inside ``gradproj`` (or the first outside torch), so a test
failure says where the synchronisation is. The instrument is for tests and debugging: it slows
every operation down while active. On a real GPU, ``torch.cuda.set_sync_debug_mode("warn")``
reports the synchronisations that actually happen.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncs", "count_host_syncs", "SYNCING_OPS"]

_aten = torch.ops.aten

#: aten overload packets that synchronise with the host on a GPU (see the module doc)
SYNCING_OPS = frozenset(
    getattr(_aten, name)
    for name in (
        "_local_scalar_dense", "nonzero", "_unique", "_unique2", "unique_dim", "unique_consecutive",
        "masked_select", "bincount", "_linalg_eigh", "_linalg_svd", "_linalg_check_errors", "linalg_lstsq",
    )
    if hasattr(_aten, name)
)

_MASK_DTYPES = (torch.bool, torch.uint8)


def _data_dependent(func, args, kwargs) -> bool:
    """Calls of otherwise fine ops whose output size depends on the data."""
    packet = func.overloadpacket
    if packet in (_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(t, torch.Tensor) and t.dtype in _MASK_DTYPES for t in indices or ())
    if packet is _aten.repeat_interleave:
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None) and func.name().endswith("Tensor")
    return False


def _where() -> str:
    """The first frame inside gradproj (else the first outside torch and this module)."""
    frame: FrameType | None = sys._getframe(2)
    fallback = None
    while frame is not None:
        filename = frame.f_code.co_filename
        if "gradproj" in filename and not filename.endswith("host_sync.py"):
            return f"{filename.split('gradproj', 1)[-1].lstrip('/')}:{frame.f_lineno} ({frame.f_code.co_name})"
        if fallback is None and "torch" not in filename and not filename.endswith("host_sync.py"):
            fallback = f"{filename}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return fallback or "?"


@dataclass(eq=False)
class HostSyncs:
    """The synchronisations recorded by `count_host_syncs`.

    Attributes:
        events: ``(what, where)`` per synchronisation, in order: the operation (``"aten.nonzero"``,
            ``"Tensor.cpu"``, ...) and the first stack frame in gradproj that caused it.
    """

    events: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.events)

    def summary(self) -> str:
        """One line per distinct (operation, place), most frequent first."""
        counts = Counter(self.events)
        return "\n".join(f"{n:5d}  {what:32s} {where}" for (what, where), n in counts.most_common()) or "(none)"

    def record(self, what: str) -> None:
        """Add one event (the place is found from the stack)."""
        self.events.append((what, _where()))


class _SyncMode(TorchDispatchMode):
    def __init__(self, syncs: HostSyncs) -> None:
        super().__init__()
        self.syncs = syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in SYNCING_OPS or _data_dependent(func, args, kwargs):
            self.syncs.record(f"aten.{func.overloadpacket.__name__}")
        return func(*args, **kwargs)


_PATCHED = ("cpu", "numpy", "tolist", "__array__")
_lock = threading.Lock()
_active: list[HostSyncs] = []
_originals: dict[str, Any] = {}


def _patched(name: str):
    original = _originals[name]

    def method(self, *args, **kwargs):
        for syncs in _active:
            syncs.record(f"Tensor.{name}")
        return original(self, *args, **kwargs)

    method.__name__ = name
    return method


@contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Record, while the block runs, every operation that would synchronise with the host on a GPU.

    Yields a `HostSyncs` (``len()`` is the count, ``.summary()`` says where). Nested blocks
    each record what happens inside them.
    """
    syncs = HostSyncs()
    with _lock:
        if not _active:
            for name in _PATCHED:
                _originals[name] = getattr(torch.Tensor, name)
                setattr(torch.Tensor, name, _patched(name))
        _active.append(syncs)
    try:
        with _SyncMode(syncs):
            yield syncs
    finally:
        with _lock:
            _active.remove(syncs)
            if not _active:
                for name in _PATCHED:
                    setattr(torch.Tensor, name, _originals.pop(name))
