import math
import threading

import grpc
import numpy as np
import pytest
from data_service_harness import (
    assert_rejected,
    chunk_frame,
    download,
    end_frame,
    header_frame,
    header_of,
    info_frame,
    serve,
    sha256_hex,
    split_bytes,
    upload,
    upload_frames,
    wait_until,
)

from lasagne_engine.blobstore import BlobWriter, LocalBlobStore
from lasagne_engine.v1 import data_service_pb2

ROUNDTRIP_ARRAYS = {
    "float32": np.linspace(-3.0, 3.0, 37, dtype=np.float32),
    "int64": np.arange(-17, 18, dtype=np.int64).reshape(5, 7) * (2**40),
    "bool": np.array([True, False, False, True, True, False, True, True, False, False, True, False, True]),
    "cube": np.random.default_rng(7).standard_normal((2, 3, 4)),
    "scalar": np.array(2.5, dtype=np.float64),
    "empty": np.zeros((0,), dtype=np.float32),
    "empty-3d": np.zeros((3, 0, 2), dtype=np.int16),
}


def assert_nothing_stored(service, name: str) -> None:
    with pytest.raises(grpc.RpcError) as error_info:
        service.stub.ListDatasets(data_service_pb2.ListDatasetsRequest(name=name))
    assert error_info.value.code() == grpc.StatusCode.NOT_FOUND
    assert wait_until(lambda: not service.dataset_files()), service.dataset_files()
    assert wait_until(lambda: not service.partial_files()), service.partial_files()
    service.assert_serving()


class TestRoundtrip:
    def test_upload_returns_version(self, data_service):
        reply = upload(data_service, "mixed", ROUNDTRIP_ARRAYS, chunk_bytes=5, description="seven arrays")

        assert reply.name == "mixed"
        assert reply.version == 1
        assert reply.description == "seven arrays"
        assert reply.total_bytes == sum(array.nbytes for array in ROUNDTRIP_ARRAYS.values())
        assert reply.created_at.seconds > 0
        assert [header.name for header in reply.arrays] == list(ROUNDTRIP_ARRAYS)
        for header, array in zip(reply.arrays, ROUNDTRIP_ARRAYS.values(), strict=True):
            assert header.dtype == array.dtype.str
            assert tuple(header.shape) == array.shape
            assert header.nbytes == array.nbytes
            assert header.sha256 == sha256_hex(array)

    def test_upload_without_sha256_computes_it(self, data_service):
        reply = upload(data_service, "mixed", ROUNDTRIP_ARRAYS, chunk_bytes=5, with_sha256=False)

        for header, array in zip(reply.arrays, ROUNDTRIP_ARRAYS.values(), strict=True):
            assert header.sha256 == sha256_hex(array)

    def test_describe_matches_upload(self, data_service):
        uploaded = upload(data_service, "mixed", ROUNDTRIP_ARRAYS, chunk_bytes=5, description="seven arrays")

        described = data_service.stub.DescribeDataset(data_service_pb2.DescribeDatasetRequest(ref="mixed@1"))

        assert described == uploaded

    @pytest.mark.parametrize("array_name", list(ROUNDTRIP_ARRAYS))
    def test_download_in_small_chunks(self, data_service, array_name):
        expected = ROUNDTRIP_ARRAYS[array_name]
        upload(data_service, "mixed", ROUNDTRIP_ARRAYS, chunk_bytes=5)

        header, chunks = download(data_service, "mixed", array_name, chunk_bytes=3)

        assert header.name == array_name
        assert header.dtype == expected.dtype.str
        assert tuple(header.shape) == expected.shape
        assert header.nbytes == expected.nbytes
        assert header.sha256 == sha256_hex(expected)
        assert len(chunks) == math.ceil(expected.nbytes / 3)
        assert all(len(chunk) == 3 for chunk in chunks[:-1])
        received = np.frombuffer(b"".join(chunks), dtype=np.dtype(header.dtype)).reshape(tuple(header.shape))
        np.testing.assert_array_equal(received, expected)


