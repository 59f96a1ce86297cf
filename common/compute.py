"""Environment for processes that import PyTensor: dtype, backend and the shared compile caches.

With floatX float32, PyTensor 3.3 switches JAX's x64 mode off when its JAX backend loads, so JAX
computes int64 indices as int32 and warns once per operation ("Explicitly requested dtype int64
... is not available"). Those warnings are expected; ``JAX_TRUNCATION_WARNING`` matches them.

Every session process and model check gets the same compile cache folder, so a graph compiled
once on a host is reused by every later session that builds the same operations.
"""

import os
import pathlib

# float32 is what GPUs train in, and it halves the memory of every dataset and parameter.
FLOAT_DTYPE = "float32"
BACKENDS = ("default", "jax")
JAX_TRUNCATION_WARNING = r"Explicitly requested dtype .* is not available"


def compute_environment(
    compile_cache: pathlib.Path,
    *,
    backend: str = "default",
    base: dict[str, str] | None = None,
    create_cache: bool = True,
) -> dict[str, str]:
    """Return ``base`` (default ``os.environ``) with the PyTensor and JAX settings for ``backend``.

    PyTensor keeps its Numba cache under ``base_compiledir``; JAX keeps compiled XLA programs in
    its persistent compilation cache. Both point into ``compile_cache``, which is created here
    unless ``create_cache`` is false, as for a folder that exists only inside a container.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    environment = dict(os.environ if base is None else base)
    if create_cache:
        compile_cache.mkdir(parents=True, exist_ok=True)
    flags = [f"floatX={FLOAT_DTYPE}", f"base_compiledir={compile_cache / 'pytensor'}"]
    if backend == "jax":
        flags.append("mode=JAX")
    existing = environment.get("PYTENSOR_FLAGS")
    # Flags the user set come last, so they win over the engine's.
    environment["PYTENSOR_FLAGS"] = ",".join([*flags, existing] if existing else flags)
    environment.setdefault("JAX_COMPILATION_CACHE_DIR", str(compile_cache / "jax"))
    # Cache every compiled program, not only those that took over a second to compile.
    environment.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    environment.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    # JAX would otherwise reserve 75% of the GPU's memory at its first allocation.
    environment.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return environment
