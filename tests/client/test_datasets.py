import hashlib
import logging

import grpc
import numpy as np
import pytest

from lasagne_engine.client import engine as engine_module
from lasagne_engine.client import (
    DataLossError,
    IntegrityError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from lasagne_engine.v1 import arrays_pb2, data_service_pb2, data_service_pb2_grpc

from .conftest import CHUNK_BYTES


def c_order_bytes(array: np.ndarray) -> bytes:
    """The bytes the contract sends for an array: C order, little-endian."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def header_of(name: str, array: np.ndarray) -> arrays_pb2.ArrayHeader:
    data = c_order_bytes(array)
    return arrays_pb2.ArrayHeader(
        name=name,
        dtype=array.dtype.newbyteorder("<").str,
        shape=list(array.shape),
        nbytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


class FakeDataService(data_service_pb2_grpc.DataServiceServicer):
    """Stores one dataset, digits@2, and records what the client sends.

    DownloadArray aborts with UNAVAILABLE after ``fail_after_chunks`` chunks, ``failures`` times.
    """

    def __init__(self, arrays=None, *, fail_after_chunks=None, failures=1, wrong_sha256=False):
        self.arrays = arrays or {}
        self.fail_after_chunks = fail_after_chunks
        self.failures_left = failures
        self.wrong_sha256 = wrong_sha256
        self.uploads = []
        self.download_requests = []

    def UploadDataset(self, request_iterator, context):
        frames = []
        for request in request_iterator:
            kind = request.WhichOneof("frame")
            frames.append((kind, getattr(request, kind)))
        self.uploads.append(frames)
        headers = [value for kind, value in frames if kind == "header"]
        return data_service_pb2.DatasetVersion(name=frames[0][1].name, version=1, arrays=headers)

    def DescribeDataset(self, request, context):
        if request.ref not in ("digits", "digits@2"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"No dataset {request.ref!r}; list datasets to see their names.")
        return data_service_pb2.DatasetVersion(
            name="digits", version=2, arrays=[header_of(name, array) for name, array in self.arrays.items()]
        )

    def DownloadArray(self, request, context):
        self.download_requests.append(request)
        array = self.arrays.get(request.array)
        if array is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"No array {request.array!r} in {request.ref!r}.")

        header = header_of(request.array, array)
        if self.wrong_sha256:
            header.sha256 = "0" * 64
        yield arrays_pb2.ArrayFrame(header=header)

        data = c_order_bytes(array)
        for index, offset in enumerate(range(request.start_offset, len(data), request.chunk_bytes)):
            if index == self.fail_after_chunks and self.failures_left > 0:
                self.failures_left -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "The data service is shutting down.")
            yield arrays_pb2.ArrayFrame(chunk=data[offset : offset + request.chunk_bytes])


@pytest.fixture
def start_data_service(serve, connect):
    def start(service):
        return connect(serve((data_service_pb2_grpc.add_DataServiceServicer_to_server, service)))

    return start


def test_upload_sends_info_then_arrays(start_data_service):
    service = FakeDataService()
    engine = start_data_service(service)
    X = np.arange(13 * 7, dtype=np.float64).reshape(7, 13).T  # not C-contiguous
    y = np.arange(50, dtype=">i4")  # big-endian

    version = engine.upload_dataset("digits", {"X": X, "y": y}, description="8x8 digits")

    assert version.version == 1
    frames = service.uploads[0]
    assert frames[0] == ("info", data_service_pb2.DatasetInfo(name="digits", description="8x8 digits"))
    kinds = [kind for kind, _ in frames]
    x_chunks = -(-X.nbytes // CHUNK_BYTES)
    y_chunks = -(-y.nbytes // CHUNK_BYTES)
    assert kinds == ["info", "header", *["chunk"] * x_chunks, "header", *["chunk"] * y_chunks, "end"]
    assert frames[-1][1].array_count == 2

    x_header = frames[1][1]
    y_header = frames[2 + x_chunks][1]
    assert x_header == header_of("X", X)
    assert y_header == header_of("y", y)
    assert y_header.dtype == "<i4"

    x_data = [value for _, value in frames[2 : 2 + x_chunks]]
    y_data = [value for _, value in frames[3 + x_chunks : -1]]
    assert all(len(chunk) <= CHUNK_BYTES for chunk in x_data + y_data)
    assert b"".join(x_data) == c_order_bytes(X)
    assert b"".join(y_data) == c_order_bytes(y)


def test_upload_rejects_object_array_before_sending(start_data_service):
    service = FakeDataService()
    engine = start_data_service(service)

    with pytest.raises(InvalidArgumentError, match=r"Unsupported dtype '\|O' of array 'labels'") as raised:
        engine.upload_dataset("digits", {"labels": np.array(["a", None], dtype=object)})

    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert service.uploads == []


def test_upload_rejects_bad_array_name(start_data_service):
    service = FakeDataService()
    engine = start_data_service(service)

    with pytest.raises(InvalidArgumentError, match=r"Invalid array name 'X/train'"):
        engine.upload_dataset("digits", {"X/train": np.zeros(3)})

    assert service.uploads == []


def test_upload_raises_request_stream_error(start_data_service, monkeypatch):
    def fail(array, chunk_bytes):
        raise OSError("The array's memory map is no longer readable.")

    monkeypatch.setattr(engine_module, "_chunk_views", fail)
    engine = start_data_service(FakeDataService())

    with pytest.raises(OSError, match="The array's memory map is no longer readable."):
        engine.upload_dataset("digits", {"X": np.zeros(3)})


def test_download_resumes_after_unavailable(start_data_service, caplog):
    X = np.random.default_rng(0).standard_normal((25, 10)).astype(np.float32)
    service = FakeDataService({"X": X}, fail_after_chunks=10)
    engine = start_data_service(service)

    with caplog.at_level(logging.WARNING, logger="lasagne_engine.client.engine"):
        result = engine.download_array("digits@2", "X")

    assert result.dtype == np.dtype("<f4")
    assert result.shape == (25, 10)
    assert result.tobytes() == X.tobytes()
    assert [request.start_offset for request in service.download_requests] == [0, 10 * CHUNK_BYTES]
    assert all(request.chunk_bytes == CHUNK_BYTES for request in service.download_requests)
    assert len(caplog.records) == 1
    assert "after 640 bytes" in caplog.records[0].getMessage()
    assert "retry 1 of 5" in caplog.records[0].getMessage()


def test_download_writes_into_out(start_data_service):
    X = np.arange(300, dtype=np.int64).reshape(30, 10)
    engine = start_data_service(FakeDataService({"X": X}))
    out = np.zeros((30, 10), dtype=np.int64)

    result = engine.download_array("digits@2", "X", out=out)

    assert result is out
    np.testing.assert_array_equal(out, X)


def test_download_rejects_mismatched_out(start_data_service):
    engine = start_data_service(FakeDataService({"X": np.zeros((4, 4), dtype=np.float32)}))

    with pytest.raises(ValueError, match=r"shape \(4, 4\) and dtype <f4"):
        engine.download_array("digits@2", "X", out=np.zeros((4, 4), dtype=np.float64))


def test_download_gives_up_after_five_retries(start_data_service):
    X = np.arange(100, dtype=np.float64)
    service = FakeDataService({"X": X}, fail_after_chunks=1, failures=10)
    engine = start_data_service(service)

    with pytest.raises(UnavailableError, match="The data service is shutting down.") as raised:
        engine.download_array("digits@2", "X")

    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    offsets = [request.start_offset for request in service.download_requests]
    assert offsets == [retry * CHUNK_BYTES for retry in range(6)]


def test_download_wrong_sha256_raises_integrity_error(start_data_service):
    X = np.arange(100, dtype=np.float32)
    engine = start_data_service(FakeDataService({"X": X}, wrong_sha256=True))
    actual = hashlib.sha256(X.tobytes()).hexdigest()

    with pytest.raises(IntegrityError, match=f"array 'X' of dataset 'digits@2' has sha256 {actual}") as raised:
        engine.download_array("digits@2", "X")

    assert raised.value.expected_sha256 == "0" * 64
    assert raised.value.actual_sha256 == actual
    assert f"header recorded {'0' * 64}" in str(raised.value)


def test_download_short_stream_raises_data_loss(start_data_service):
    class ShortDataService(FakeDataService):
        def DownloadArray(self, request, context):
            yield arrays_pb2.ArrayFrame(header=header_of("X", np.zeros(100)))
            yield arrays_pb2.ArrayFrame(chunk=bytes(CHUNK_BYTES))

    engine = start_data_service(ShortDataService())

    with pytest.raises(DataLossError, match=r"Array 'X' ended after 64 of its declared 800 bytes"):
        engine.download_array("digits@2", "X")


def test_describe_not_found_maps_status(start_data_service):
    engine = start_data_service(FakeDataService())

    with pytest.raises(NotFoundError) as raised:
        engine.describe_dataset("digts")

    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert raised.value.details == "No dataset 'digts'; list datasets to see their names."
    assert str(raised.value) == raised.value.details


def test_load_dataset_downloads_one_version(start_data_service):
    arrays = {"X_train": np.ones((20, 8), dtype=np.float32), "y_train": np.arange(20, dtype=np.int32)}
    service = FakeDataService(arrays)
    engine = start_data_service(service)

    loaded = engine.load_dataset("digits")

    assert list(loaded) == ["X_train", "y_train"]
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)
    assert [request.ref for request in service.download_requests] == ["digits@2", "digits@2"]


def test_load_dataset_unknown_array(start_data_service):
    service = FakeDataService({"X_train": np.ones(3)})
    engine = start_data_service(service)

    with pytest.raises(NotFoundError, match=r"Dataset 'digits@2' has no array named 'X_val'; its arrays are 'X_train'"):
        engine.load_dataset("digits", names=["X_train", "X_val"])

    assert service.download_requests == []
