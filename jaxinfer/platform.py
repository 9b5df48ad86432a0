"""Facts of the machine jaxinfer runs on, decided on the host (never inside a jitted function):
the device and whether a GPU is present that jax does not see, free memory for the KV pool,
and JAX's persistent compilation cache. Also jaxinfer's logger: one line each on stderr,
`jaxinfer: ...`, at the level in $JAXINFER_LOG_LEVEL (default INFO); a program that configures
the "jaxinfer" logger itself keeps its own handlers.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys

logger = logging.getLogger("jaxinfer")


def _configure() -> None:
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("jaxinfer: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("JAXINFER_LOG_LEVEL", "INFO").upper())
    logger.propagate = False


_configure()


def nvidia_gpu_present(timeout_s: float = 10.0) -> bool:
    """Whether `nvidia-smi -L` lists a GPU on this machine (whatever jax can see)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def device_summary() -> str:
    """e.g. '1 x NVIDIA H200 (gpu, jax 0.11.2)' or '1 x cpu (cpu, jax 0.10.2)'; with several
    processes, every process's devices and this one's number ('..., process 1 of 2')."""
    import jax

    devices = jax.devices()
    n = jax.process_count()
    processes = f", process {jax.process_index()} of {n}" if n > 1 else ""
    return (
        f"{len(devices)} x {devices[0].device_kind} "
        f"({jax.default_backend()}, jax {jax.__version__}{processes})"
    )


@functools.cache
def log_device() -> None:
    """Says once per process which device jaxinfer runs on; warns when a GPU is present that
    jax does not see (a CPU build of jax on a GPU machine)."""
    import jax

    logger.info("running on %s", device_summary())
    if jax.default_backend() == "cpu" and nvidia_gpu_present():
        logger.warning(
            "an NVIDIA GPU is present (nvidia-smi) but jax sees only the CPU: install "
            "the CUDA build of jax with `bash scripts/setup.sh` (it picks jax[cuda12] "
            "or jax[cuda13] from the driver)"
        )


def free_memory_bytes(devices=None) -> int | None:
    """Bytes free now on each of `devices` (default: the device the engine runs on): the least
    free accelerator memory among them, or on a CPU half the host's available memory shared
    among them (the rest is left to activations, compiles and the machine's other work); None
    where neither can be read."""
    devices = _engine_devices(devices)
    if devices[0].platform != "cpu":
        return _least_stat(
            devices,
            lambda s: s["bytes_limit"] - s.get("bytes_in_use", 0) if "bytes_limit" in s else None,
        )
    available = _host_available_bytes()
    return None if available is None else available // 2 // len(devices)


def device_memory_bytes(devices=None) -> int | None:
    """The accelerator memory JAX's allocator may hold on each of `devices` (default: the
    engine's device), the least among them; None on a CPU or where the allocator doesn't say."""
    devices = _engine_devices(devices)
    if devices[0].platform == "cpu":
        return None
    return _least_stat(devices, lambda s: s.get("bytes_limit"))


def largest_free_block_bytes(devices=None) -> int | None:
    """The largest contiguous free block of accelerator memory, the least among `devices`
    (default: the engine's device); None on a CPU or where the allocator doesn't say. Free
    memory can be in pieces (a model's weights made on the device leave holes): one program's
    temporaries must fit in one piece."""
    devices = _engine_devices(devices)
    if devices[0].platform == "cpu":
        return None
    return _least_stat(devices, lambda s: s.get("largest_free_block_bytes"))


def _engine_devices(devices) -> list:
    from pallas_kernels.common import default_device

    return [default_device()] if devices is None else list(devices)


def _least_stat(devices, read) -> int | None:
    """The least of `read(memory_stats)` over the devices; None where one of them can't say."""
    values = [read(device.memory_stats() or {}) for device in devices]
    return None if None in values else min(values)


def _host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def use_compilation_cache(path: str | None = None) -> None:
    """Points JAX's persistent compilation cache at `path` unless the user set one already, so
    a restart loads compiled programs instead of compiling them. None: $JAXINFER_COMPILATION_CACHE
    or ~/.cache/jaxinfer/xla; "" leaves the cache off."""
    import jax

    if path is None:
        path = os.environ.get(
            "JAXINFER_COMPILATION_CACHE",
            os.path.join(os.path.expanduser("~"), ".cache", "jaxinfer", "xla"),
        )
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        # Keep the small programs too (samplers compile in under a second, JAX's default floor
        # for caching): loading one is still faster than compiling it.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
