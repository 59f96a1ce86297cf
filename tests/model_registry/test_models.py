import hashlib
import re
import threading

import grpc
import pytest
from google.protobuf import struct_pb2

from lasagne_engine.v1 import model_registry_pb2

from .helpers import assert_serving

MODEL_NAME = "digits"


def register(stub, source, *, name=MODEL_NAME, **hyperparameters):
    defaults = struct_pb2.Struct()
    defaults.update(hyperparameters)
    request = model_registry_pb2.RegisterModelRequest(
        name=name, source=source, description=f"{name} for tests", default_hyperparameters=defaults
    )
    return stub.RegisterModel(request, timeout=120)


def list_models(stub, name=""):
    return list(stub.ListModels(model_registry_pb2.ListModelsRequest(name=name)).models)


def get_model(stub, ref):
    return stub.GetModel(model_registry_pb2.GetModelRequest(ref=ref))


def stored_sources(root):
    models = root / "blobs" / "models"
    return sorted(path.relative_to(models).as_posix() for path in models.rglob("*.py")) if models.exists() else []


class TestRegisterModel:
    def test_first_version(self, registry, model_source):
        model = register(registry.stub, model_source, hidden_units=32)

        assert model.name == MODEL_NAME
        assert model.version == 1
        assert model.created
        assert model.source_sha256 == hashlib.sha256(model_source.encode()).hexdigest()
        assert model.default_hyperparameters["hidden_units"] == 32
        assert model.created_at.seconds > 0
        assert len(stored_sources(registry.root)) == 1
        assert re.fullmatch(rf"{MODEL_NAME}/source-[0-9a-f]{{32}}\.py", stored_sources(registry.root)[0])

    def test_signature(self, registry, model_source):
        signature = register(registry.stub, model_source, hidden_units=32).signature

        assert list(signature.input_shape) == [64]
        assert signature.input_dtype == "float32"
        assert list(signature.output_shape) == [10]
        assert signature.loss == "cross_entropy"
        shapes = {parameter.name: list(parameter.shape) for parameter in signature.parameters}
        assert shapes == {"hidden_W": [64, 32], "hidden_b": [32], "logits_W": [32, 10], "logits_b": [10]}
        assert {parameter.dtype for parameter in signature.parameters} == {"<f4"}
        assert signature.parameter_bytes == (64 * 32 + 32 + 32 * 10 + 10) * 4

    def test_identical_source_returns_existing(self, registry, model_source):
        first = register(registry.stub, model_source)
        again = register(registry.stub, model_source, hidden_units=7)

        assert again.version == first.version == 1
        assert not again.created
        assert again.source_sha256 == first.source_sha256
        assert [model.version for model in list_models(registry.stub, MODEL_NAME)] == [1]
        assert len(stored_sources(registry.root)) == 1

    def test_changed_source_adds_version(self, registry, model_source):
        changed_source = model_source + "\n# Same network, new comment.\n"
        register(registry.stub, model_source)
        second = register(registry.stub, changed_source)

        assert second.version == 2
        assert second.created
        assert [model.version for model in list_models(registry.stub, MODEL_NAME)] == [1, 2]
        assert get_model(registry.stub, MODEL_NAME).source == changed_source
        assert get_model(registry.stub, f"{MODEL_NAME}@1").source == model_source
        assert get_model(registry.stub, f"{MODEL_NAME}@2").source_sha256 == second.source_sha256

    def test_empty_source(self, registry):
        with pytest.raises(grpc.RpcError) as caught:
            register(registry.stub, "  \n")

        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "source of model 'digits' is empty" in caught.value.details()
        assert_serving(registry.stub)

    @pytest.mark.parametrize("name", ["a/b", "..", "", "m" * 200, "white space"], ids=["slash", "dots", "empty", "long", "space"])
    def test_bad_name(self, registry, model_source, name):
        with pytest.raises(grpc.RpcError) as caught:
            register(registry.stub, model_source, name=name)

        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "model name" in caught.value.details()
        assert list_models(registry.stub) == []
        assert_serving(registry.stub)

    @pytest.mark.parametrize(
        ("source", "last_line"),
        [
            ("import no_such_module_for_tests\n", "ModuleNotFoundError: No module named 'no_such_module_for_tests'"),
            (
                "def build(hyperparameters):\n    raise ValueError('hidden_units must be positive')\n",
                "ValueError: hidden_units must be positive",
            ),
            ("LAYERS = 3\n", "defines no function build(hyperparameters)"),
        ],
        ids=["import-error", "build-raises", "no-build"],
    )
    def test_broken_source(self, registry, source, last_line):
        with pytest.raises(grpc.RpcError) as caught:
            register(registry.stub, source)

        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert last_line in caught.value.details().strip().splitlines()[-1]
        assert "'digits'" in caught.value.details()
        assert list_models(registry.stub) == []
        assert stored_sources(registry.root) == []
        assert_serving(registry.stub)

    def test_concurrent_registrations(self, registry, model_source):
        sources = [f"{model_source}\n# Variant {index}.\n" for index in range(20)]
        results: dict[int, model_registry_pb2.ModelVersion] = {}
        errors = []

        def register_variant(index):
            try:
                results[index] = register(registry.stub, sources[index])
            except grpc.RpcError as error:
                errors.append(error)

        threads = [threading.Thread(target=register_variant, args=(index,)) for index in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert errors == []
        assert sorted(model.version for model in results.values()) == list(range(1, 21))
        assert all(model.created for model in results.values())
        for index, model in results.items():
            assert get_model(registry.stub, f"{MODEL_NAME}@{model.version}").source == sources[index]
        assert [model.version for model in list_models(registry.stub, MODEL_NAME)] == list(range(1, 21))


class TestListAndGetModels:
    def test_latest_of_each_sorted(self, registry, model_source):
        register(registry.stub, model_source, name="zeta")
        register(registry.stub, model_source, name="alpha")
        register(registry.stub, model_source + "\n# Second version.\n", name="zeta")

        models = list_models(registry.stub)

        assert [(model.name, model.version) for model in models] == [("alpha", 1), ("zeta", 2)]
        assert all(model.source == "" for model in models)
        assert get_model(registry.stub, "zeta").version == 2
        assert get_model(registry.stub, "zeta@1").version == 1

    def test_unknown_model(self, registry, model_source):
        register(registry.stub, model_source)

        with pytest.raises(grpc.RpcError) as caught:
            get_model(registry.stub, "digit")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "No model 'digit'" in caught.value.details()
        assert "did you mean 'digits'?" in caught.value.details()
        assert "lasagne-engine models" in caught.value.details()

        with pytest.raises(grpc.RpcError) as caught:
            list_models(registry.stub, "unknown")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "No model 'unknown'" in caught.value.details()
        assert_serving(registry.stub)

    def test_unknown_version(self, registry, model_source):
        register(registry.stub, model_source)

        with pytest.raises(grpc.RpcError) as caught:
            get_model(registry.stub, "digits@5")

        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'digits@5'" in caught.value.details()
        assert "versions 1 to 1" in caught.value.details()
        assert "lasagne-engine models" in caught.value.details()
        assert_serving(registry.stub)

    @pytest.mark.parametrize("ref", ["digits@0", "digits@x", "digits@", "a/b@1", ""], ids=str)
    def test_bad_ref(self, registry, ref):
        with pytest.raises(grpc.RpcError) as caught:
            get_model(registry.stub, ref)

        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "model" in caught.value.details()
        assert_serving(registry.stub)

    def test_corrupted_source(self, registry, model_source):
        register(registry.stub, model_source)
        (source_file,) = stored_sources(registry.root)
        (registry.root / "blobs" / "models" / source_file).write_text(model_source + "# tampered\n")

        with pytest.raises(grpc.RpcError) as caught:
            get_model(registry.stub, "digits@1")

        assert caught.value.code() == grpc.StatusCode.DATA_LOSS
        assert f"models/{source_file}" in caught.value.details()
        assert hashlib.sha256(model_source.encode()).hexdigest() in caught.value.details()
        assert_serving(registry.stub)
