"""Building and reading the registry's streams and folders in tests."""

import pathlib
import shutil
import sqlite3
import time
from collections.abc import Iterator, Mapping

import numpy as np

from lasagne_engine.arrays import ArrayBuffer, header_for, iter_chunks
from lasagne_engine.v1 import arrays_pb2, model_registry_pb2


def save_frames(
    info: model_registry_pb2.ParameterSetInfo,
    arrays: Mapping[str, np.ndarray],
    *,
    chunk_bytes: int = 1 << 16,
    role: str = "trainable",
) -> Iterator[model_registry_pb2.SaveParameterSetRequest]:
    """Yield the frames of a SaveParameterSet stream: the info, each array's header and chunks, and the end."""
    yield model_registry_pb2.SaveParameterSetRequest(info=info)
    for name, array in arrays.items():
        yield model_registry_pb2.SaveParameterSetRequest(header=header_for(name, array, role=role))
        for chunk in iter_chunks(array, chunk_bytes):
            yield model_registry_pb2.SaveParameterSetRequest(chunk=chunk)
    yield model_registry_pb2.SaveParameterSetRequest(end=arrays_pb2.UploadEnd(array_count=len(arrays)))


def load_arrays(stub, set_id: str, *, chunk_bytes: int = 0, names=()) -> dict[str, np.ndarray]:
    """Load a parameter set's arrays, verifying each against the sha256 in its header."""
    arrays = {}
    buffer = None
    request = model_registry_pb2.LoadParameterSetRequest(id=set_id, names=list(names), chunk_bytes=chunk_bytes)
    for frame in stub.LoadParameterSet(request):
        if frame.WhichOneof("frame") == "header":
            if buffer is not None:
                arrays[buffer.receiver.header.name] = buffer.finish()
            buffer = ArrayBuffer(frame.header)
        else:
            buffer.receiver.add(frame.chunk)
    if buffer is not None:
        arrays[buffer.receiver.header.name] = buffer.finish()
    return arrays


def count_load_chunks(stub, set_id: str, *, chunk_bytes: int) -> int:
    request = model_registry_pb2.LoadParameterSetRequest(id=set_id, chunk_bytes=chunk_bytes)
    return sum(frame.WhichOneof("frame") == "chunk" for frame in stub.LoadParameterSet(request))


def wait_until(condition, *, timeout_s: float = 10.0) -> None:
    """Poll ``condition`` until it returns something true; fail after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"Condition {condition} still false after {timeout_s} s.")
        time.sleep(0.02)


def assert_serving(stub) -> None:
    """Fail unless the server still serves calls after rejecting one."""
    stub.ListModels(model_registry_pb2.ListModelsRequest(), timeout=10)


def copy_registry(source: pathlib.Path, destination: pathlib.Path) -> None:
    """Copy a registry root. SQLite's backup API copies the database whole even while it is open."""
    destination.mkdir(parents=True)
    original = sqlite3.connect(source / "registry.sqlite3")
    copy = sqlite3.connect(destination / "registry.sqlite3")
    try:
        original.backup(copy)
    finally:
        original.close()
        copy.close()
    shutil.copytree(source / "blobs", destination / "blobs")
