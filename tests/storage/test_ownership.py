"""Two stores on one blob URL: only the database named by a prefix's owner marker sweeps it."""

import contextlib
import logging
import sqlite3

import numpy as np
import pytest
from minio.credentials import StaticProvider

from lasagne_engine.arrays import header_for
from lasagne_engine.blobstore import LocalBlobStore, S3BlobStore
from lasagne_engine.blobstore.ownership import PrefixOwnedElsewhere, owner_marker_key
from lasagne_engine.client import FailedPreconditionError
from lasagne_engine.data_service import DatasetStore
from lasagne_engine.model_registry.records import ParameterSetInfo
from lasagne_engine.model_registry.store import RegistryStore

from .conftest import FAST_BACKOFF_S
from .s3_server import ACCESS_KEY, SECRET_KEY
from .test_registry_versions import accept_definition, source
from .test_services import PART_BYTES, data_service


def reopen(store):
    """Open a second store object on the same folder, or the same bucket and prefix, as ``store``."""
    if isinstance(store, LocalBlobStore):
        return LocalBlobStore(store.root)
    return S3BlobStore(store.location, credentials=StaticProvider(ACCESS_KEY, SECRET_KEY), backoff_s=FAST_BACKOFF_S)


def store_id_of(database) -> str:
    with contextlib.closing(sqlite3.connect(database)) as connection:
        (store_id,) = connection.execute("SELECT value FROM store_info WHERE key = 'store_id'").fetchone()
    return store_id


def test_second_data_service_keeps_datasets(make_blob_store, tmp_path, caplog):
    store = make_blob_store(part_bytes=PART_BYTES)
    X = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    shared = reopen(store)

    with data_service(tmp_path / "first", store) as first:
        first.upload_dataset("kept", {"X": X})
        first_id = store_id_of(tmp_path / "first" / "datasets.sqlite3")

        with caplog.at_level(logging.ERROR), data_service(tmp_path / "second", shared) as second:
            second_id = store_id_of(tmp_path / "second" / "datasets.sqlite3")
            np.testing.assert_array_equal(first.load_dataset("kept")["X"], X)
            with pytest.raises(FailedPreconditionError) as raised:
                second.collect_garbage(services=["data"])
            # The second service still serves requests of its own.
            second.upload_dataset("other", {"y": np.arange(5)})
            np.testing.assert_array_equal(second.load_dataset("other")["y"], np.arange(5))

        np.testing.assert_array_equal(first.load_dataset("kept")["X"], X)
        assert first.collect_garbage(services=["data"])["data"].pending_deletions_remaining == 0

    assert first_id != second_id
    assert first_id in str(raised.value)
    assert second_id in str(raised.value)
    assert store.url in str(raised.value)
    startup_errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert any(first_id in message and second_id in message and store.url in message for message in startup_errors)


def test_second_registry_keeps_blobs(make_blob_store, tmp_path):
    store = make_blob_store()
    first = RegistryStore(tmp_path / "first", check_definition=accept_definition, blob_store=store)
    first.register_model("m", source(0))
    with first.start_parameter_set(ParameterSetInfo(model="m")) as upload:
        array = np.arange(6, dtype=np.float32)
        upload.begin_array(header_for("w", array))
        upload.write(array.tobytes())
        saved = upload.commit()
    first_keys = [key for key in store.list("") if "@" not in key]

    second = RegistryStore(tmp_path / "second", check_definition=accept_definition, blob_store=reopen(store))
    with pytest.raises(PrefixOwnedElsewhere, match=f"belong to store {first.store_id}") as raised:
        second.collect_garbage()
    with pytest.raises(PrefixOwnedElsewhere):
        second.collect_garbage(dry_run=True)
    second.close()

    assert second.store_id in str(raised.value)
    assert [key for key in store.list("") if "@" not in key] == first_keys
    assert first.get_model("m@1").source == source(0)
    np.testing.assert_array_equal(
        np.frombuffer(store.get_bytes(f"parameter-sets/{saved.id}/w"), dtype=np.float32), np.arange(6)
    )
    assert first.collect_garbage().orphan_blobs == 0
    first.close()


def test_upgraded_database_gets_store_id(make_blob_store, tmp_path):
    store = make_blob_store()
    datasets = DatasetStore(tmp_path / "data", blob_store=store)
    with datasets.begin_upload("d") as upload:
        upload.start_array(header_for("x", np.arange(4)))
        upload.write(np.arange(4).tobytes())
        upload.commit()
    # A database and a blob store from before store ids: no store_info table and no marker.
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "datasets.sqlite3")) as connection:
        connection.execute("DROP TABLE store_info")
        connection.commit()
    store.delete(owner_marker_key("datasets/"))

    upgraded = DatasetStore(tmp_path / "data", blob_store=store)
    reopened = DatasetStore(tmp_path / "data", blob_store=store)

    assert upgraded.store_id != datasets.store_id
    assert reopened.store_id == upgraded.store_id
    assert upgraded.store_id in store.get_bytes(owner_marker_key("datasets/")).decode()
    assert upgraded.describe("d").version == 1
    assert len([key for key in store.list("datasets/") if "@" not in key]) == 1
    assert reopened.collect_garbage().orphan_blobs == 0
