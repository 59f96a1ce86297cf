import hashlib

import grpc
import numpy as np
import pytest

from lasagne_engine.client import DataLossError, IntegrityError, InvalidArgumentError, NotFoundError
from lasagne_engine.v1 import arrays_pb2, model_registry_pb2, model_registry_pb2_grpc


class FakeRegistry(model_registry_pb2_grpc.ModelRegistryServicer):
    """Keeps saved parameter sets as the frames it received, in memory."""

    def __init__(self):
        self.parameter_sets = {}
        self.requests = []
        self.load_requests = []
        # Chunks the next load sends before it fails with UNAVAILABLE; None sends every chunk.
        self.load_chunks_before_failure = None
        # sha256 that the headers of a resumed load carry instead of the saved one; None keeps it.
        self.sha256_on_resume = None
        self.register_time_remaining_s = None

    def SaveParameterSet(self, request_iterator, context):
        info = None
        arrays = []
        for request in request_iterator:
            kind = request.WhichOneof("frame")
            if kind == "info":
                info = request.info
            elif kind == "header":
                arrays.append((request.header, bytearray()))
            else:
                arrays[-1][1].extend(request.chunk)

        parameter_set_id = f"ps-{len(self.parameter_sets) + 1}"
        self.parameter_sets[parameter_set_id] = arrays
        return model_registry_pb2.ParameterSet(
            id=parameter_set_id,
            model=info.model,
            model_version=1,
            session_id=info.session_id,
            epoch=info.epoch,
            step=info.step,
            metrics=info.metrics,
            tags=info.tags,
            parent_id=info.parent_id,
            arrays=[header for header, _ in arrays],
            total_bytes=sum(len(data) for _, data in arrays),
        )

    def LoadParameterSet(self, request, context):
        self.load_requests.append(request)
        if request.id not in self.parameter_sets:
            context.abort(grpc.StatusCode.NOT_FOUND, f"No parameter set {request.id!r}.")
        arrays = [
            (header, data)
            for header, data in self.parameter_sets[request.id]
            if not request.names or header.name in request.names
        ]
        if request.start_array:
            arrays = arrays[[header.name for header, _ in arrays].index(request.start_array) :]
        start_offset = request.start_offset
        for header, data in arrays:
            if request.start_array and self.sha256_on_resume is not None:
                header = arrays_pb2.ArrayHeader(
                    name=header.name, dtype=header.dtype, shape=header.shape, nbytes=header.nbytes,
                    sha256=self.sha256_on_resume,
                )
            yield arrays_pb2.ArrayFrame(header=header)
            for offset in range(start_offset, len(data), request.chunk_bytes):
                if self.load_chunks_before_failure is not None:
                    if self.load_chunks_before_failure == 0:
                        self.load_chunks_before_failure = None
                        context.abort(grpc.StatusCode.UNAVAILABLE, "The test registry dropped the load.")
                    self.load_chunks_before_failure -= 1
                yield arrays_pb2.ArrayFrame(chunk=bytes(data[offset : offset + request.chunk_bytes]))
            start_offset = 0

    def TagParameterSet(self, request, context):
        self.requests.append(request)
        return model_registry_pb2.ParameterSet(id=request.id, tags=request.add_tags)

    def RegisterModel(self, request, context):
        self.requests.append(request)
        self.register_time_remaining_s = context.time_remaining()
        return model_registry_pb2.ModelVersion(name=request.name, version=1, created=True)


@pytest.fixture
def registry():
    return FakeRegistry()


@pytest.fixture
def engine(registry, serve, connect):
    return connect(serve((model_registry_pb2_grpc.add_ModelRegistryServicer_to_server, registry)))


PARAMETERS = {
    "hidden.W": np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32),
    "hidden.b": np.linspace(-1, 1, 32, dtype=np.float32),
    "steps": np.array(1234, dtype=np.int64),
    "mask": np.array([[True, False], [False, True]]),
    "empty": np.zeros((0, 3), dtype=np.float64),
}


