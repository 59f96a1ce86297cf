"""The trainer's same-host dataset cache, filled from a real data service."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lasagne_engine.blobstore import LocalBlobStore
from lasagne_engine.client import NotFoundError
from lasagne_engine.datacache import _NPY_HEADER_ALLOWANCE, MAX_BYTES_VARIABLE, DatasetCache, default_cache_root

from .test_services import data_service

ARRAYS = {
    "X": np.random.default_rng(3).standard_normal((300, 17)).astype(np.float32),
    "y": np.arange(300, dtype=np.int64),
    "scalar": np.array(1.25),
    "empty": np.zeros((0, 4), dtype=np.float32),
    "mask": np.array([True, False, True]),
}


@pytest.fixture
def served(blob_store, tmp_path):
    """A data service on ``blob_store`` with dataset 'd' uploaded; yields ``(engine, blob_store)``."""
    with data_service(tmp_path / "data", blob_store) as engine:
        engine.upload_dataset("d", ARRAYS)
        yield engine, blob_store


def cache_files(cache: DatasetCache) -> list[str]:
    return sorted(path.name for path in cache.root.rglob("*") if path.is_file() and path.suffix != ".lock")


def test_load_fills_then_maps(served, tmp_path):
    engine, blob_store = served
    cache = DatasetCache(tmp_path / "cache")

    first = cache.load(engine, "d")
    # With the blobs gone, only the cache can still provide the arrays.
    blob_store.delete_prefix("datasets/")
    second = cache.load(engine, "d@1", ["y", "X"])

    assert list(first) == list(ARRAYS)
    for name, array in ARRAYS.items():
        np.testing.assert_array_equal(first[name], array)
        assert first[name].dtype == array.dtype
        assert isinstance(first[name], np.memmap)
    assert list(second) == ["y", "X"]
    np.testing.assert_array_equal(second["X"], ARRAYS["X"])
    headers = {header.name: header for header in engine.describe_dataset("d@1").arrays}
    assert cache_files(cache) == sorted(f"{headers[name].sha256}.npy" for name in ARRAYS)


def test_load_into_memory(served, tmp_path):
    engine, _ = served

    loaded = DatasetCache(tmp_path / "cache").load(engine, "d", ["X"], mmap=False)

    assert not isinstance(loaded["X"], np.memmap)
    np.testing.assert_array_equal(loaded["X"], ARRAYS["X"])


def test_unknown_array(served, tmp_path):
    engine, _ = served

    with pytest.raises(NotFoundError, match=r"Dataset 'd@1' has no array named 'Z'; its arrays are 'X', 'y'"):
        DatasetCache(tmp_path / "cache").load(engine, "d", ["Z"])


def test_damaged_file_downloaded_again(served, tmp_path):
    engine, _ = served
    cache = DatasetCache(tmp_path / "cache")
    cache.load(engine, "d", ["X"])
    path = cache.path_of(engine.describe_dataset("d").arrays[0].sha256)

    with open(path, "r+b") as file:
        file.seek(-4, os.SEEK_END)
        file.write(b"\xff\xff\xff\xff")
    reloaded = cache.load(engine, "d", ["X"], verify=True)

    np.testing.assert_array_equal(reloaded["X"], ARRAYS["X"])
    path.write_bytes(path.read_bytes()[:-8])
    np.testing.assert_array_equal(cache.load(engine, "d", ["X"])["X"], ARRAYS["X"])


def sha256_by_name(engine) -> dict[str, str]:
    return {header.name: header.sha256 for header in engine.describe_dataset("d").arrays}


def test_evicts_least_recently_used(served, tmp_path):
    engine, _ = served
    digests = sha256_by_name(engine)
    unlimited = DatasetCache(tmp_path / "cache")
    unlimited.load(engine, "d", ["X"])
    unlimited.load(engine, "d", ["y"])
    sizes = {name: unlimited.path_of(digests[name]).stat().st_size for name in ("X", "y")}
    # Room for X and y, but not for the mask as well.
    limit = sizes["X"] + sizes["y"] + ARRAYS["mask"].nbytes + _NPY_HEADER_ALLOWANCE - 1
    cache = DatasetCache(tmp_path / "cache", max_bytes=limit)

    cache.load(engine, "d", ["X"])  # X is now used more recently than y
    loaded = cache.load(engine, "d", ["mask"])

    np.testing.assert_array_equal(loaded["mask"], ARRAYS["mask"])
    assert cache_files(cache) == sorted(f"{digests[name]}.npy" for name in ("X", "mask"))


def test_arrays_of_one_load_are_not_evicted(served, tmp_path):
    engine, _ = served
    digests = sha256_by_name(engine)
    cache = DatasetCache(tmp_path / "cache", max_bytes=ARRAYS["X"].nbytes + _NPY_HEADER_ALLOWANCE + 256)

    loaded = cache.load(engine, "d", ["X", "y"])

    np.testing.assert_array_equal(loaded["X"], ARRAYS["X"])
    np.testing.assert_array_equal(loaded["y"], ARRAYS["y"])
    assert not isinstance(loaded["y"], np.memmap)
    assert cache_files(cache) == [f"{digests['X']}.npy"]


def test_array_larger_than_limit_loads_uncached(served, tmp_path):
    engine, _ = served
    cache = DatasetCache(tmp_path / "cache", max_bytes=1000)

    loaded = cache.load(engine, "d", ["X"])

    np.testing.assert_array_equal(loaded["X"], ARRAYS["X"])
    assert cache_files(cache) == []


def test_limit_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(MAX_BYTES_VARIABLE, str(5 << 30))
    assert DatasetCache(tmp_path / "a").max_bytes == 5 << 30

    monkeypatch.setenv(MAX_BYTES_VARIABLE, "lots")
    with pytest.raises(ValueError, match=rf"{MAX_BYTES_VARIABLE}='lots' is not a positive whole number of bytes"):
        DatasetCache(tmp_path / "b")


def test_processes_fill_once(tmp_path):
    with data_service(tmp_path / "data", LocalBlobStore(tmp_path / "blobs")) as engine:
        engine.upload_dataset("d", ARRAYS)
        outputs, return_codes = _load_in_processes(engine.addresses.data, tmp_path / "cache", count=3)

    assert return_codes == [0, 0, 0]
    assert len(set(outputs)) == 1
    assert float(outputs[0]) == pytest.approx(float(ARRAYS["X"].astype(np.float64).sum()))
    cache = DatasetCache(tmp_path / "cache")
    assert len(cache_files(cache)) == len(ARRAYS)
    assert not list(cache.root.rglob("*.tmp"))


def _load_in_processes(data_address: str, root, *, count: int) -> tuple[list[str], list[int]]:
    """Load dataset 'd' into the cache at ``root`` from ``count`` processes at once."""
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from lasagne_engine.client import Engine
        from lasagne_engine.datacache import DatasetCache

        with Engine(data_address={data_address!r}) as engine:
            arrays = DatasetCache(sys.argv[1]).load(engine, "d")
        print(float(np.asarray(arrays["X"], dtype=np.float64).sum()))
        """
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    return outputs, [process.returncode for process in processes]


def test_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LASAGNE_ENGINE_DATA_CACHE", str(tmp_path / "elsewhere"))

    assert default_cache_root(tmp_path / "home") == tmp_path / "elsewhere"
    monkeypatch.delenv("LASAGNE_ENGINE_DATA_CACHE")
    assert default_cache_root(tmp_path / "home") == tmp_path / "home" / "cache" / "datasets"
