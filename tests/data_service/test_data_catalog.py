import contextlib
import sqlite3
import threading

import grpc
import numpy as np
import pytest
from data_service_harness import assert_rejected, download, header_of, serve, upload

from lasagne_engine.blobstore.ownership import OWNER_MARKER_NAME
from lasagne_engine.data_service import DatasetStore
from lasagne_engine.errors import NotFound
from lasagne_engine.v1 import data_service_pb2


def list_datasets(service, name: str = "") -> list[tuple[str, int]]:
    reply = service.stub.ListDatasets(data_service_pb2.ListDatasetsRequest(name=name))
    return [(dataset.name, dataset.version) for dataset in reply.datasets]


class TestList:
    def test_empty_store(self, data_service):
        assert list_datasets(data_service) == []

    def test_latest_of_each_sorted(self, data_service):
        for name in ["zeta", "alpha", "mnist", "alpha", "zeta", "zeta"]:
            upload(data_service, name, {"x": np.ones(2)})

        assert list_datasets(data_service) == [("alpha", 2), ("mnist", 1), ("zeta", 3)]

    def test_versions_of_one_ascending(self, data_service):
        for _ in range(3):
            upload(data_service, "mnist", {"x": np.ones(2)})
        upload(data_service, "other", {"x": np.ones(2)})

        assert list_datasets(data_service, "mnist") == [("mnist", 1), ("mnist", 2), ("mnist", 3)]

    def test_listed_versions_carry_arrays(self, data_service):
        upload(data_service, "d", {"a": np.ones(3, dtype=np.float32), "b": np.arange(4)}, description="two")

        (listed,) = data_service.stub.ListDatasets(data_service_pb2.ListDatasetsRequest()).datasets

        assert listed.description == "two"
        assert [array.name for array in listed.arrays] == ["a", "b"]
        assert listed.total_bytes == 12 + 32

    def test_unknown_name(self, data_service):
        upload(data_service, "mnist", {"x": np.ones(2)})

        with pytest.raises(grpc.RpcError) as error_info:
            list_datasets(data_service, "mnst")

        assert_rejected(
            error_info, grpc.StatusCode.NOT_FOUND, "'mnst'", "Did you mean 'mnist'?", "'lasagne-engine datasets'"
        )
        data_service.assert_serving()

    def test_bad_name(self, data_service):
        with pytest.raises(grpc.RpcError) as error_info:
            list_datasets(data_service, "a/b")

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, "'a/b'")


class TestDescribe:
    def test_unknown_dataset(self, data_service):
        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.DescribeDataset(data_service_pb2.DescribeDatasetRequest(ref="missing@2"))

        assert_rejected(error_info, grpc.StatusCode.NOT_FOUND, "'missing@2'", "'lasagne-engine datasets'")
        data_service.assert_serving()

    def test_unknown_version_lists_versions(self, data_service):
        upload(data_service, "d", {"x": np.ones(2)})
        upload(data_service, "d", {"x": np.ones(2)})

        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.DescribeDataset(data_service_pb2.DescribeDatasetRequest(ref="d@3"))

        assert_rejected(error_info, grpc.StatusCode.NOT_FOUND, "'d@3'", "versions 1, 2", "'lasagne-engine datasets'")
        data_service.assert_serving()

    @pytest.mark.parametrize(
        ("ref", "fragment"),
        [("d@0", "positive integer"), ("d@x", "positive integer"), ("", "name is empty"), ("a b@1", "'a b'")],
    )
    def test_bad_ref(self, data_service, ref, fragment):
        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.DescribeDataset(data_service_pb2.DescribeDatasetRequest(ref=ref))

        assert_rejected(error_info, grpc.StatusCode.INVALID_ARGUMENT, fragment)
        data_service.assert_serving()


