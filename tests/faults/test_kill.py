"""SIGKILL of a service or a client in the middle of a transfer: nothing partial becomes visible,
nothing stored before is damaged, leftover blobs go at the next start, and clients retry."""

import hashlib
import logging
import pathlib
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from lasagne_engine import rpc
from lasagne_engine.arrays import header_for, iter_chunks
from lasagne_engine.client import Engine, UnavailableError
from lasagne_engine.client import engine as engine_module
from lasagne_engine.config import StreamLimits
from lasagne_engine.v1 import arrays_pb2, data_service_pb2, data_service_pb2_grpc, model_registry_pb2, model_registry_pb2_grpc
from tests.security.services import MODEL_NAME

CHUNK_BYTES = 64 << 10


def sha256_hex(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def engine_for(service, **options) -> Engine:
    return Engine(
        registry_address=service.address,
        data_address=service.address,
        trainer_address=service.address,
        limits=StreamLimits(chunk_bytes=CHUNK_BYTES),
        token="",
        **options,
    )


def blob_files(root: pathlib.Path) -> list[str]:
    """Relative paths of every file under a blob folder, including writes in progress."""
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())


class PausedStream:
    """Request frames that stop after ``pause_after`` frames until :meth:`resume`, to hold a transfer midway."""

    def __init__(self, frames: list, pause_after: int):
        self.frames = frames
        self.pause_after = pause_after
        self.paused = threading.Event()
        self._resume = threading.Event()

    def __iter__(self):
        for position, frame in enumerate(self.frames):
            if position == self.pause_after:
                self.paused.set()
                self._resume.wait(timeout=30)
            yield frame

    def resume(self) -> None:
        self._resume.set()


def save_frames(arrays: dict[str, np.ndarray], **info) -> list:
    frames = [model_registry_pb2.SaveParameterSetRequest(info=model_registry_pb2.ParameterSetInfo(model=MODEL_NAME, **info))]
    for name, array in arrays.items():
        frames.append(model_registry_pb2.SaveParameterSetRequest(header=header_for(name, array, role="trainable")))
        frames.extend(model_registry_pb2.SaveParameterSetRequest(chunk=chunk) for chunk in iter_chunks(array, CHUNK_BYTES))
    frames.append(model_registry_pb2.SaveParameterSetRequest(end=arrays_pb2.UploadEnd(array_count=len(arrays))))
    return frames


def upload_frames(name: str, arrays: dict[str, np.ndarray]) -> list:
    frames = [data_service_pb2.UploadDatasetRequest(info=data_service_pb2.DatasetInfo(name=name))]
    for array_name, array in arrays.items():
        frames.append(data_service_pb2.UploadDatasetRequest(header=header_for(array_name, array)))
        frames.extend(data_service_pb2.UploadDatasetRequest(chunk=chunk) for chunk in iter_chunks(array, CHUNK_BYTES))
    frames.append(data_service_pb2.UploadDatasetRequest(end=arrays_pb2.UploadEnd(array_count=len(arrays))))
    return frames


def run_in_thread(function, *arguments) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = function(*arguments)
        except BaseException as error:  # noqa: BLE001 - the test inspects it
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{condition} stayed false for {timeout_s} s.")
        time.sleep(0.02)


