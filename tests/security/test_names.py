"""Names, versions, tags and ids that try to address storage outside their own prefix."""

import pathlib

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lasagne_engine.blobstore import LocalBlobStore
from lasagne_engine.data_service.store import blob_key
from lasagne_engine.errors import InvalidArgument
from lasagne_engine.model_registry.records import array_key, model_source_key, validate_parameter_set_id
from lasagne_engine.names import parse_ref, validate_name
from lasagne_engine.v1 import data_service_pb2, model_registry_pb2

from .services import MODEL_NAME, save_frames, start_services, upload_frames

TRAVERSALS = {
    "dot-dot": "..",
    "dot": ".",
    "parent-path": "../escaped",
    "deep-parent": "../../../../etc/passwd",
    "slash": "a/b",
    "absolute": "/tmp/escaped",
    "backslash": "..\\escaped",
    "percent-dot": "%2e%2e",
    "percent-slash": "a%2fb",
    "nul": "a\x00b",
    "nul-only": "\x00",
    "newline": "a\nb",
    "space": "a b",
    "fullwidth-dots": "\uff0e\uff0e",
    "non-ascii": "na\u00efve",
    "too-long": "x" * 129,
    "very-long": "y" * 100_000,
    "empty": "",
}
CASES = list(TRAVERSALS.items())


def shown(value: str) -> str:
    """The part of a rejected value that the error message shows, as Python's repr writes it."""
    return repr(value[:20])[1:-1]


@pytest.fixture(scope="module")
def services(tmp_path_factory, registry_template):
    running = start_services(tmp_path_factory.mktemp("names"), registry_template)
    running.upload_dataset("kept", {"x": np.arange(10, dtype=np.int32)})
    running.save_parameter_set({"w": np.ones((2, 3), dtype=np.float32)})
    yield running
    running.stop()


def assert_invalid(raised, value: str) -> None:
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    if value:
        assert shown(value) in raised.value.details()


@pytest.mark.parametrize(("case", "name"), CASES, ids=[case for case, _ in CASES])
class TestTraversal:
    def test_dataset_name(self, services, case, name):
        with pytest.raises(grpc.RpcError) as raised:
            services.data_stub.UploadDataset(upload_frames(name, {"x": np.zeros(3)}), timeout=10)

        assert_invalid(raised, name)

    def test_dataset_array_name(self, services, case, name):
        with pytest.raises(grpc.RpcError) as raised:
            services.data_stub.UploadDataset(upload_frames("fine", {name: np.zeros(3)}), timeout=10)

        assert_invalid(raised, name)

    @pytest.mark.parametrize("suffix", ["", "@1"])
    def test_dataset_ref(self, services, case, name, suffix):
        request = data_service_pb2.DescribeDatasetRequest(ref=name + suffix)
        with pytest.raises(grpc.RpcError) as raised:
            services.data_stub.DescribeDataset(request, timeout=10)

        assert_invalid(raised, name)

    def test_dataset_version(self, services, case, name):
        request = data_service_pb2.DeleteDatasetRequest(ref=f"kept@{name}")
        with pytest.raises(grpc.RpcError) as raised:
            services.data_stub.DeleteDataset(request, timeout=10)

        assert_invalid(raised, f"kept@{name}")

    def test_download_array_name(self, services, case, name):
        request = data_service_pb2.DownloadArrayRequest(ref="kept@1", array=name)
        with pytest.raises(grpc.RpcError) as raised:
            list(services.data_stub.DownloadArray(request, timeout=10))

        assert_invalid(raised, name)

    def test_model_name(self, services, case, name):
        request = model_registry_pb2.RegisterModelRequest(name=name, source="def build(h):\n    pass\n")
        with pytest.raises(grpc.RpcError) as raised:
            services.registry_stub.RegisterModel(request, timeout=10)

        assert_invalid(raised, name)

    def test_model_ref(self, services, case, name):
        with pytest.raises(grpc.RpcError) as raised:
            services.registry_stub.GetModel(model_registry_pb2.GetModelRequest(ref=f"{MODEL_NAME}@{name}"), timeout=10)

        assert_invalid(raised, f"{MODEL_NAME}@{name}")

    def test_parameter_set_tag(self, services, case, name):
        info = model_registry_pb2.ParameterSetInfo(model=MODEL_NAME, tags=[name])
        with pytest.raises(grpc.RpcError) as raised:
            services.registry_stub.SaveParameterSet(save_frames(info, {"w": np.zeros(2)}), timeout=10)

        assert_invalid(raised, name)

    def test_parameter_set_array_name(self, services, case, name):
        info = model_registry_pb2.ParameterSetInfo(model=MODEL_NAME)
        with pytest.raises(grpc.RpcError) as raised:
            services.registry_stub.SaveParameterSet(save_frames(info, {name: np.zeros(2)}), timeout=10)

        assert_invalid(raised, name)

    def test_parameter_set_id(self, services, case, name):
        for set_id in (name, f"ps-{name}"):
            with pytest.raises(grpc.RpcError) as raised:
                list(services.registry_stub.LoadParameterSet(model_registry_pb2.LoadParameterSetRequest(id=set_id)))

            assert_invalid(raised, set_id)

    def test_tagging_with_the_name(self, services, case, name):
        set_id = next(iter(services.parameter_sets))
        request = model_registry_pb2.TagParameterSetRequest(id=set_id, add_tags=[name])
        with pytest.raises(grpc.RpcError) as raised:
            services.registry_stub.TagParameterSet(request, timeout=10)

        assert_invalid(raised, name)


def test_nothing_escaped_and_everything_kept(services):
    services.assert_intact()

    assert services.files_outside_blob_roots() == []
    assert not list(services.root.rglob("*escaped*"))
    assert not list(pathlib.Path("/tmp").glob("escaped"))


class TestKeyProperties:
    @given(st.text(max_size=200))
    def test_valid_name_stays_one_key_component(self, name):
        try:
            validate_name(name, kind="dataset")
        except InvalidArgument:
            return

        for key in (blob_key(name, "0" * 32, name), model_source_key(name, 1), array_key("ps-0123456789ab", name)):
            parts = pathlib.PurePosixPath(key).parts
            assert ".." not in parts
            assert "." not in parts
            assert not pathlib.PurePosixPath(key).is_absolute()
        assert "/" not in name
        assert "\x00" not in name

    @given(st.text(max_size=60), st.text(max_size=20))
    def test_ref_parses_to_valid_name_and_positive_version(self, name, version):
        try:
            ref = parse_ref(f"{name}@{version}", kind="model")
        except InvalidArgument as error:
            assert "reference" in str(error) or "name" in str(error)
            return

        assert validate_name(ref.name, kind="model") == ref.name
        assert ref.version >= 1

    @given(st.text(max_size=40))
    def test_parameter_set_id_is_fixed_form(self, set_id):
        try:
            validate_parameter_set_id(set_id)
        except InvalidArgument:
            return

        assert len(set_id) == 15
        assert set_id.startswith("ps-")

    @given(st.text(alphabet=st.sampled_from("./ab\\%2e\x00"), max_size=12))
    def test_local_blob_store_keeps_keys_inside(self, tmp_path_factory, key):
        root = tmp_path_factory.mktemp("blobs", numbered=True)
        store = LocalBlobStore(root)
        try:
            path = store._path(key)
        except (ValueError, KeyError):
            return

        assert root.resolve() in path.parents