def test_parameter_set_roundtrip(engine, registry):
    saved = engine.save_parameter_set(
        "mlp@1",
        PARAMETERS,
        roles={"hidden.W": "trainable", "hidden.b": "trainable", "steps": "state"},
        session_id="s-1",
        epoch=3,
        step=300,
        metrics={"val_loss": 0.25},
        tags=["best"],
    )
    loaded = engine.load_parameter_set(saved.id)

    assert (saved.id, saved.model, saved.session_id, saved.epoch, saved.step) == ("ps-1", "mlp@1", "s-1", 3, 300)
    assert dict(saved.metrics) == {"val_loss": 0.25}
    assert list(saved.tags) == ["best"]
    assert [header.role for header in saved.arrays] == ["trainable", "trainable", "state", "", ""]
    for header, data in registry.parameter_sets["ps-1"]:
        assert header.sha256 == hashlib.sha256(data).hexdigest()

    assert list(loaded) == list(PARAMETERS)
    for name, array in PARAMETERS.items():
        assert loaded[name].dtype == array.dtype
        assert loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)


def test_load_parameter_set_subset(engine):
    saved = engine.save_parameter_set("mlp", PARAMETERS)

    loaded = engine.load_parameter_set(saved.id, names=["steps", "hidden.b"])

    assert sorted(loaded) == ["hidden.b", "steps"]
    np.testing.assert_array_equal(loaded["hidden.b"], PARAMETERS["hidden.b"])


def test_load_damaged_parameter_set_raises(engine, registry):
    saved = engine.save_parameter_set("mlp", {"W": np.ones((10, 10), dtype=np.float32)})
    header, data = registry.parameter_sets[saved.id][0]
    data[17] ^= 0xFF

    actual = hashlib.sha256(data).hexdigest()
    with pytest.raises(IntegrityError, match=f"array 'W' of parameter set 'ps-1' has sha256 {actual}"):
        engine.load_parameter_set(saved.id)


def test_load_resumes_after_unavailable(engine, registry, caplog):
    saved = engine.save_parameter_set("mlp", PARAMETERS)
    # hidden.W has 8192 bytes, 128 chunks of 64 bytes, and hidden.b 2 chunks, so the failure
    # falls between the two chunks of hidden.b.
    registry.load_chunks_before_failure = 129

    with caplog.at_level("WARNING", logger="lasagne_engine.client.engine"):
        loaded = engine.load_parameter_set(saved.id)

    assert [(request.start_array, request.start_offset) for request in registry.load_requests] == [
        ("", 0),
        ("hidden.b", 64),
    ]
    for name, array in PARAMETERS.items():
        np.testing.assert_array_equal(loaded[name], array)
    assert "Load of parameter set 'ps-1' failed at byte 64 of array 'hidden.b'" in caplog.text


def test_load_resumed_with_other_header_raises(engine, registry):
    saved = engine.save_parameter_set("mlp", PARAMETERS)
    registry.load_chunks_before_failure = 129
    registry.sha256_on_resume = "0" * 64

    with pytest.raises(DataLossError, match="sent array 'hidden.b' with sha256 0{64} where array 'hidden.b'"):
        engine.load_parameter_set(saved.id)


def test_load_missing_parameter_set(engine):
    with pytest.raises(NotFoundError, match="No parameter set 'ps-9'."):
        engine.load_parameter_set("ps-9")


def test_roles_for_unknown_array_rejected(engine, registry):
    with pytest.raises(InvalidArgumentError, match=r"roles contains 'hidden.V', which are not among the arrays"):
        engine.save_parameter_set("mlp", {"hidden.W": np.ones(2)}, roles={"hidden.V": "trainable"})

    assert registry.parameter_sets == {}


def test_tag_parameter_set_request(engine, registry):
    tagged = engine.tag_parameter_set("ps-1", add=["best"], remove=["latest"], exclusive_in_session=True)

    assert list(tagged.tags) == ["best"]
    assert registry.requests == [
        model_registry_pb2.TagParameterSetRequest(
            id="ps-1", add_tags=["best"], remove_tags=["latest"], exclusive_in_session=True
        )
    ]


def test_register_model_hyperparameters_and_timeout(engine, registry):
    version = engine.register_model(
        "mlp",
        "def build(h): ...",
        description="two layers",
        default_hyperparameters={"hidden_units": 128, "act": "relu"},
    )

    assert version.created
    request = registry.requests[0]
    assert request.source == "def build(h): ..."
    assert dict(request.default_hyperparameters) == {"hidden_units": 128.0, "act": "relu"}
    # The engine's timeout is 10 s, but registration allows the registry at least 300 s.
    assert registry.register_time_remaining_s > 200


def test_register_model_rejects_numpy_scalar(engine, registry):
    with pytest.raises(InvalidArgumentError, match=r"default_hyperparameters must contain only JSON-like values"):
        engine.register_model("mlp", "", default_hyperparameters={"hidden_units": np.int64(128)})

    assert registry.requests == []
