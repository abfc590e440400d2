"""Run verl's real FSDP actor update on the CPU (tests and the CPU smoke run; training needs GPUs).

verl 0.9 has no CPU platform and registers its FSDP engines for "cuda"/"npu" only. `start`
prepares one process of a gloo "cluster": the distributed environment variables verl's workers
read, ``VERL_ENGINE_DEVICE=cuda`` (the engine registry key; the tensors stay on the CPU), the CPU
platform of `gradproj.testing.verl_cpu.platform`, and the gloo process group.
"""

from __future__ import annotations

import os
import socket
import sys

__all__ = ["start", "free_port", "ray_worker_setup"]


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(rank: int = 0, world_size: int = 1, port: int | None = None) -> None:
    """Make this process rank ``rank`` of a gloo group of ``world_size`` that runs verl on the CPU.

    Must run before anything imports ``verl.workers.engine`` (and so before
    ``gradproj.integrations.verl``); idempotent within a process.
    """
    if "verl.workers.engine.fsdp.transformer_impl" in sys.modules and not _cpu_platform_active():
        raise RuntimeError(
            "verl's FSDP engine was imported before the CPU platform was installed (it caches the device "
            "name at import); call gradproj.testing.verl_cpu.start() first"
        )
    if world_size > 1 and port is None:
        raise ValueError("several processes must agree on the port: pass port=")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port or free_port()))
    if port is not None:
        os.environ["MASTER_PORT"] = str(port)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"  # verl registers its FSDP engines for cuda/npu only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gradproj.testing.verl_cpu import platform as cpu_platform

    cpu_platform.install()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", rank=rank, world_size=world_size)


def _cpu_platform_active() -> bool:
    try:
        from verl.plugin.platform.platform_manager import get_platform

        return get_platform().device_name == "cpu"
    except Exception:  # noqa: BLE001 - any failure means "not ours"
        return False


def ray_worker_setup() -> None:
    """Prepare a Ray worker process of verl's trainer for the CPU (Ray's ``worker_process_setup_hook``).

    Runs when the process starts, before it imports verl's engine: the CPU platform, the engine
    registry key, one torch thread, and the ``hf_cpu`` rollout backend
    (`gradproj.testing.verl_cpu.rollout`). The distributed environment is verl's own (its worker
    groups set ``MASTER_ADDR`` and the ranks).
    """
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"  # verl registers its FSDP engines for cuda/npu only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    from gradproj.testing.verl_cpu import platform as cpu_platform

    cpu_platform.install()
    # verl's workers join "cpu:gloo,<device>:<backend>", i.e. "cpu:gloo,cpu:gloo" here, which torch refuses
    from verl.utils import distributed

    distributed.initialize_global_process_group_ray.__defaults__ = (None, "gloo")
    from gradproj.testing.verl_cpu import rollout

    rollout.register()