class TestDelete:
    def test_one_version(self, data_service):
        for value in range(3):
            upload(data_service, "d", {"x": np.full(2, value)})

        reply = data_service.stub.DeleteDataset(data_service_pb2.DeleteDatasetRequest(ref="d@2"))

        assert list(reply.deleted_versions) == [2]
        assert list_datasets(data_service, "d") == [("d", 1), ("d", 3)]
        assert len(data_service.dataset_files()) == 2
        with contextlib.closing(sqlite3.connect(data_service.root / "datasets.sqlite3")) as database:
            assert database.execute("SELECT version FROM arrays ORDER BY version").fetchall() == [(1,), (3,)]
        _, chunks = download(data_service, "d@3", "x")
        assert b"".join(chunks) == np.full(2, 2).tobytes()

    def test_all_versions(self, data_service):
        for _ in range(3):
            upload(data_service, "d", {"x": np.ones(2), "y": np.zeros(3)})
        upload(data_service, "kept", {"x": np.ones(2)})

        reply = data_service.stub.DeleteDataset(data_service_pb2.DeleteDatasetRequest(ref="d"))

        assert list(reply.deleted_versions) == [1, 2, 3]
        assert list_datasets(data_service) == [("kept", 1)]
        assert not (data_service.blob_root / "datasets" / "d").exists()
        assert len(data_service.dataset_files()) == 1

    def test_versions_not_reused(self, data_service):
        upload(data_service, "d", {"x": np.ones(2)})
        upload(data_service, "d", {"x": np.ones(2)})
        data_service.stub.DeleteDataset(data_service_pb2.DeleteDatasetRequest(ref="d"))

        reply = upload(data_service, "d", {"x": np.ones(2)})

        assert reply.version == 3

    @pytest.mark.parametrize("ref", ["missing", "d@5"])
    def test_unknown(self, data_service, ref):
        upload(data_service, "d", {"x": np.ones(2)})

        with pytest.raises(grpc.RpcError) as error_info:
            data_service.stub.DeleteDataset(data_service_pb2.DeleteDatasetRequest(ref=ref))

        assert_rejected(error_info, grpc.StatusCode.NOT_FOUND, repr(ref), "lasagne-engine datasets")
        assert list_datasets(data_service) == [("d", 1)]
        data_service.assert_serving()


class TestRestart:
    def test_datasets_survive_restart(self, tmp_path):
        values = np.arange(100, dtype=np.int16)
        with serve(tmp_path) as service:
            upload(service, "d", {"values": values})
            upload(service, "d", {"values": values[::-1].copy()})

        with serve(tmp_path) as service:
            assert list_datasets(service, "d") == [("d", 1), ("d", 2)]
            _, chunks = download(service, "d@1", "values")
            assert b"".join(chunks) == values.tobytes()
            assert upload(service, "d", {"values": values}).version == 3


class TestStore:
    def test_fifty_concurrent_commits(self, tmp_path):
        store = DatasetStore(tmp_path)
        count = 50
        versions: list[int] = []
        errors: list[BaseException] = []
        start = threading.Barrier(count)

        def upload_one(index: int) -> None:
            array = np.full(10, index, dtype=np.int64)
            try:
                with store.begin_upload("shared") as pending:
                    pending.start_array(header_of("x", array))
                    pending.write(array.tobytes())
                    start.wait(timeout=10)
                    versions.append(pending.commit().version)
            except BaseException as error:  # noqa: BLE001 - reported by the assert below
                errors.append(error)

        threads = [threading.Thread(target=upload_one, args=(index,)) for index in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        assert errors == []
        assert sorted(versions) == list(range(1, count + 1))

    def test_metadata_failure_deletes_blobs(self, tmp_path):
        store = DatasetStore(tmp_path, busy_timeout_s=0.1)
        array = np.ones(16)
        locker = sqlite3.connect(tmp_path / "datasets.sqlite3", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")

        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                with store.begin_upload("d") as pending:
                    pending.start_array(header_of("x", array))
                    pending.write(array.tobytes())
                    pending.commit()
        finally:
            locker.execute("ROLLBACK")
            locker.close()

        blobs = [path for path in (tmp_path / "blobs").rglob("*") if path.is_file() and path.name != OWNER_MARKER_NAME]
        assert blobs == []
        with pytest.raises(NotFound):
            store.list_datasets("d")
