"""Model version numbers under concurrent registrations and deletions, on both backends.

These tests replace the definition check, which builds each model in a Python process that
imports PyTensor, with a function that returns a fixed signature: fifty real checks would take
minutes and test nothing about version numbers.
"""

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
    assert blob_keys(registry_store.blobs, "models/") == ["models/m/5.py"]


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
