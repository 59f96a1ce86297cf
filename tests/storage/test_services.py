"""The data service and the registry on each blob store backend, through real servers and the SDK."""

import contextlib
import logging
import sqlite3
import threading
import time
import uuid

import grpc
import numpy as np
import pytest

from lasagne_engine.blobstore import LocalBlobStore
from lasagne_engine.blobstore.ownership import OWNER_MARKER_NAME
from lasagne_engine.client import Engine, FailedPreconditionError, NotFoundError, UnavailableError
from lasagne_engine.config import StreamLimits
from lasagne_engine.data_service import create_server as create_data_server
from lasagne_engine.model_registry import create_server as create_registry_server
from lasagne_engine.v1 import data_service_pb2, data_service_pb2_grpc, storage_pb2

from .conftest import FAST_BACKOFF_S
from .faulty_proxy import Fail, FaultyProxy

# The tests' S3 part size, S3's minimum.
PART_BYTES = 5 << 20
# 3072 x 1024 float32 is 12 MiB, so the S3 backend stores it in a multipart upload of three parts,
# and half of it, which the disconnect test sends, already fills more than one part.
LARGE_SHAPE = (3072, 1024)


@contextlib.contextmanager
def data_service(root, blob_store, *, limits: StreamLimits | None = None, delete_retry_s: float | None = None):
    server = create_data_server(
        "127.0.0.1:0", root=root, blob_store=blob_store, limits=limits or StreamLimits(), delete_retry_s=delete_retry_s
    ).start()
    engine = Engine(data_address=server.address, registry_address="127.0.0.1:1", trainer_address="127.0.0.1:1")
    try:
        yield engine
    finally:
        engine.close()
        server.stop(grace_s=None)


@contextlib.contextmanager
def registry(root, blob_store, compile_cache, *, delete_retry_s: float | None = None):
    server = create_registry_server(
        "127.0.0.1:0",
        root=root,
        blob_store=blob_store,
        compile_cache=compile_cache,
        limits=StreamLimits(),
        delete_retry_s=delete_retry_s,
    ).start()
    engine = Engine(registry_address=server.address, data_address="127.0.0.1:1", trainer_address="127.0.0.1:1")
    try:
        yield engine
    finally:
        engine.close()
        server.stop(grace_s=None)


def seed_registry(template, root, blob_store) -> None:
    """Copy the template's database to ``root`` and its blobs into ``blob_store``."""
    root.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(template / "registry.sqlite3")) as original:
        with contextlib.closing(sqlite3.connect(root / "registry.sqlite3")) as copy:
            original.backup(copy)
    for path in (template / "blobs").rglob("*"):
        if path.is_file() and ".incoming" not in path.parts:
            blob_store.put_bytes(path.relative_to(template / "blobs").as_posix(), path.read_bytes())


def blob_keys(store, prefix: str) -> list[str]:
    """Return the keys under ``prefix`` in sorted order, without the services' owner markers."""
    return [key for key in store.list(prefix) if not key.endswith(OWNER_MARKER_NAME)]


def incomplete_writes(store) -> list[str]:
    """Return the writes that have not committed: partial files of the local backend, open multipart uploads on S3."""
    if isinstance(store, LocalBlobStore):
        return sorted(path.name for path in (store.root / ".incoming").glob("*"))
    page = store.client._list_multipart_uploads(store.location.bucket, prefix=store.location.prefix)
    return sorted(upload.object_name for upload in page.uploads)


def dataset_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(seed)
    return {
        "X": generator.standard_normal(LARGE_SHAPE).astype(np.float32),
        "y": generator.integers(0, 10, size=LARGE_SHAPE[0]).astype(np.int64),
        "scalar": np.array(3.5),
    }


@pytest.fixture
def proxied_s3_store(s3_server):
    """An S3 store whose requests pass a fault-injecting proxy; yields ``(store, proxy)``."""
    proxy = FaultyProxy(s3_server.endpoint).start()
    store = s3_server.store(endpoint=proxy.endpoint, part_bytes=PART_BYTES, backoff_s=FAST_BACKOFF_S, max_attempts=2)
    yield store, proxy
    store.close()
    proxy.stop()


