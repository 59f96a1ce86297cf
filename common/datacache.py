"""A same-host cache of dataset arrays, filled once from the data service and then memory-mapped.

A trainer on the same host as its data reads arrays from local ``.npy`` files several times faster
than any gRPC stream delivers them. Each array is cached under its sha256, so versions and
datasets that share an array share its file, and a file never needs to be invalidated::

    <root>/<first 2 hex digits>/<sha256>.npy    the array, in numpy's .npy format
    <root>/<first 2 hex digits>/<sha256>.lock   taken while one process fills the file

A missing array is downloaded with :meth:`Engine.download_array` straight into a memory-mapped
temporary ``.npy`` file. The client checks the sha256 of the received bytes, and only then is the
file renamed into place, so a cached file is always whole and verified. Processes that fill the
same array at once wait on a file lock, and all but the first find the file ready.

Loading a cached array marks its file as used. Before a fill, the cache removes the files used
least recently until the new array fits both its size limit (``LASAGNE_ENGINE_DATA_CACHE_MAX_BYTES``,
none by default) and the free space of its file system. The arrays of the load in progress are
never removed. An array that cannot fit even then is downloaded into memory instead of the cache.
A removed file that a running session has memory-mapped stays readable for that session, and
its disk space is freed when the session unmaps it.
"""

import contextlib
import fcntl
import hashlib
import logging
import os
import pathlib
import shutil
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from lasagne_engine.arrays import canonical_dtype
from lasagne_engine.config import default_home
from lasagne_engine.durability import fsync_folder

__all__ = ["CACHE_VARIABLE", "MAX_BYTES_VARIABLE", "DatasetCache", "default_cache_root"]

logger = logging.getLogger(__name__)

CACHE_VARIABLE = "LASAGNE_ENGINE_DATA_CACHE"
MAX_BYTES_VARIABLE = "LASAGNE_ENGINE_DATA_CACHE_MAX_BYTES"
# Room for the .npy header in front of an array's bytes, which numpy usually writes in 128 bytes.
_NPY_HEADER_ALLOWANCE = 4096
# Bytes hashed per step when a cached file is verified, to keep memory flat for large arrays.
_VERIFY_BLOCK_BYTES = 16 << 20


def default_cache_root(home: pathlib.Path | None = None) -> pathlib.Path:
    """Return ``$LASAGNE_ENGINE_DATA_CACHE``, or ``<home>/cache/datasets``.

    ``home`` defaults to ``$LASAGNE_ENGINE_HOME`` or ``~/.lasagne-engine``.
    """
    configured = os.environ.get(CACHE_VARIABLE)
    if configured:
        return pathlib.Path(configured).expanduser().resolve()
    return (home if home is not None else default_home()) / "cache" / "datasets"


