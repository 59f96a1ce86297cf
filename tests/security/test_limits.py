"""Size and stream limits, each rejected with RESOURCE_EXHAUSTED and a message that names the limit."""

import threading

import grpc
import numpy as np
import pytest

from lasagne_engine import rpc
from lasagne_engine.client import Engine, ResourceExhaustedError
from lasagne_engine.config import StreamLimits
from lasagne_engine.v1 import data_service_pb2, model_registry_pb2

from .services import MODEL_NAME, save_frames, start_services, upload_frames

LIMITS = StreamLimits(
    chunk_bytes=4 << 10,
    max_message_bytes=64 << 10,
    max_chunk_bytes=8 << 10,
    max_dataset_bytes=100_000,
    max_parameter_set_bytes=50_000,
    max_streams_per_client=2,
)
# The client may send more than the server accepts, so that the server's limits are what is tested.
CLIENT_LIMITS = StreamLimits(chunk_bytes=4 << 10, max_message_bytes=1 << 20)


@pytest.fixture(scope="module")
def services(tmp_path_factory, registry_template):
    running = start_services(tmp_path_factory.mktemp("limits"), registry_template, LIMITS)
    running.upload_dataset("kept", {"x": np.arange(1000, dtype=np.int64)})
    running.save_parameter_set({"w": np.ones(100, dtype=np.float32)})
    yield running
    running.stop()


@pytest.fixture
def channel(services):
    opened = rpc.client_channel(services.data.address, CLIENT_LIMITS)
    yield opened
    opened.close()


def assert_exhausted(raised, *fragments: str) -> None:
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value.details()
    for fragment in fragments:
        assert fragment in raised.value.details()


def test_message_over_limit(services, channel):
    frames = [
        data_service_pb2.UploadDatasetRequest(info=data_service_pb2.DatasetInfo(name="big")),
        data_service_pb2.UploadDatasetRequest(chunk=b"\0" * (100 << 10)),
    ]
    upload = channel.stream_unary(
        "/lasagne_engine.v1.DataService/UploadDataset",
        request_serializer=data_service_pb2.UploadDatasetRequest.SerializeToString,
        response_deserializer=data_service_pb2.DatasetVersion.FromString,
    )

    with pytest.raises(grpc.RpcError) as raised:
        upload(iter(frames), timeout=10)

    assert_exhausted(raised, str(64 << 10))


def test_chunk_over_limit(services):
    array = np.zeros(4096, dtype=np.int32)

    with pytest.raises(grpc.RpcError) as raised:
        services.data_stub.UploadDataset(upload_frames("chunky", {"x": array}, chunk_bytes=16 << 10), timeout=10)

    assert_exhausted(raised, "A chunk of 16384 bytes", "maximum of 8192 bytes per chunk", "LASAGNE_ENGINE_MAX_CHUNK_BYTES")


def test_dataset_over_limit(services):
    arrays = {"first": np.zeros(7_500, dtype=np.int64), "second": np.zeros(7_500, dtype=np.int64)}

    with pytest.raises(grpc.RpcError) as raised:
        services.data_stub.UploadDataset(upload_frames("huge", arrays), timeout=10)

    assert_exhausted(raised, "Array 'second' of 60000 bytes", "to 120000 bytes", "maximum is 100000 bytes")
    assert "LASAGNE_ENGINE_MAX_DATASET_BYTES" in raised.value.details()
    with pytest.raises(grpc.RpcError) as missing:
        services.data_stub.DescribeDataset(data_service_pb2.DescribeDatasetRequest(ref="huge"), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert not list((services.root / "data" / "blobs").rglob("*huge*"))


def test_declared_size_alone_is_rejected(services):
    # A header may declare far more bytes than will ever be sent; the limit applies at once.
    header_only = [
        data_service_pb2.UploadDatasetRequest(info=data_service_pb2.DatasetInfo(name="claims")),
        data_service_pb2.UploadDatasetRequest(
            header={"name": "x", "dtype": "<f8", "shape": [1 << 40], "nbytes": 8 << 40}
        ),
    ]

    with pytest.raises(grpc.RpcError) as raised:
        services.data_stub.UploadDataset(iter(header_only), timeout=10)

    assert_exhausted(raised, f"Array 'x' of {8 << 40} bytes")


def test_parameter_set_over_limit(services):
    info = model_registry_pb2.ParameterSetInfo(model=MODEL_NAME)
    arrays = {"a": np.zeros(10_000, dtype=np.float32), "b": np.zeros(10_000, dtype=np.float32)}

    with pytest.raises(grpc.RpcError) as raised:
        services.registry_stub.SaveParameterSet(save_frames(info, arrays), timeout=10)

    assert_exhausted(raised, "Array 'b' of 40000 bytes", "to 80000 bytes", "maximum is 50000 bytes")
    assert "LASAGNE_ENGINE_MAX_PARAMETER_SET_BYTES" in raised.value.details()
    listed = services.registry_stub.ListParameterSets(model_registry_pb2.ListParameterSetsRequest(), timeout=10)
    assert [parameter_set.id for parameter_set in listed.parameter_sets] == list(services.parameter_sets)


def test_engine_raises_resource_exhausted(services):
    with Engine(
        registry_address=services.registry.address,
        data_address=services.data.address,
        trainer_address=services.data.address,
        limits=CLIENT_LIMITS,
    ) as engine:
        with pytest.raises(ResourceExhaustedError, match="maximum is 100000 bytes"):
            engine.upload_dataset("through-engine", {"x": np.zeros(20_000, dtype=np.int64)})


class HeldUpload:
    """An upload stream that stays open until released, holding one of its client's streams."""

    def __init__(self, channel: grpc.Channel, name: str):
        self._release = threading.Event()
        stub = channel.stream_unary(
            "/lasagne_engine.v1.DataService/UploadDataset",
            request_serializer=data_service_pb2.UploadDatasetRequest.SerializeToString,
            response_deserializer=data_service_pb2.DatasetVersion.FromString,
        )
        self.future = stub.future(self._frames(name), timeout=30)

    def _frames(self, name: str):
        frames = list(upload_frames(name, {"x": np.arange(10, dtype=np.int16)}))
        yield frames[0]
        self._release.wait(timeout=20)
        yield from frames[1:]

    def finish(self):
        self._release.set()
        return self.future.result(timeout=30)


def wait_for_open_streams(services, count: int) -> None:
    for _ in range(500):
        if services.data.stream_limit.open_streams() >= count:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"The server never had {count} streams open.")


def test_streams_per_client(services, channel):
    held = [HeldUpload(channel, f"held-{index}") for index in range(2)]
    wait_for_open_streams(services, 2)

    third = HeldUpload(channel, "third")
    with pytest.raises(grpc.RpcError) as raised:
        third.finish()

    other_client = rpc.client_channel(services.data.address, CLIENT_LIMITS)
    try:
        # Another connection is another client, with streams of its own.
        elsewhere = HeldUpload(other_client, "elsewhere")
        versions = [upload.finish() for upload in [*held, elsewhere]]
    finally:
        other_client.close()
    again = HeldUpload(channel, "again").finish()

    assert_exhausted(raised, "already has 2 streams open", "LASAGNE_ENGINE_MAX_STREAMS_PER_CLIENT")
    assert sorted(version.name for version in versions) == ["elsewhere", "held-0", "held-1"]
    assert again.name == "again"


def test_limits_leave_earlier_objects_intact(services):
    services.assert_intact()