class TestDataService:
    def test_roundtrip(self, make_blob_store, tmp_path):
        store = make_blob_store(part_bytes=PART_BYTES)
        arrays = dataset_arrays()

        with data_service(tmp_path / "data", store) as engine:
            version = engine.upload_dataset("digits", arrays)
            loaded = engine.load_dataset("digits@1")

        assert version.version == 1
        for name, array in arrays.items():
            np.testing.assert_array_equal(loaded[name], array)
            assert loaded[name].dtype == array.dtype
        keys = blob_keys(store, "datasets/")
        assert [key.rsplit("/", 1)[1] for key in keys] == ["X", "scalar", "y"]

    def test_disconnect_mid_upload_leaves_nothing(self, make_blob_store, tmp_path):
        store = make_blob_store(part_bytes=PART_BYTES)
        X = dataset_arrays()["X"]
        sent_half = threading.Event()

        def frames():
            yield data_service_pb2.UploadDatasetRequest(info=data_service_pb2.DatasetInfo(name="cut"))
            yield data_service_pb2.UploadDatasetRequest(
                header={"name": "X", "dtype": X.dtype.str, "shape": list(X.shape), "nbytes": X.nbytes}
            )
            raw = X.tobytes()
            for offset in range(0, len(raw) // 2, 1 << 20):
                yield data_service_pb2.UploadDatasetRequest(chunk=raw[offset : offset + (1 << 20)])
            sent_half.set()
            threading.Event().wait(30)

        with data_service(tmp_path / "data", store) as engine:
            channel = grpc.insecure_channel(engine.addresses.data)
            future = data_service_pb2_grpc.DataServiceStub(channel).UploadDataset.future(frames(), timeout=60)
            assert sent_half.wait(30)
            # On S3 the first part has gone out, so a multipart upload is open. Locally a partial file exists.
            for _ in range(200):
                if incomplete_writes(store):
                    break
                threading.Event().wait(0.05)
            assert len(incomplete_writes(store)) == 1
            future.cancel()
            channel.close()

            # The server aborts the upload once it notices the cancellation.
            for _ in range(200):
                if not blob_keys(store, "datasets/") and not incomplete_writes(store):
                    break
                threading.Event().wait(0.05)
            with pytest.raises(NotFoundError):
                engine.list_datasets("cut")

        assert blob_keys(store, "datasets/") == []
        assert incomplete_writes(store) == []
        assert store.abort_incomplete_writes("datasets/", keep=lambda key: False) == 0

    def test_delete_removes_blobs(self, make_blob_store, tmp_path):
        store = make_blob_store()
        with data_service(tmp_path / "data", store) as engine:
            engine.upload_dataset("d", {"x": np.arange(10)})
            engine.upload_dataset("d", {"x": np.arange(20)})

            assert engine.delete_dataset("d@1") == [1]
            assert len(blob_keys(store, "datasets/")) == 1
            assert engine.delete_dataset("d@1", allow_missing=True) == []
            assert engine.delete_dataset("d") == [2]

        assert blob_keys(store, "datasets/") == []

    def test_orphans_removed_at_start_and_by_gc(self, make_blob_store, tmp_path):
        store = make_blob_store()
        orphan_at_start = f"datasets/d/{uuid.uuid4().hex}/x"
        store.put_bytes(orphan_at_start, b"left by a crash")

        with data_service(tmp_path / "data", store) as engine:
            assert blob_keys(store, "datasets/") == []
            engine.upload_dataset("d", {"x": np.arange(4)})
            orphan = f"datasets/d/{uuid.uuid4().hex}/x"
            store.put_bytes(orphan, b"left by a crash")

            counted = _data_gc(engine, dry_run=True)
            assert counted.orphan_blobs == 1
            assert orphan in blob_keys(store, "datasets/")
            report = _data_gc(engine)

            assert report.orphan_blobs == 1
            assert report.pending_deletions_remaining == 0
            assert orphan not in blob_keys(store, "datasets/")
            np.testing.assert_array_equal(engine.load_dataset("d")["x"], np.arange(4))

    def test_gc_spares_uploads_in_progress(self, make_blob_store, tmp_path):
        from lasagne_engine.arrays import header_for
        from lasagne_engine.data_service import DatasetStore

        store = make_blob_store(part_bytes=PART_BYTES)
        datasets = DatasetStore(tmp_path / "data", blob_store=store)
        first = np.arange(5)
        with datasets.begin_upload("d") as upload:
            upload.start_array(header_for("a", first))
            upload.write(first.tobytes())
            upload.start_array(header_for("b", first))
            upload.write(first.tobytes())

            report = datasets.collect_garbage()

            assert report.orphan_blobs == 0
            assert report.incomplete_writes == 0
            upload.commit()

        assert datasets.describe("d").version == 1
        assert len(blob_keys(store, "datasets/")) == 2

    @pytest.mark.parametrize("start_offset", [0, 100, 399])
    def test_resumed_download_of_truncated_blob(self, make_blob_store, tmp_path, start_offset):
        store = make_blob_store()
        with data_service(tmp_path / "data", store) as engine:
            engine.upload_dataset("d", {"x": np.arange(50, dtype=np.float64)})
            (key,) = blob_keys(store, "datasets/")
            store.put_bytes(key, store.get_bytes(key)[:40])

            with pytest.raises(grpc.RpcError) as raised:
                list(_download(engine, "d", "x", start_offset=start_offset))

        assert raised.value.code() == grpc.StatusCode.DATA_LOSS
        assert f"its blob {key} has 40 bytes, but 400 were recorded" in raised.value.details()

    @pytest.mark.parametrize("start_offset", [8, 200, 400])
    def test_resumed_download_checks_digest(self, make_blob_store, tmp_path, start_offset):
        store = make_blob_store()
        with data_service(tmp_path / "data", store) as engine:
            engine.upload_dataset("d", {"x": np.arange(50, dtype=np.float64)})
            (key,) = blob_keys(store, "datasets/")
            # Same size with byte 0 changed. It lies before every start_offset tested, so only skipped bytes differ.
            corrupt = bytearray(store.get_bytes(key))
            corrupt[0] ^= 0xFF
            store.put_bytes(key, bytes(corrupt))

            received = []
            with pytest.raises(grpc.RpcError) as raised:
                for frame in _download(engine, "d", "x", start_offset=start_offset):
                    received.append(frame)

        assert raised.value.code() == grpc.StatusCode.DATA_LOSS
        assert "its bytes have sha256" in raised.value.details()
        assert b"".join(frame.chunk for frame in received[1:]) == bytes(corrupt[start_offset:])

    def test_fifty_concurrent_uploads(self, make_blob_store, tmp_path):
        store = make_blob_store()
        versions: list[int] = []
        errors: list[BaseException] = []

        # One client sends all 50 streams over one connection, beyond the default limit of 32 per client.
        with data_service(tmp_path / "data", store, limits=StreamLimits(max_streams_per_client=64)) as engine:

            def upload(index: int) -> None:
                try:
                    versions.append(engine.upload_dataset("shared", {"x": np.full(100, index)}).version)
                except BaseException as error:  # noqa: BLE001 - reported by the assert below
                    errors.append(error)

            threads = [threading.Thread(target=upload, args=(index,)) for index in range(50)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)

            assert errors == []
            assert sorted(versions) == list(range(1, 51))
            listed = engine.list_datasets("shared")

        assert [version.version for version in listed] == list(range(1, 51))
        assert len(blob_keys(store, "datasets/")) == 50


class TestDataServiceOnFailingStorage:
    def test_unavailable_then_recovers(self, proxied_s3_store, tmp_path):
        store, proxy = proxied_s3_store
        with data_service(tmp_path / "data", store) as engine:
            proxy.policy = lambda request: Fail(503, "ServiceUnavailable") if request.method == "PUT" else None

            with pytest.raises(UnavailableError, match=r"failed to store 'datasets/d/[0-9a-f]+/x' after 2 attempts"):
                engine.upload_dataset("d", {"x": np.arange(10)})
            proxy.policy = lambda request: None
            version = engine.upload_dataset("d", {"x": np.arange(10)})

        assert version.version == 1
        assert len(blob_keys(store, "datasets/")) == 1

    def test_failed_blob_delete_retried_by_gc(self, proxied_s3_store, tmp_path):
        store, proxy = proxied_s3_store
        with data_service(tmp_path / "data", store) as engine:
            engine.upload_dataset("d", {"x": np.arange(10), "y": np.arange(3)})
            proxy.policy = lambda request: Fail(503, "ServiceUnavailable") if request.method == "DELETE" else None

            assert engine.delete_dataset("d") == [1]
            assert len(blob_keys(store, "datasets/")) == 2
            still_down = _data_gc(engine)
            proxy.policy = lambda request: None
            report = _data_gc(engine)

        assert still_down.pending_deletions_remaining == 2
        assert report.pending_deletions_completed == 2
        assert report.pending_deletions_remaining == 0
        assert blob_keys(store, "datasets/") == []

    def test_failed_blob_delete_retried_at_start(self, proxied_s3_store, tmp_path):
        store, proxy = proxied_s3_store
        with data_service(tmp_path / "data", store) as engine:
            engine.upload_dataset("d", {"x": np.arange(10)})
            proxy.policy = lambda request: Fail(503, "ServiceUnavailable") if request.method == "DELETE" else None
            engine.delete_dataset("d")
        proxy.policy = lambda request: None

        with data_service(tmp_path / "data", store):
            assert blob_keys(store, "datasets/") == []


def wait_until(condition, *, timeout_s: float = 20.0) -> None:
    """Poll ``condition`` until it returns something true; fail after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"Condition {condition} still false after {timeout_s} s.")
        time.sleep(0.05)


def delete_retry_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("delete-retry-")]


class TestPeriodicDeleteRetry:
    def test_data_delete_retried_by_timer(self, proxied_s3_store, tmp_path, caplog):
        store, proxy = proxied_s3_store
        caplog.set_level(logging.INFO, logger="lasagne_engine.blobstore.garbage")
        with data_service(tmp_path / "data", store, delete_retry_s=0.2) as engine:
            engine.upload_dataset("d", {"x": np.arange(10), "y": np.arange(3)})
            deleted_keys = blob_keys(store, "datasets/")
            # It is written after the start, so the startup sweep has not seen it, and only a later
            # sweep would delete it.
            orphan = f"datasets/orphan/{uuid.uuid4().hex}/x"
            store.put_bytes(orphan, b"not referenced by any version")
            proxy.policy = lambda request: Fail(503, "ServiceUnavailable") if request.method == "DELETE" else None

            assert engine.delete_dataset("d") == [1]
            wait_until(lambda: "Retrying 2 blob deletions that failed earlier" in caplog.text)
            assert sorted(blob_keys(store, "datasets/")) == sorted([*deleted_keys, orphan])
            proxy.policy = lambda request: None
            wait_until(lambda: blob_keys(store, "datasets/") == [orphan])
            assert len(delete_retry_threads()) == 1

        assert delete_retry_threads() == []
        for key in deleted_keys:
            assert f"Failed to delete blob {key}" in caplog.text
        # A retry round can overlap the moment the proxy stops failing, so the two keys may go in two rounds.
        retried = [record.getMessage().split(": ", 1)[1].split(", ") for record in caplog.records
                   if "whose deletion had failed earlier" in record.getMessage()]
        assert sorted(key for keys in retried for key in keys) == sorted(deleted_keys)
        assert blob_keys(store, "datasets/") == [orphan]
        assert "Stopped retrying failed blob deletions of the data service" in caplog.text

    def test_registry_delete_retried_by_timer(self, proxied_s3_store, registry_template, compile_cache, tmp_path):
        store, proxy = proxied_s3_store
        seed_registry(registry_template, tmp_path / "registry", store)
        with registry(tmp_path / "registry", store, compile_cache, delete_retry_s=0.2) as engine:
            saved = engine.save_parameter_set("digits", {"W": np.ones((4, 4), dtype=np.float32)})
            proxy.policy = lambda request: Fail(503, "ServiceUnavailable") if request.method == "DELETE" else None

            assert engine.delete_parameter_set(saved.id) is True
            assert blob_keys(store, f"parameter-sets/{saved.id}/") == [f"parameter-sets/{saved.id}/W"]
            proxy.policy = lambda request: None
            wait_until(lambda: blob_keys(store, f"parameter-sets/{saved.id}/") == [])

        assert delete_retry_threads() == []

    def test_zero_interval_starts_no_thread(self, blob_store, tmp_path, monkeypatch):
        monkeypatch.setenv("LASAGNE_ENGINE_DELETE_RETRY_S", "0")

        with data_service(tmp_path / "data", blob_store):
            assert delete_retry_threads() == []

    @pytest.mark.parametrize("value", ["-1", "soon", "inf", "nan"])
    def test_invalid_interval_rejected(self, tmp_path, monkeypatch, value):
        monkeypatch.setenv("LASAGNE_ENGINE_DELETE_RETRY_S", value)

        with pytest.raises(ValueError, match=f"LASAGNE_ENGINE_DELETE_RETRY_S='{value}' is invalid"):
            create_data_server("127.0.0.1:0", root=tmp_path / "data", limits=StreamLimits())


class TestRegistry:
    @pytest.fixture
    def registry_engine(self, make_blob_store, registry_template, compile_cache, tmp_path):
        store = make_blob_store(part_bytes=PART_BYTES)
        seed_registry(registry_template, tmp_path / "registry", store)
        with registry(tmp_path / "registry", store, compile_cache) as engine:
            yield engine, store

    def test_parameter_set_roundtrip(self, registry_engine):
        engine, store = registry_engine
        arrays = {"W": dataset_arrays()["X"], "b": np.ones(1024, dtype=np.float32)}

        saved = engine.save_parameter_set("digits", arrays, roles={"W": "trainable", "b": "trainable"})
        loaded = engine.load_parameter_set(saved.id)

        for name, array in arrays.items():
            np.testing.assert_array_equal(loaded[name], array)
        assert blob_keys(store, "parameter-sets/") == [f"parameter-sets/{saved.id}/W", f"parameter-sets/{saved.id}/b"]

    def test_held_set_cannot_be_deleted(self, registry_engine):
        engine, store = registry_engine
        saved = engine.save_parameter_set("digits", {"w": np.ones(3)})

        hold = engine.hold_parameter_set(saved.id, "s-running")
        again = engine.hold_parameter_set(saved.id, "s-running")
        engine.hold_parameter_set(saved.id, "s-other")

        assert hold.created_at == again.created_at
        assert list(engine.get_parameter_set(saved.id).held_by) == ["s-other", "s-running"]
        with pytest.raises(FailedPreconditionError, match=rf"{saved.id} by session 's-other', 's-running'") as raised:
            engine.delete_parameter_set(saved.id)
        assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert engine.release_parameter_set(saved.id, "s-running") == 1
        assert engine.release_parameter_set("", "s-other") == 1
        assert engine.release_parameter_set(saved.id, "s-other") == 0
        assert engine.delete_parameter_set(saved.id) is True
        assert engine.delete_parameter_set(saved.id, allow_missing=True) is False
        assert blob_keys(store, "parameter-sets/") == []

    def test_hold_missing_set(self, registry_engine):
        engine, _ = registry_engine

        with pytest.raises(NotFoundError, match="No parameter set with id 'ps-000000000000' to hold for session 's-1'"):
            engine.hold_parameter_set("ps-000000000000", "s-1")

    def test_delete_model_needs_force(self, registry_engine):
        engine, store = registry_engine
        saved = engine.save_parameter_set("digits", {"w": np.ones(3)})

        with pytest.raises(FailedPreconditionError, match=rf"Model 'digits@1' still has 1 parameter sets \({saved.id}\)"):
            engine.delete_model("digits@1")
        engine.hold_parameter_set(saved.id, "s-1")
        with pytest.raises(FailedPreconditionError, match="by session 's-1'"):
            engine.delete_model("digits@1", force=True)
        engine.release_parameter_set(saved.id, "s-1")
        deleted = engine.delete_model("digits@1", force=True)

        assert list(deleted.deleted_versions) == [1]
        assert list(deleted.deleted_parameter_sets) == [saved.id]
        assert blob_keys(store, "") == []
        with pytest.raises(NotFoundError):
            engine.get_model("digits")
        assert list(engine.delete_model("digits", allow_missing=True).deleted_versions) == []

    def test_gc_removes_orphans(self, registry_engine):
        engine, store = registry_engine
        saved = engine.save_parameter_set("digits", {"w": np.ones(3)})
        source_keys = blob_keys(store, "models/")
        store.put_bytes("parameter-sets/ps-0123456789ab/w", b"left by a crash")
        store.put_bytes(f"models/digits/source-{uuid.uuid4().hex}.py", b"left by a crash")

        counted = engine.collect_garbage(dry_run=True, services=["registry"])["registry"]
        report = engine.collect_garbage(services=["registry"])["registry"]

        assert counted.orphan_blobs == 2
        assert report.orphan_blobs == 2
        assert len(source_keys) == 1
        assert blob_keys(store, "") == [*source_keys, f"parameter-sets/{saved.id}/w"]


class TestGcCommand:
    @pytest.fixture
    def cli_environment(self, monkeypatch, tmp_path):
        """Point the CLI at services that a test sets up, with its own home and no config file."""
        monkeypatch.setenv("LASAGNE_ENGINE_HOME", str(tmp_path / "client-home"))
        monkeypatch.delenv("LASAGNE_ENGINE_CONFIG", raising=False)

        def use(engine: Engine, *, registry_engine: Engine) -> None:
            monkeypatch.setenv("LASAGNE_ENGINE_DATA_ADDRESS", engine.addresses.data)
            monkeypatch.setenv("LASAGNE_ENGINE_REGISTRY_ADDRESS", registry_engine.addresses.registry)

        return use

    def test_gc_removes_orphans_keeps_listed(self, make_blob_store, compile_cache, tmp_path, cli_environment, capsys):
        from lasagne_engine.client import cli

        store = make_blob_store()
        with data_service(tmp_path / "data", store) as data, registry(tmp_path / "registry", store, compile_cache) as models:
            data.upload_dataset("kept", {"x": np.arange(6)})
            listed = blob_keys(store, "datasets/")
            orphan_dataset = f"datasets/kept/{uuid.uuid4().hex}/x"
            orphan_set = "parameter-sets/ps-0123456789ab/w"
            store.put_bytes(orphan_dataset, b"left by a crash")
            store.put_bytes(orphan_set, b"left by a crash")
            cli_environment(data, registry_engine=models)

            status = cli.main(["gc"])
            output = capsys.readouterr().out

            np.testing.assert_array_equal(data.load_dataset("kept")["x"], np.arange(6))

        assert status == 0
        assert "orphan blobs removed" in output
        assert blob_keys(store, "datasets/") == listed
        assert blob_keys(store, "parameter-sets/") == []

    def test_gc_fails_on_foreign_owner(self, make_blob_store, compile_cache, tmp_path, cli_environment, capsys):
        from lasagne_engine.client import cli

        store = make_blob_store()
        with data_service(tmp_path / "first", store) as first:
            first.upload_dataset("kept", {"x": np.arange(6)})
            with data_service(tmp_path / "second", store) as second, registry(
                tmp_path / "registry", store, compile_cache
            ) as models:
                cli_environment(second, registry_engine=models)

                status = cli.main(["gc"])
                errors = capsys.readouterr().err

            np.testing.assert_array_equal(first.load_dataset("kept")["x"], np.arange(6))

        first_id = _store_id(tmp_path / "first" / "datasets.sqlite3")
        second_id = _store_id(tmp_path / "second" / "datasets.sqlite3")
        assert status == 2
        assert first_id in errors
        assert second_id in errors
        assert len(blob_keys(store, "datasets/")) == 1


def _store_id(database) -> str:
    with contextlib.closing(sqlite3.connect(database)) as connection:
        (store_id,) = connection.execute("SELECT value FROM store_info WHERE key = 'store_id'").fetchone()
    return store_id


def _download(engine: Engine, ref: str, array: str, *, start_offset: int):
    """Stream DownloadArray frames straight from the stub, without the SDK's retries and digest check."""
    channel = grpc.insecure_channel(engine.addresses.data)
    try:
        request = data_service_pb2.DownloadArrayRequest(ref=ref, array=array, start_offset=start_offset)
        yield from data_service_pb2_grpc.DataServiceStub(channel).DownloadArray(request, timeout=30)
    finally:
        channel.close()


def _data_gc(engine: Engine, *, dry_run: bool = False) -> storage_pb2.CollectGarbageResponse:
    return engine.collect_garbage(dry_run=dry_run, services=["data"])["data"]