class DatasetCache:
    """Loads dataset arrays from local files keyed by sha256, downloading each one once.

    Parameters
    ----------
    root : pathlib.Path, optional
        Folder of the cache; created if missing. Default :func:`default_cache_root`.
    max_bytes : int, optional
        Size the cached files may reach together before the least recently used are removed.
        Default ``$LASAGNE_ENGINE_DATA_CACHE_MAX_BYTES``, or no limit other than free disk space.

    Raises
    ------
    ValueError
        If ``max_bytes`` or the variable is not a positive whole number of bytes.

    Notes
    -----
    Safe to share between processes and threads on one host. The folder must be on a file system
    with working ``flock`` locks and atomic renames, as local file systems have.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, max_bytes: int | None = None):
        self.root = pathlib.Path(root) if root is not None else default_cache_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes if max_bytes is not None else _max_bytes_from_environment()
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"max_bytes {self.max_bytes} must be at least 1, or None for no limit.")

    def __repr__(self) -> str:
        return f"DatasetCache({str(self.root)!r}, max_bytes={self.max_bytes!r})"

    def load(
        self, engine: Any, ref: str, names: Sequence[str] | None = None, *, mmap: bool = True, verify: bool = False
    ) -> dict[str, np.ndarray]:
        """Return the arrays of one dataset version, from the cache or downloaded into it.

        The reference is resolved to a concrete version once, so every array comes from the same
        version even if another one is uploaded meanwhile.

        Parameters
        ----------
        engine : lasagne_engine.client.Engine
            Client of the data service, used to resolve ``ref`` and to download missing arrays.
        ref : str
            ``"name"`` for the latest version or ``"name@3"`` for version 3.
        names : sequence of str, optional
            Arrays to load. Default: every array of the version.
        mmap : bool
            Return read-only memory-mapped arrays, whose pages the kernel reads on first use and
            shares between processes. With False, each array is read into memory. Default True.
        verify : bool
            Hash each cached file again before returning it, at about 1 s per GB, and download it
            again on a mismatch. Files are verified when they enter the cache, so this only
            guards against later damage on disk. Default False.

        Returns
        -------
        dict of str to numpy.ndarray
            The arrays by name, in the order of ``names`` or of the version.

        Raises
        ------
        lasagne_engine.client.NotFoundError
            If the dataset or version does not exist, or has no array of a given name.
        lasagne_engine.client.IntegrityError
            If a downloaded array's bytes have another sha256 than its header records.
        lasagne_engine.client.EngineError
            For any other failure of a call to the data service.
        """
        from lasagne_engine.client import NotFoundError

        version = engine.describe_dataset(ref)
        concrete_ref = f"{version.name}@{version.version}"
        headers = {header.name: header for header in version.arrays}
        names = list(headers) if names is None else list(names)
        missing = [name for name in names if name not in headers]
        if missing:
            raise NotFoundError(
                f"Dataset {concrete_ref!r} has no array named {', '.join(map(repr, missing))}; "
                f"its arrays are {', '.join(map(repr, headers)) or 'none'}."
            )

        keep = frozenset(headers[name].sha256 for name in names)
        return {
            name: self._array(engine, concrete_ref, headers[name], mmap=mmap, verify=verify, keep=keep)
            for name in names
        }

    def path_of(self, sha256: str) -> pathlib.Path:
        """Return where the array with this hex sha256 is cached, whether or not it is there."""
        return self.root / sha256[:2] / f"{sha256}.npy"

    def _array(self, engine: Any, ref: str, header: Any, *, mmap: bool, verify: bool, keep: frozenset) -> np.ndarray:
        dtype = canonical_dtype(header.dtype, array_name=header.name)
        shape = tuple(header.shape)
        path = self.path_of(header.sha256)

        cached = self._open(path, dtype, shape, header.sha256, mmap=mmap, verify=verify)
        if cached is not None:
            return cached

        with self._fill_lock(header.sha256):
            # Another process may have filled the file while this one waited for the lock.
            cached = self._open(path, dtype, shape, header.sha256, mmap=mmap, verify=verify)
            if cached is not None:
                return cached
            if not self._make_room(header.nbytes + _NPY_HEADER_ALLOWANCE, keep=keep):
                logger.warning(
                    "Array %r of dataset %s (%d bytes) does not fit in the cache at %s (limit %s bytes, %d bytes "
                    "free on disk); loading it into memory uncached", header.name, ref, header.nbytes, self.root,
                    self.max_bytes, shutil.disk_usage(self.root).free,
                )
                return engine.download_array(ref, header.name)
            self._fill(engine, ref, header, path, dtype, shape)

        cached = self._open(path, dtype, shape, header.sha256, mmap=mmap, verify=False)
        if cached is None:
            raise RuntimeError(
                f"The cache file {str(path)!r} of array {header.name!r} was removed right after it was filled; "
                "check that nothing else cleans the cache folder while trainers run."
            )
        return cached

    def _open(
        self, path: pathlib.Path, dtype: np.dtype, shape: tuple, sha256: str, *, mmap: bool, verify: bool
    ) -> np.ndarray | None:
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as error:
            logger.warning("Discarding unreadable cache file %s: %s", path, error)
            path.unlink(missing_ok=True)
            return None

        if array.dtype != dtype or array.shape != shape:
            logger.warning(
                "Discarding cache file %s: it contains %s %s where %s %s was expected", path, array.dtype, array.shape,
                dtype, shape,
            )
            path.unlink(missing_ok=True)
            return None
        if verify:
            digest = _sha256_of(array)
            if digest != sha256:
                logger.warning("Discarding cache file %s: its bytes have sha256 %s", path, digest)
                path.unlink(missing_ok=True)
                return None
        with contextlib.suppress(OSError):
            os.utime(path)  # marks the file as used; eviction removes the least recently used first
        return array

    def _make_room(self, needed: int, *, keep: frozenset) -> bool:
        """Remove the least recently used files until ``needed`` bytes fit; return whether they do.

        The limit is :attr:`max_bytes`, if set, and the free space of the cache's file system.
        Files whose sha256 is in ``keep`` stay.
        """
        if self.max_bytes is not None and needed > self.max_bytes:
            return False
        with open(self.root / ".eviction.lock", "a+b") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            files = sorted(self._cached_files(), key=lambda entry: entry[0])
            used = sum(size for _, size, _ in files)
            for _, size, path in files:
                over_limit = self.max_bytes is not None and used + needed > self.max_bytes
                if not over_limit and shutil.disk_usage(self.root).free >= needed:
                    break
                if path.stem in keep:
                    continue
                logger.info("Removing %s (%d bytes) from the dataset cache to make room", path, size)
                path.unlink(missing_ok=True)
                used -= size
            within_limit = self.max_bytes is None or used + needed <= self.max_bytes
            return within_limit and shutil.disk_usage(self.root).free >= needed

    def _cached_files(self) -> Iterator[tuple[int, int, pathlib.Path]]:
        """Yield the last use (ns), size and path of every cached array file."""
        for folder in self.root.iterdir():
            if not folder.is_dir():
                continue
            for path in folder.glob("*.npy"):
                with contextlib.suppress(FileNotFoundError):
                    status = path.stat()
                    yield status.st_mtime_ns, status.st_size, path

    def _fill(self, engine: Any, ref: str, header: Any, path: pathlib.Path, dtype: np.dtype, shape: tuple) -> None:
        temporary = path.with_name(f"{header.sha256}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        logger.info("Caching array %r of dataset %s (%d bytes) in %s", header.name, ref, header.nbytes, path)
        try:
            out = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=shape)
            try:
                engine.download_array(ref, header.name, out=out)
                out.flush()
            finally:
                del out
            with open(temporary, "rb+") as file:
                os.fsync(file.fileno())
            # The rename publishes the file whole, after the client has checked its sha256.
            os.replace(temporary, path)
            fsync_folder(path.parent)
        finally:
            temporary.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _fill_lock(self, sha256: str) -> Iterator[None]:
        folder = self.root / sha256[:2]
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{sha256}.lock", "a+b") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                # Temporary files of this array left by a process that died while filling it.
                for stale in folder.glob(f"{sha256}.*.tmp"):
                    logger.info("Removing %s, left by a process that stopped while filling the cache", stale)
                    stale.unlink(missing_ok=True)
                yield
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _max_bytes_from_environment() -> int | None:
    value = os.environ.get(MAX_BYTES_VARIABLE, "").strip()
    if not value:
        return None
    try:
        max_bytes = int(value)
    except ValueError:
        max_bytes = 0
    if max_bytes < 1:
        raise ValueError(
            f"{MAX_BYTES_VARIABLE}={value!r} is not a positive whole number of bytes; set it to, for example, "
            f"{100 << 30} for 100 GiB, or leave it unset for no limit."
        )
    return max_bytes


def _sha256_of(array: np.ndarray) -> str:
    digest = hashlib.sha256()
    flat = array.reshape(-1).view(np.uint8)
    for offset in range(0, flat.size, _VERIFY_BLOCK_BYTES):
        digest.update(flat[offset : offset + _VERIFY_BLOCK_BYTES].data)
    return digest.hexdigest()