class TestVersions:
    def test_versions_count_up(self, data_service):
        first = upload(data_service, "weights", {"w": np.ones(4, dtype=np.float32)})
        second = upload(data_service, "weights", {"w": np.full(4, 2.0, dtype=np.float32)})

        assert first.version == 1
        assert second.version == 2

    def test_name_means_latest(self, data_service):
        upload(data_service, "weights", {"w": np.ones(4, dtype=np.float32)})
        upload(data_service, "weights", {"w": np.full(4, 2.0, dtype=np.float32)})

        latest = data_service.stub.DescribeDataset(data_service_pb2.DescribeDatasetRequest(ref="weights"))
        first = data_service.stub.DescribeDataset(data_service_pb2.DescribeDatasetRequest(ref="weights@1"))
        _, chunks = download(data_service, "weights", "w")

        assert latest.version == 2
        assert first.version == 1
        np.testing.assert_array_equal(np.frombuffer(b"".join(chunks), dtype="<f4"), np.full(4, 2.0))

    def test_concurrent_uploads_get_distinct_versions(self, data_service):
        count = 20
        arrays = [np.full(1000, index, dtype=np.int32) for index in range(count)]
        versions: dict[int, int] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(count)

        def upload_one(index: int) -> None:
            try:
                start.wait(timeout=10)
                versions[index] = upload(data_service, "shared", {"x": arrays[index]}, chunk_bytes=512).version
            except BaseException as error:  # noqa: BLE001 - reported by the assert below
                errors.append(error)

        threads = [threading.Thread(target=upload_one, args=(index,)) for index in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        assert errors == []
        assert sorted(versions.values()) == list(range(1, count + 1))
        # Each version contains the bytes of the upload it was returned to.
        for index, version in versions.items():
            _, chunks = download(data_service, f"shared@{version}", "x")
            np.testing.assert_array_equal(np.frombuffer(b"".join(chunks), dtype="<i4"), arrays[index])


class TestRejectedUploads:
    @pytest.mark.parametrize(
        ("name", "fragment"),
        [
            ("a/b", "Invalid dataset name 'a/b'"),
            ("..", "Invalid dataset name '..'"),
            ("", "The dataset name is empty"),
            ("x" * 200, "has 200 characters"),
            ("na me", "Invalid dataset name 'na me'"),
        ],
        ids=["slash", "dot-dot", "empty", "too-long", "space"],
    )
    def test_bad_name(self, data_service, name, fragment):
        with pytest.raises(grpc.RpcError) as error_info:
            upload(data_service, name, {"x": np.ones(3)})

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, fragment)
        assert data_service.stub.ListDatasets(data_service_pb2.ListDatasetsRequest()).datasets == []
        assert data_service.dataset_files() == []
        data_service.assert_serving()

    def test_bad_array_name(self, data_service):
        with pytest.raises(grpc.RpcError) as error_info:
            upload(data_service, "d", {"../escape": np.ones(3)})

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, "Invalid array name '../escape'")
        assert_nothing_stored(data_service, "d")

    @pytest.mark.parametrize(
        ("delta", "fragment"),
        [(-4, "ended after 36 of its declared 40 bytes"), (4, "more than its declared 40 bytes")],
        ids=["too-few", "too-many"],
    )
    def test_byte_count_differs_from_shape(self, data_service, delta, fragment):
        array = np.arange(10, dtype=np.float32)
        data = array.tobytes() + b"\0" * max(delta, 0)
        data = data[: len(data) + min(delta, 0)]
        frames = [
            info_frame("d"),
            header_frame(header_of("first", np.ones(2))),
            *(chunk_frame(chunk) for chunk in split_bytes(np.ones(2).tobytes(), 5)),
            header_frame(header_of("values", array)),
            *(chunk_frame(chunk) for chunk in split_bytes(data, 6)),
        ]

        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.UploadDataset(iter(frames))

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, "Array 'values'", fragment)
        assert_nothing_stored(data_service, "d")

    def test_too_few_bytes_before_next_header(self, data_service):
        frames = [
            info_frame("d"),
            header_frame(header_of("short", np.ones(4))),
            chunk_frame(np.ones(3).tobytes()),
            header_frame(header_of("next", np.ones(2))),
            chunk_frame(np.ones(2).tobytes()),
        ]

        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.UploadDataset(iter(frames))

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, "Array 'short' ended after 24 of its declared 32")
        assert_nothing_stored(data_service, "d")

    def test_sha256_mismatch(self, data_service):
        array = np.arange(8, dtype=np.int64)
        claimed = sha256_hex(np.zeros(8, dtype=np.int64))
        frames = [
            info_frame("d"),
            header_frame(header_of("values", array, sha256=claimed)),
            chunk_frame(array.tobytes()),
        ]

        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.UploadDataset(iter(frames))

        assert_rejected(
            error_info, grpc.StatusCode.INVALID_ARGUMENT, "Array 'values'", sha256_hex(array), claimed
        )
        assert_nothing_stored(data_service, "d")

    def test_empty_dataset(self, data_service):
        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.UploadDataset(iter([info_frame("d"), end_frame(0)]))

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, "empty dataset", "'d'")
        assert_nothing_stored(data_service, "d")

    def test_missing_end_frame(self, data_service):
        frames = upload_frames("d", {"x": np.ones(2), "y": np.zeros(3)})[:-1]

        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.UploadDataset(iter(frames))

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, "after 2 arrays without an end frame", "'d'")
        assert_nothing_stored(data_service, "d")

    def test_end_frame_with_wrong_count(self, data_service):
        frames = [*upload_frames("d", {"x": np.ones(2)})[:-1], end_frame(2)]

        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.UploadDataset(iter(frames))

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, "declares 2 arrays in its end frame but sent 1")
        assert_nothing_stored(data_service, "d")

    def test_frame_after_end(self, data_service):
        frames = [*upload_frames("d", {"x": np.ones(2)}), chunk_frame(b"\0" * 8)]

        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.UploadDataset(iter(frames))

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, "'chunk' frame after its end frame")
        assert_nothing_stored(data_service, "d")

    def test_no_frames(self, data_service):
        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.UploadDataset(iter([]))

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, "received no frame first", "'info'")
        data_service.assert_serving()

    def test_header_before_info(self, data_service):
        array = np.ones(2)

        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.UploadDataset(iter([header_frame(header_of("x", array)), chunk_frame(array.tobytes())]))

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, "received a 'header' frame first")
        data_service.assert_serving()

    def test_second_info(self, data_service):
        frames = [*upload_frames("d", {"x": np.ones(2)})[:-1], info_frame("other")]

        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.UploadDataset(iter(frames))

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, "second 'info' frame")
        assert_nothing_stored(data_service, "d")

    def test_chunk_before_header(self, data_service):
        frames = [info_frame("d"), chunk_frame(b"\0" * 8), *upload_frames("d", {"x": np.ones(1)})[1:]]

        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.UploadDataset(iter(frames))

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, "chunk before any array header")
        assert_nothing_stored(data_service, "d")

    @pytest.mark.parametrize("dtype", ["O", "U4", "V8", "float128x"])
    def test_unsupported_dtype(self, data_service, dtype):
        frames = [info_frame("d"), header_frame(header_of("x", np.ones(1), dtype=dtype))]

        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.UploadDataset(iter(frames))

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, f"dtype {dtype!r} of array 'x'")
        assert_nothing_stored(data_service, "d")

    def test_big_endian_dtype(self, data_service):
        array = np.arange(3, dtype=">f8")

        with pytest.raises(grpc.RpcError) as error_info:
            upload(data_service, "d", {"x": array})

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, "big-endian dtype '>f8'", "'<f8'")
        assert_nothing_stored(data_service, "d")

    def test_duplicate_array_name(self, data_service):
        frames = upload_frames("d", {"x": np.ones(2)})[:-1]
        frames += upload_frames("d", {"x": np.zeros(2)})[1:]

        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.UploadDataset(iter(frames))

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, "already has an array named 'x'")
        assert_nothing_stored(data_service, "d")

    def test_role_on_dataset_array(self, data_service):
        array = np.ones(2)
        frames = [info_frame("d"), header_frame(header_of("x", array, role="trainable")), chunk_frame(array.tobytes())]

        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.UploadDataset(iter(frames))

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, "role 'trainable'")
        assert_nothing_stored(data_service, "d")

    def test_rejected_upload_keeps_earlier_versions(self, data_service):
        upload(data_service, "d", {"x": np.ones(2)})

        with pytest.raises(grpc.RpcError):
            data_service.stub.UploadDataset(iter([info_frame("d")]))

        listed = data_service.stub.ListDatasets(data_service_pb2.ListDatasetsRequest(name="d")).datasets
        assert [dataset.version for dataset in listed] == [1]
        assert len(data_service.dataset_files()) == 1


