"""Model version numbers under concurrent registrations and deletions, on both backends.

These tests replace the definition check, which builds each model in a Python process that
imports PyTensor, with a function that returns a fixed signature: fifty real checks would take
minutes and test nothing about version numbers.
"""

import contextlib
import re
import sqlite3
import threading

import numpy as np
import pytest

from lasagne_engine.arrays import header_for
from lasagne_engine.errors import NotFound
from lasagne_engine.model_registry.records import ParameterSetInfo
from lasagne_engine.model_registry.store import RegistryStore

from .test_services import blob_keys

SIGNATURE = {
    "input_shape": [4],
    "input_dtype": "float32",
    "output_shape": [2],
    "loss": "cross_entropy",
    "parameters": [],
    "parameter_bytes": 0,
}


def accept_definition(name: str, source: str, hyperparameters: dict) -> dict:
    return SIGNATURE


@pytest.fixture
def registry_store(make_blob_store, tmp_path):
    store = RegistryStore(tmp_path / "registry", check_definition=accept_definition, blob_store=make_blob_store())
    yield store
    store.close()


def source(index: int) -> str:
    return f"def build(hyperparameters):\n    return {index}\n"


def test_fifty_concurrent_registrations(registry_store):
    versions: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(50)

    def register(index: int) -> None:
        try:
            start.wait(timeout=30)
            versions.append(registry_store.register_model("shared", source(index)).version)
        except BaseException as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=register, args=(index,)) for index in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    assert sorted(versions) == list(range(1, 51))
    assert len(blob_keys(registry_store.blobs, "models/shared/")) == 50
    for version in (1, 25, 50):
        stored = registry_store.get_model(f"shared@{version}").source
        assert stored in {source(index) for index in range(50)}


def test_versions_not_reused_after_delete(registry_store):
    for index in range(3):
        registry_store.register_model("m", source(index))

    registry_store.delete_model("m@3")
    assert registry_store.register_model("m", source(10)).version == 4
    registry_store.delete_model("m")
    assert registry_store.register_model("m", source(11)).version == 5

    assert registry_store.get_model("m@5").source == source(11)
    assert blob_keys(registry_store.blobs, "models/") == [registry_store.get_model("m@5").source_key]


def test_delete_unknown_model(registry_store):
    registry_store.register_model("mnist", source(0))

    with pytest.raises(NotFound, match=r"No model version 'mnist@4': model 'mnist' has versions 1 to 1"):
        registry_store.delete_model("mnist@4")
    with pytest.raises(NotFound, match=r"No model 'mnsit' in the registry; did you mean 'mnist'\?"):
        registry_store.delete_model("mnsit")


def test_force_delete_removes_set_blobs(registry_store):
    registry_store.register_model("m", source(0))
    with registry_store.start_parameter_set(ParameterSetInfo(model="m")) as upload:
        array = np.arange(6, dtype=np.float32)
        upload.begin_array(header_for("w", array))
        upload.write(array.tobytes())
        saved = upload.commit()

    deleted = registry_store.delete_model("m", force=True)

    assert deleted.parameter_set_ids == (saved.id,)
    assert blob_keys(registry_store.blobs, "") == []
    assert registry_store.collect_garbage().pending_deletions_remaining == 0


def test_source_key_is_unique(registry_store):
    first = registry_store.register_model("m", source(0))
    registry_store.delete_model("m")
    second = registry_store.register_model("m", source(1))

    assert re.fullmatch(r"models/m/source-[0-9a-f]{32}\.py", first.source_key)
    assert second.source_key != first.source_key
    assert blob_keys(registry_store.blobs, "models/") == [second.source_key]
    assert registry_store.get_model("m@2").source == source(1)


def test_legacy_source_rows_load(make_blob_store, tmp_path):
    blobs = make_blob_store()
    store = RegistryStore(tmp_path / "registry", check_definition=accept_definition, blob_store=blobs)
    registered = store.register_model("m", source(0))
    store.close()
    # Turn the database and the blob store into those of a registry from before unique source
    # keys: no source_key column, and the source at models/<name>/<version>.py.
    blobs.put_bytes("models/m/1.py", blobs.get_bytes(registered.source_key))
    blobs.delete(registered.source_key)
    with contextlib.closing(sqlite3.connect(tmp_path / "registry" / "registry.sqlite3")) as connection:
        connection.execute("ALTER TABLE model_versions DROP COLUMN source_key")
        connection.commit()

    upgraded = RegistryStore(tmp_path / "registry", check_definition=accept_definition, blob_store=blobs)
    loaded = upgraded.get_model("m@1")
    newer = upgraded.register_model("m", source(1))
    report = upgraded.collect_garbage()

    assert loaded.source == source(0)
    assert loaded.source_key == "models/m/1.py"
    assert report.orphan_blobs == 0
    assert blob_keys(blobs, "models/") == sorted(["models/m/1.py", newer.source_key])
    upgraded.delete_model("m@1")
    assert blob_keys(blobs, "models/") == [newer.source_key]
    upgraded.close()


def test_failed_registration_leaves_no_blob(registry_store):
    # A trigger makes the insert of the version row fail inside the registration's transaction.
    database = registry_store.root / "registry.sqlite3"
    with contextlib.closing(sqlite3.connect(database)) as connection:
        connection.execute(
            "CREATE TRIGGER reject_versions BEFORE INSERT ON model_versions "
            "BEGIN SELECT RAISE(ABORT, 'rejected by the test'); END"
        )
        connection.commit()

    with pytest.raises(sqlite3.IntegrityError, match="rejected by the test"):
        registry_store.register_model("m", source(0))
    assert blob_keys(registry_store.blobs, "models/") == []

    with contextlib.closing(sqlite3.connect(database)) as connection:
        connection.execute("DROP TRIGGER reject_versions")
        connection.commit()
    registered = registry_store.register_model("m", source(0))

    assert registered.version == 1
    assert blob_keys(registry_store.blobs, "models/") == [registered.source_key]
