import numpy as np

from lasagne_engine.v1 import model_registry_pb2

from .helpers import load_arrays, save_frames


def test_restart_keeps_everything(start_registry, model_source):
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, dtype=np.float64)}
    first = start_registry()
    model = first.stub.RegisterModel(
        model_registry_pb2.RegisterModelRequest(name="digits", source=model_source, description="restart test"),
        timeout=120,
    )
    info = model_registry_pb2.ParameterSetInfo(model="digits", session_id="one", tags=["best"], metrics={"loss": 1.5})
    saved = first.stub.SaveParameterSet(save_frames(info, arrays, chunk_bytes=5), timeout=60)
    first.stop()
    # A blob left by a process that stopped mid-upload, which the restarted server removes.
    orphan = first.root / "blobs" / "parameter-sets" / "ps-00000000abcd" / "w"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"partial")

    second = start_registry(first.root)

    models = list(second.stub.ListModels(model_registry_pb2.ListModelsRequest()).models)
    assert [(m.name, m.version, m.description) for m in models] == [("digits", 1, "restart test")]
    assert models[0].signature == model.signature
    assert second.stub.GetModel(model_registry_pb2.GetModelRequest(ref="digits@1")).source == model_source
    sets = list(second.stub.ListParameterSets(model_registry_pb2.ListParameterSetsRequest(tag="best")).parameter_sets)
    assert sets == [saved]
    loaded = load_arrays(second.stub, saved.id)
    for name, original in arrays.items():
        np.testing.assert_array_equal(loaded[name], original)
    assert not orphan.exists()
