"""Discovery of the devices sessions run on, with the memory budget of each.

GPUs come from ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi``; without one, the host's CPU cores
become devices ``cpu:0``, ``cpu:1`` and so on.
"""

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Memory left free on each GPU for the CUDA context, the compiler's workspace and fragmentation.
DEFAULT_GPU_RESERVE_BYTES = 1 << 30
MEBIBYTE = 1 << 20


@dataclass(frozen=True)
class DeviceInfo:
    """A device sessions can be placed on."""

    name: str
    kind: str
    memory_budget_bytes: int
    # Index of the CPU core a session on this device is pinned to; None for a GPU.
    cpu_core: int | None = None

    @property
    def index(self) -> str:
        return self.name.split(":", 1)[1]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(f"Environment variable {name}={value!r} is not an integer.") from error


def _nvidia_smi_memory() -> dict[str, int]:
    """Return the total memory of each GPU by index and by UUID, as nvidia-smi reports it; empty without it.

    ``CUDA_VISIBLE_DEVICES`` may name a GPU either way, so both keys map to the same figure.
    """
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        listing = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("nvidia-smi is installed but failed (%s); no GPU memory figures", error)
        return {}
    memory = {}
    for line in listing.splitlines():
        fields = [part.strip() for part in line.split(",")]
        if len(fields) != 3:
            continue
        index, gpu_uuid, total_mebibytes = fields
        if index.isdigit() and total_mebibytes.isdigit():
            memory[index] = memory[gpu_uuid] = int(total_mebibytes) * MEBIBYTE
    return memory


def discover_gpus() -> list[DeviceInfo]:
    """Return the GPUs that ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi`` shows.

    ``CUDA_VISIBLE_DEVICES`` wins when set: an empty value or ``-1`` means no GPU, and otherwise
    its entries are the devices' indices as the session processes will see them. Each budget is
    the GPU's memory less ``LASAGNE_ENGINE_GPU_RESERVE_BYTES`` (default 1 GiB), or
    ``LASAGNE_ENGINE_GPU_MEMORY_BYTES`` when nvidia-smi cannot tell.
    """
    memory = _nvidia_smi_memory()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        indices = [entry.strip() for entry in visible.split(",") if entry.strip() and entry.strip() != "-1"]
    else:
        indices = sorted((key for key in memory if key.isdigit()), key=int)
    reserve = _env_int("LASAGNE_ENGINE_GPU_RESERVE_BYTES", DEFAULT_GPU_RESERVE_BYTES)
    fallback = _env_int("LASAGNE_ENGINE_GPU_MEMORY_BYTES", 0)
    devices = []
    for index in indices:
        total = memory.get(index, fallback)
        if not total:
            logger.warning("No memory figure for GPU %s; set LASAGNE_ENGINE_GPU_MEMORY_BYTES", index)
        devices.append(DeviceInfo(name=f"gpu:{index}", kind="gpu", memory_budget_bytes=max(0, total - reserve)))
    return devices


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def _usable_cores() -> list[int]:
    """Return the CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def discover_cpus() -> list[DeviceInfo]:
    """Return ``LASAGNE_ENGINE_CPU_DEVICES`` CPU devices (default: one per core the process may use).

    Each gets ``LASAGNE_ENGINE_CPU_DEVICE_MEMORY_BYTES``, by default an equal share of half the
    host's memory, and is pinned to one core.
    """
    count = _env_int("LASAGNE_ENGINE_CPU_DEVICES", len(_usable_cores()))
    if count < 1:
        raise ValueError(f"LASAGNE_ENGINE_CPU_DEVICES={count} must be at least 1.")
    budget = _env_int("LASAGNE_ENGINE_CPU_DEVICE_MEMORY_BYTES", _host_memory_bytes() // 2 // count)
    return cpu_devices(count, memory_budget_bytes=budget)


def discover_devices() -> list[DeviceInfo]:
    """Return the GPUs, or the CPU devices on a host without one."""
    return discover_gpus() or discover_cpus()


def cpu_devices(count: int, *, memory_budget_bytes: int) -> list[DeviceInfo]:
    """Return ``count`` CPU devices with the given budget, pinned to the available cores in turn."""
    cores = _usable_cores()
    return [
        DeviceInfo(name=f"cpu:{index}", kind="cpu", memory_budget_bytes=memory_budget_bytes, cpu_core=cores[index % len(cores)])
        for index in range(count)
    ]


def backend_for(device: str, configured: str = "auto") -> str:
    """Return the PyTensor backend for ``device``: JAX on a GPU, the default backend elsewhere.

    ``configured`` (from ``LASAGNE_ENGINE_BACKEND``) overrides the choice unless it is ``auto``.
    """
    if configured not in ("auto", "default", "jax"):
        raise ValueError(f"LASAGNE_ENGINE_BACKEND={configured!r} must be auto, default or jax.")
    if configured != "auto":
        return configured
    return "jax" if device.startswith("gpu:") else "default"


OPTIMIZER_STATE_SLOTS = {"sgd": 0, "momentum": 1, "nesterov": 1, "adam": 2, "adamw": 2, "rmsprop": 1, "adagrad": 1}
# Activations of one batch are estimated as this many times the batch's input and output bytes,
# plus a fixed allowance for the compiled functions' workspace.
ACTIVATION_FACTOR = 16
FIXED_OVERHEAD_BYTES = 32 * MEBIBYTE


def estimate_session_bytes(
    *, dataset_bytes: int, parameter_bytes: int, optimizer: str, batch_size: int,
    example_bytes: int, output_bytes: int,
) -> int:
    """Estimate the device memory a session holds.

    The sum of the dataset's four arrays, the parameters and one copy per optimizer state slot
    (Adam keeps two), and a margin for one batch's activations. This is an estimate: the real
    figure depends on the backend's buffers and on hidden layer widths, which the registry's
    signature does not break down.
    """
    slots = OPTIMIZER_STATE_SLOTS.get(optimizer, 2)
    activations = batch_size * (example_bytes + output_bytes) * ACTIVATION_FACTOR
    return dataset_bytes + parameter_bytes * (1 + slots) + activations + FIXED_OVERHEAD_BYTES
