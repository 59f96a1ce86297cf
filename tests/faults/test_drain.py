"""SIGTERM drains a service: calls in flight finish within the grace period or are cancelled cleanly."""

import signal
import time

import grpc
import numpy as np
import pytest

from lasagne_engine import rpc
from lasagne_engine.config import StreamLimits
from lasagne_engine.v1 import data_service_pb2, data_service_pb2_grpc, model_registry_pb2, model_registry_pb2_grpc

from .test_kill import blob_files, engine_for, run_in_thread, save_frames, sha256_hex, upload_frames


class SlowStream:
    """Request frames sent ``interval_s`` apart, so that a transfer lasts as long as a test needs."""

    def __init__(self, frames: list, interval_s: float):
        self.frames = frames
        self.interval_s = interval_s
        self.sent = 0

    def __iter__(self):
        for frame in self.frames:
            yield frame
            self.sent += 1
            time.sleep(self.interval_s)


def start_transfer(service, frames: list, interval_s: float):
    """Start an upload (data) or a save (registry) whose frames arrive slowly; return the stream and the outcome."""
    channel = rpc.client_channel(service.address, StreamLimits())
    stream = SlowStream(frames, interval_s)
    if service.role == "data":
        call = data_service_pb2_grpc.DataServiceStub(channel).UploadDataset
    else:
        call = model_registry_pb2_grpc.ModelRegistryStub(channel).SaveParameterSet
    thread, outcome = run_in_thread(lambda: call(iter(stream), timeout=60))
    while stream.sent < 2:
        time.sleep(0.01)
    return channel, thread, outcome


def transfer_frames(role: str, arrays: dict[str, np.ndarray]) -> list:
    return upload_frames("drained", arrays) if role == "data" else save_frames(arrays, session_id="drained")


def stored_names(service) -> list[str]:
    with engine_for(service) as engine:
        if service.role == "data":
            return [dataset.name for dataset in engine.list_datasets()]
        return [parameter_set.session_id for parameter_set in engine.list_parameter_sets()]


def store_earlier(service) -> dict[str, str]:
    """Store one object before the test's transfer and return the sha256 of each of its arrays."""
    arrays = {"x": np.arange(4096, dtype=np.float64)}
    with engine_for(service) as engine:
        if service.role == "data":
            engine.upload_dataset("earlier", arrays)
        else:
            engine.save_parameter_set("digits", arrays, session_id="earlier")
    return {name: sha256_hex(array) for name, array in arrays.items()}


def load_earlier(service) -> dict[str, str]:
    with engine_for(service) as engine:
        if service.role == "data":
            arrays = engine.load_dataset("earlier")
        else:
            (parameter_set,) = engine.list_parameter_sets(session_id="earlier")
            arrays = engine.load_parameter_set(parameter_set.id)
    return {name: sha256_hex(array) for name, array in arrays.items()}


@pytest.mark.parametrize("role", ["data", "registry"])
def test_call_in_flight_finishes_within_grace(start_service, role):
    service = start_service(role, grace_s=8)
    earlier = store_earlier(service)
    arrays = {"x": np.arange(40 * 1024, dtype=np.float32)}
    channel, thread, outcome = start_transfer(service, transfer_frames(role, arrays), interval_s=0.1)

    service.signal(signal.SIGTERM)
    time.sleep(0.3)
    refused_while_draining = not rpc.is_serving(service.address, timeout_s=1)
    thread.join(timeout=30)
    status = service.wait(timeout_s=30)
    channel.close()
    service.start()

    assert "error" not in outcome, outcome.get("error")
    assert refused_while_draining
    assert status == 0
    assert "Received SIGTERM; draining calls in flight for up to 8.0 s" in service.log()
    assert "drained" in stored_names(service)
    assert load_earlier(service) == earlier


@pytest.mark.parametrize("role", ["data", "registry"])
def test_call_past_grace_is_cancelled_cleanly(start_service, role):
    service = start_service(role, grace_s=1)
    earlier = store_earlier(service)
    blobs = service.home / role / "blobs"
    files_before = blob_files(blobs)
    arrays = {"x": np.arange(200 * 1024, dtype=np.float32)}
    channel, thread, outcome = start_transfer(service, transfer_frames(role, arrays), interval_s=0.1)

    started = time.monotonic()
    service.signal(signal.SIGTERM)
    status = service.wait(timeout_s=30)
    stopped_after_s = time.monotonic() - started
    thread.join(timeout=30)
    channel.close()
    files_after_stop = blob_files(blobs)
    service.start()

    assert status == 0
    assert stopped_after_s < 10
    assert isinstance(outcome.get("error"), grpc.RpcError)
    assert outcome["error"].code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    # The cancelled upload removed its own blobs before the process exited.
    assert files_after_stop == files_before
    assert "drained" not in stored_names(service)
    assert load_earlier(service) == earlier


def test_second_sigterm_cancels_at_once(start_service):
    service = start_service("data", grace_s=60)
    arrays = {"x": np.arange(200 * 1024, dtype=np.float32)}
    channel, thread, outcome = start_transfer(service, transfer_frames("data", arrays), interval_s=0.1)

    started = time.monotonic()
    service.signal(signal.SIGTERM)
    time.sleep(0.5)
    service.signal(signal.SIGTERM)
    status = service.wait(timeout_s=30)
    stopped_after_s = time.monotonic() - started
    thread.join(timeout=30)
    channel.close()

    assert status == 0
    assert stopped_after_s < 10
    assert "cancelling the calls still in flight" in service.log()
    assert isinstance(outcome.get("error"), grpc.RpcError)


def test_data_download_in_flight_finishes(start_service):
    service = start_service("data", grace_s=8)
    array = np.random.default_rng(3).standard_normal(1 << 18).astype(np.float32)
    with engine_for(service) as engine:
        version = engine.upload_dataset("served", {"x": array})
    channel = rpc.client_channel(service.address, StreamLimits())
    stub = data_service_pb2_grpc.DataServiceStub(channel)
    request = data_service_pb2.DownloadArrayRequest(ref=f"served@{version.version}", array="x", chunk_bytes=4096)
    frames = stub.DownloadArray(request, timeout=60)
    first = next(frames)

    service.signal(signal.SIGTERM)
    chunks = []
    for frame in frames:
        chunks.append(frame.chunk)
        time.sleep(0.01)
    status = service.wait(timeout_s=30)
    channel.close()

    assert first.header.sha256 == sha256_hex(array)
    assert sha256_hex(np.frombuffer(b"".join(chunks), dtype="<f4")) == sha256_hex(array)
    assert status == 0
