"""A CPU platform for verl 0.9 (verl ships only nvidia/huawei/amd platforms) -- for tests and the
CPU smoke run, not for training.

Without it verl falls back to the 'nvidia' platform on a CPU-only machine, and ``get_device_id()``
raises "Torch not compiled with CUDA enabled". `install` must run BEFORE anything imports
``verl.workers.engine`` (``transformer_impl`` reads the device name at import time), and so before
``gradproj.integrations.verl``. Use `gradproj.testing.verl_cpu.start` rather than this
module directly.
"""

from contextlib import contextmanager

import torch

from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry, set_platform


class _CpuDeviceModule:
    """torch.cpu lacks the memory-stat API that verl calls via get_torch_device()."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    def max_memory_allocated(self, *a, **k):
        return 0

    def max_memory_reserved(self, *a, **k):
        return 0

    def memory_allocated(self, *a, **k):
        return 0

    def memory_reserved(self, *a, **k):
        return 0

    def mem_get_info(self, *a, **k):
        return (0, 0)

    def empty_cache(self):
        pass

    def get_device_name(self, *a, **k):
        return "CPU"

    def synchronize(self, *a, **k):
        pass

    def reset_peak_memory_stats(self, *a, **k):
        pass

    def is_available(self):
        return True

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        torch.manual_seed(seed)

    def get_rng_state(self, *a, **k):  # verl's checkpoints save the device RNG state
        return torch.get_rng_state()

    def set_rng_state(self, state, *a, **k):
        torch.set_rng_state(state)


_CPU_DEVICE_MODULE = _CpuDeviceModule()


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """verl's ``PlatformBase`` for the CPU: each method implements the base class's method of the same
    name (device "cpu", communication backend gloo; memory, RNG and profiler calls are CPU no-ops)."""

    device_name = property(lambda self: "cpu")
    vendor_name = property(lambda self: "cpu")
    device_module = property(lambda self: _CPU_DEVICE_MODULE)

    def is_available(self):
        return True

    def current_device(self):
        # verl passes this straight to tensor.to(...) / FSDP(device_id=...); an int would mean cuda:N
        return torch.device("cpu")

    def device_count(self):
        return 1

    def set_device(self, device_index):
        pass

    def synchronize(self, device_index=None):
        pass

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings):
        pass

    def empty_cache(self):
        pass

    def get_device_capability(self, device_index=0):
        return None, None

    def communication_backend_name(self):
        return "gloo"

    def visible_devices_envvar(self):
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg):
        yield

    def profiler_start(self):
        pass

    def profiler_stop(self):
        pass

    def ray_resource_name(self):
        # verl's resource pools count Ray's "GPU" resource (``_check_resource_available``) and put
        # {"CPU": n, <this>: 1} in each bundle, so "CPU" here would overwrite the CPU count. A CPU run
        # of the trainer gives Ray logical GPU slots instead (``ray_init.num_gpus``); nothing uses CUDA.
        return "GPU"

    def ray_noset_envvars(self):
        return []

    def is_ipc_supported(self):
        return False

    def cudart(self):
        return None


def install():
    """Make the CPU platform verl's current platform."""
    set_platform(PlatformCPU())
