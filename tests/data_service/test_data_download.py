import grpc
import numpy as np
import pytest
from data_service_harness import assert_rejected, download, serve, sha256_hex, upload

from lasagne_engine.config import StreamLimits
from lasagne_engine.v1 import data_service_pb2

VALUES = np.arange(250, dtype=np.float32).reshape(10, 25)


def array_file(service, dataset: str, array: str):
    (path,) = (service.blob_root / "datasets" / dataset).glob(f"*/{array}")
    return path


class TestResume:
    @pytest.mark.parametrize("start_offset", [1, 7, 400, 999])
    def test_start_offset_gives_tail(self, data_service, start_offset):
        upload(data_service, "d", {"values": VALUES})

        header, chunks = download(data_service, "d", "values", start_offset=start_offset, chunk_bytes=64)

        assert header.nbytes == VALUES.nbytes
        assert header.sha256 == sha256_hex(VALUES)
        assert b"".join(chunks) == VALUES.tobytes()[start_offset:]
        assert all(len(chunk) == 64 for chunk in chunks[:-1])

    def test_start_offset_at_end_sends_header_only(self, data_service):
        upload(data_service, "d", {"values": VALUES})

        header, chunks = download(data_service, "d", "values", start_offset=VALUES.nbytes)

        assert header.name == "values"
        assert header.sha256 == sha256_hex(VALUES)
        assert chunks == []

    @pytest.mark.parametrize("start_offset", [-1, VALUES.nbytes + 1])
    def test_start_offset_out_of_range(self, data_service, start_offset):
        upload(data_service, "d", {"values": VALUES})

        with pytest.raises(grpc.RpcError) as error_info:
            download(data_service, "d", "values", start_offset=start_offset)

        assert_rejected(
            error_info, grpc.StatusCode.INVALID_ARGUMENT, f"start_offset {start_offset}", f"{VALUES.nbytes} bytes"
        )
        data_service.assert_serving()


class TestCancel:
    def test_cancelled_download(self, data_service):
        upload(data_service, "d", {"values": VALUES})
        request = data_service_pb2.DownloadArrayRequest(ref="d", array="values", chunk_bytes=8)

        call = data_service.stub.DownloadArray(request)
        first_frames = [next(call), next(call)]
        call.cancel()

        assert first_frames[0].header.name == "values"
        assert first_frames[1].chunk == VALUES.tobytes()[:8]
        with pytest.raises(grpc.RpcError) as error_info:
            next(call)
        assert error_info.value.code() == grpc.StatusCode.CANCELLED
        data_service.assert_serving()
        _, chunks = download(data_service, "d", "values")
        assert b"".join(chunks) == VALUES.tobytes()


class TestChunkSize:
    def test_default_chunk_size(self, tmp_path):
        limits = StreamLimits(chunk_bytes=128, max_message_bytes=64 << 10)

        with serve(tmp_path, limits=limits) as service:
            upload(service, "d", {"values": VALUES})
            _, chunks = download(service, "d", "values", chunk_bytes=0)

        assert [len(chunk) for chunk in chunks] == [128] * 7 + [VALUES.nbytes - 7 * 128]

    def test_chunk_size_capped_below_message_limit(self, tmp_path):
        limits = StreamLimits(chunk_bytes=128, max_message_bytes=1024 + 300)
        values = np.arange(1000, dtype=np.uint8)

        with serve(tmp_path, limits=limits) as service:
            upload(service, "d", {"values": values}, chunk_bytes=200)
            _, chunks = download(service, "d", "values", chunk_bytes=10_000)

        assert [len(chunk) for chunk in chunks] == [300, 300, 300, 100]
        assert b"".join(chunks) == values.tobytes()

    def test_negative_chunk_size(self, data_service):
        upload(data_service, "d", {"values": VALUES})

        with pytest.raises(grpc.RpcError) as error_info:
            download(data_service, "d", "values", chunk_bytes=-5)

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, "chunk_bytes -5")
        data_service.assert_serving()


class TestLookup:
    def test_unknown_array_lists_arrays(self, data_service):
        upload(data_service, "d", {"inputs": VALUES, "labels": np.arange(10)})

        with pytest.raises(grpc.RpcError) as error_info:
            download(data_service, "d", "targets")

        assert_rejected(error_info, grpc.StatusCode.NOT_FOUND, "'d@1'", "'targets'", "'inputs', 'labels'")
        data_service.assert_serving()

    def test_unknown_dataset(self, data_service):
        with pytest.raises(grpc.RpcError) as error_info:
            download(data_service, "missing", "x")

        assert_rejected(error_info, grpc.StatusCode.NOT_FOUND, "'missing'", "lasagne-engine datasets")
        data_service.assert_serving()

    def test_bad_array_name(self, data_service):
        upload(data_service, "d", {"values": VALUES})

        with pytest.raises(grpc.RpcError) as error_info:
            download(data_service, "d", "../d")

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, "Invalid array name '../d'")
        data_service.assert_serving()


class TestCorruption:
    def test_flipped_byte_ends_with_data_loss(self, data_service):
        upload(data_service, "d", {"values": VALUES})
        path = array_file(data_service, "d", "values")
        corrupted = bytearray(path.read_bytes())
        corrupted[123] ^= 0xFF
        path.write_bytes(bytes(corrupted))
        request = data_service_pb2.DownloadArrayRequest(ref="d", array="values", chunk_bytes=100)

        frames = []
        with pytest.raises(grpc.RpcError) as error_info:
            for frame in data_service.stub.DownloadArray(request):
                frames.append(frame)

        assert_rejected(
            error_info,
            grpc.StatusCode.DATA_LOSS,
            "Array 'values' of dataset 'd@1'",
            sha256_hex(VALUES),
            sha256_hex(np.frombuffer(bytes(corrupted), dtype=np.uint8)),
        )
        # The digest is known only after the last byte, so every chunk was sent before the error.
        assert b"".join(frame.chunk for frame in frames[1:]) == bytes(corrupted)
        data_service.assert_serving()

    def test_truncated_blob_ends_with_data_loss(self, data_service):
        upload(data_service, "d", {"values": VALUES})
        path = array_file(data_service, "d", "values")
        path.write_bytes(path.read_bytes()[:-10])

        with pytest.raises(grpc.RpcError) as error_info:
            download(data_service, "d", "values", start_offset=100)

        assert_rejected(
            error_info, grpc.StatusCode.DATA_LOSS, "'values'", f"has {VALUES.nbytes - 10} bytes", f"{VALUES.nbytes}"
        )
        data_service.assert_serving()

    def test_missing_blob_ends_with_data_loss(self, data_service):
        upload(data_service, "d", {"values": VALUES})
        array_file(data_service, "d", "values").unlink()

        with pytest.raises(grpc.RpcError) as error_info:
            download(data_service, "d", "values")

        assert_rejected(error_info, grpc.StatusCode.DATA_LOSS, "'values'", "is missing")
        data_service.assert_serving()