def test_registry_killed_mid_upload(start_service, caplog):
    registry = start_service("registry")
    rng = np.random.default_rng(1)
    earlier = {"w": rng.standard_normal((64, 32)).astype(np.float32), "b": rng.standard_normal(32)}
    with engine_for(registry) as engine:
        kept = [engine.save_parameter_set(MODEL_NAME, earlier, epoch=epoch) for epoch in (1, 2)]
    blobs = registry.home / "registry" / "blobs"
    files_before = blob_files(blobs)

    # The first array is stored whole and the second is halfway when the registry dies.
    uploading = {"small": np.ones(1000, dtype=np.float32), "large": rng.standard_normal(1 << 20).astype(np.float32)}
    frames = save_frames(uploading, epoch=3)
    stream = PausedStream(frames, pause_after=len(frames) // 2)
    channel = rpc.client_channel(registry.address, StreamLimits())
    stub = model_registry_pb2_grpc.ModelRegistryStub(channel)
    thread, outcome = run_in_thread(lambda: stub.SaveParameterSet(iter(stream), timeout=30))
    stream.paused.wait(timeout=20)

    def first_stored_second_writing() -> bool:
        # The first array's own write also passes through .incoming, so both conditions are needed.
        new_files = set(blob_files(blobs)) - set(files_before)
        return (any(path.startswith("parameter-sets/") for path in new_files)
                and any(path.startswith(".incoming/") for path in new_files))

    wait_for(first_stored_second_writing)
    leftovers = set(blob_files(blobs)) - set(files_before)
    status = registry.kill()
    stream.resume()
    thread.join(timeout=30)
    channel.close()

    # While the registry is down, a listing waits and retries until it is back.
    with caplog.at_level(logging.WARNING, logger="lasagne_engine.client.retries"):
        with engine_for(registry, max_retries=8) as engine:
            listing, listed = run_in_thread(engine.list_parameter_sets)
            time.sleep(0.5)
            registry.start()
            listing.join(timeout=60)
            loaded = [engine.load_parameter_set(parameter_set.id) for parameter_set in kept]

    assert status == -9
    assert isinstance(outcome.get("error"), grpc.RpcError)
    assert outcome["error"].code() == grpc.StatusCode.UNAVAILABLE
    assert any(path.startswith("parameter-sets/") for path in leftovers), leftovers
    assert [parameter_set.id for parameter_set in listed["value"]] == [parameter_set.id for parameter_set in kept]
    assert "failed with UNAVAILABLE" in caplog.text
    for arrays in loaded:
        assert {name: sha256_hex(array) for name, array in arrays.items()} == {
            name: sha256_hex(array) for name, array in earlier.items()
        }
    # The cleanup at start removed the first array's blob and the second's partial write.
    assert blob_files(blobs) == files_before


def test_data_service_killed_mid_download_resumes(start_service, monkeypatch, caplog):
    data = start_service("data")
    # 64 MiB, more than gRPC's flow control lets the server send ahead of a slow reader.
    array = np.random.default_rng(2).standard_normal(1 << 24).astype(np.float32)
    with engine_for(data) as engine:
        version = engine.upload_dataset("big", {"x": array, "y": np.arange(10)})

    # The client reads slowly, so the data service dies with the download halfway.
    received = []
    add_chunk = engine_module._add_chunk

    def slow_add_chunk(buffer, chunk, *, source):
        received.append(len(chunk))
        time.sleep(0.002)
        add_chunk(buffer, chunk, source=source)

    monkeypatch.setattr(engine_module, "_add_chunk", slow_add_chunk)
    with caplog.at_level(logging.WARNING, logger="lasagne_engine.client.engine"):
        with engine_for(data, max_retries=8) as engine:
            thread, outcome = run_in_thread(engine.download_array, f"big@{version.version}", "x")
            wait_for(lambda: len(received) >= 10)
            data.kill()
            time.sleep(0.5)
            data.start()
            thread.join(timeout=120)

    assert "error" not in outcome, outcome.get("error")
    assert sha256_hex(outcome["value"]) == sha256_hex(array)
    assert "resuming in" in caplog.text
    assert sum(received) > array.nbytes - 10 * CHUNK_BYTES


def test_data_service_killed_mid_upload(start_service):
    data = start_service("data")
    kept = {"x": np.arange(5000, dtype=np.int64), "y": np.linspace(0, 1, 300)}
    with engine_for(data) as engine:
        engine.upload_dataset("kept", kept)
    blobs = data.home / "data" / "blobs"
    files_before = blob_files(blobs)

    frames = upload_frames("partial", {"first": np.ones(1000), "second": np.zeros(1 << 20, dtype=np.float32)})
    stream = PausedStream(frames, pause_after=len(frames) // 2)
    channel = rpc.client_channel(data.address, StreamLimits())
    stub = data_service_pb2_grpc.DataServiceStub(channel)
    thread, outcome = run_in_thread(lambda: stub.UploadDataset(iter(stream), timeout=30))
    stream.paused.wait(timeout=20)
    wait_for(lambda: len(blob_files(blobs)) >= len(files_before) + 2)
    data.kill()
    stream.resume()
    thread.join(timeout=30)
    channel.close()
    data.start()

    with engine_for(data) as engine:
        names = [dataset.name for dataset in engine.list_datasets()]
        reloaded = engine.load_dataset("kept")

    assert outcome["error"].code() == grpc.StatusCode.UNAVAILABLE
    assert names == ["kept"]
    assert {name: sha256_hex(array) for name, array in reloaded.items()} == {
        name: sha256_hex(array) for name, array in kept.items()
    }
    assert blob_files(blobs) == files_before


CLIENT_SCRIPT = """
import sys, numpy as np
from lasagne_engine import rpc
from lasagne_engine.arrays import header_for, iter_chunks
from lasagne_engine.config import StreamLimits
from lasagne_engine.v1 import model_registry_pb2 as pb, model_registry_pb2_grpc as pb_grpc

def frames():
    yield pb.SaveParameterSetRequest(info=pb.ParameterSetInfo(model=sys.argv[2], session_id="killed-client"))
    array = np.ones(1 << 20, dtype=np.float32)
    yield pb.SaveParameterSetRequest(header=header_for("w", array, role="trainable"))
    for index, chunk in enumerate(iter_chunks(array, 1 << 16)):
        if index == 8:
            print("halfway", flush=True)
            sys.stdin.read()  # blocks until the test kills this process
        yield pb.SaveParameterSetRequest(chunk=chunk)

stub = pb_grpc.ModelRegistryStub(rpc.client_channel(sys.argv[1], StreamLimits()))
stub.SaveParameterSet(frames(), timeout=60)
"""


def test_client_killed_mid_save(start_service):
    registry = start_service("registry")
    with engine_for(registry) as engine:
        kept = engine.save_parameter_set(MODEL_NAME, {"w": np.full((3, 3), 7.0)}, session_id="kept")
    blobs = registry.home / "registry" / "blobs"
    files_before = blob_files(blobs)

    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, registry.address, MODEL_NAME],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout.readline().strip() == "halfway"
        wait_for(lambda: any(".incoming" in path for path in blob_files(blobs)))
        client.kill()
        client.wait(timeout=10)
    finally:
        client.stdin.close()
        client.stdout.close()

    # The registry notices the lost connection and discards the upload without a restart.
    wait_for(lambda: blob_files(blobs) == files_before)
    with engine_for(registry) as engine:
        listed = engine.list_parameter_sets()
        loaded = engine.load_parameter_set(kept.id)
        unfinished = engine.list_parameter_sets(session_id="killed-client")

    assert [parameter_set.id for parameter_set in listed] == [kept.id]
    assert unfinished == []
    np.testing.assert_array_equal(loaded["w"], np.full((3, 3), 7.0))
    assert "Discarded parameter set" in registry.log()


def test_unavailable_after_retries(start_service):
    data = start_service("data")
    data.kill()

    with engine_for(data, max_retries=2, timeout_s=10) as engine:
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            engine.list_datasets()
        elapsed_s = time.monotonic() - started

    # Two retries wait 0.125 to 0.25 s and then 0.25 to 0.5 s.
    assert 0.3 < elapsed_s < 5