class TestInterruptedUploads:
    def test_client_failure_midway(self, data_service):
        first = np.arange(1000, dtype=np.float64)
        second = np.arange(500, dtype=np.int32)
        blob_written = []

        def frames():
            yield info_frame("d")
            yield header_frame(header_of("first", first))
            yield from (chunk_frame(chunk) for chunk in split_bytes(first.tobytes(), 1000))
            yield header_frame(header_of("second", second))
            yield chunk_frame(second.tobytes()[:100])
            # The server commits the first blob when the second header arrives. Waiting for it
            # leaves the failure something on disk to clean up.
            blob_written.append(wait_until(lambda: len(data_service.dataset_files()) == 1))
            raise RuntimeError("client failed midway")

        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.UploadDataset(frames())

        assert blob_written == [True]
        assert error_info.value.code() == grpc.StatusCode.UNKNOWN
        assert_nothing_stored(data_service, "d")

    def test_blob_store_failure_midway(self, tmp_path):
        blob_store = FailingBlobStore(tmp_path / "blobs", failing_array="second")

        with serve(tmp_path, blob_store=blob_store) as service:
            with pytest.raises(grpc.RpcError) as error_info:
                upload(service, "d", {"first": np.ones(100), "second": np.ones(100), "third": np.ones(1)})

            assert_rejected(error_info, grpc.StatusCode.INTERNAL, "OSError", "disk full")
            assert_nothing_stored(service, "d")


class FailingBlobStore(LocalBlobStore):
    """A local blob store whose commit of one array's blob fails, as a full disk would."""

    def __init__(self, root, *, failing_array: str):
        super().__init__(root)
        self.failing_array = failing_array

    def writer(self, key: str) -> BlobWriter:
        writer = super().writer(key)
        if key.endswith(f"/{self.failing_array}"):
            writer.commit = self._fail
        return writer

    @staticmethod
    def _fail() -> None:
        raise OSError(28, "No space left on device (simulated disk full)")
