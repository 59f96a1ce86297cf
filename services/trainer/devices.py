"""Discovery of the devices sessions run on: the host's GPUs, or its CPU."""

import logging
import os
import shutil
import subprocess

logger = logging.getLogger(__name__)


def discover_gpus() -> list[str]:
    """Return ``gpu:N`` for each GPU that ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L`` shows.

    ``CUDA_VISIBLE_DEVICES`` wins when set: an empty value means no GPU, and otherwise its entries
    are the devices' indices as the session processes will see them.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [entry.strip() for entry in visible.split(",") if entry.strip() and entry.strip() != "-1"]
        return [f"gpu:{entry}" for entry in entries]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("nvidia-smi is installed but failed (%s); using the CPU", error)
        return []
    return [f"gpu:{index}" for index, line in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]


def discover_devices() -> list[str]:
    """Return the GPUs, or ``["cpu:0"]`` on a host without one."""
    return discover_gpus() or ["cpu:0"]


def backend_for(device: str, configured: str = "auto") -> str:
    """Return the PyTensor backend for ``device``: JAX on a GPU, the default backend on a CPU.

    ``configured`` (from ``LASAGNE_ENGINE_BACKEND``) overrides the choice unless it is ``auto``.
    """
    if configured not in ("auto", "default", "jax"):
        raise ValueError(f"LASAGNE_ENGINE_BACKEND={configured!r} must be auto, default or jax.")
    if configured != "auto":
        return configured
    return "jax" if device.startswith("gpu:") else "default"
