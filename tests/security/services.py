"""A registry and a data service on 127.0.0.1 with known contents, and a check that the contents are intact."""

import dataclasses
import hashlib
import pathlib
import shutil
import sqlite3

import grpc
import numpy as np

from lasagne_engine import rpc
from lasagne_engine.arrays import ArrayBuffer, header_for, iter_chunks
from lasagne_engine.config import StreamLimits
from lasagne_engine.data_service import create_server as create_data_server
from lasagne_engine.model_registry import create_server as create_registry_server
from lasagne_engine.v1 import (
    arrays_pb2,
    data_service_pb2,
    data_service_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
)

EXAMPLE_MODEL = pathlib.Path(__file__).parents[2] / "clients" / "examples" / "digits_mlp.py"
MODEL_NAME = "digits"


def register_template(root: pathlib.Path, compile_cache: pathlib.Path) -> pathlib.Path:
    """Create a registry root where model 'digits' version 1 is registered, for tests to copy."""
    server = create_registry_server("127.0.0.1:0", root=root, compile_cache=compile_cache, limits=StreamLimits())
    server.start()
    try:
        with rpc.client_channel(server.address, StreamLimits()) as channel:
            model_registry_pb2_grpc.ModelRegistryStub(channel).RegisterModel(
                model_registry_pb2.RegisterModelRequest(name=MODEL_NAME, source=EXAMPLE_MODEL.read_text()), timeout=300
            )
    finally:
        server.stop(grace_s=None)
    return root


def copy_registry(source: pathlib.Path, destination: pathlib.Path) -> None:
    """Copy a registry root; SQLite's backup API copies the database whole."""
    destination.mkdir(parents=True)
    original = sqlite3.connect(source / "registry.sqlite3")
    copy = sqlite3.connect(destination / "registry.sqlite3")
    try:
        original.backup(copy)
    finally:
        original.close()
        copy.close()
    shutil.copytree(source / "blobs", destination / "blobs")


def save_frames(info: model_registry_pb2.ParameterSetInfo, arrays: dict[str, np.ndarray], *, chunk_bytes: int = 4096):
    yield model_registry_pb2.SaveParameterSetRequest(info=info)
    for name, array in arrays.items():
        yield model_registry_pb2.SaveParameterSetRequest(header=header_for(name, array, role="trainable"))
        for chunk in iter_chunks(array, chunk_bytes):
            yield model_registry_pb2.SaveParameterSetRequest(chunk=chunk)
    yield model_registry_pb2.SaveParameterSetRequest(end=arrays_pb2.UploadEnd(array_count=len(arrays)))


def upload_frames(name: str, arrays: dict[str, np.ndarray], *, chunk_bytes: int = 4096):
    yield data_service_pb2.UploadDatasetRequest(info=data_service_pb2.DatasetInfo(name=name))
    for array_name, array in arrays.items():
        yield data_service_pb2.UploadDatasetRequest(header=header_for(array_name, array))
        for chunk in iter_chunks(array, chunk_bytes):
            yield data_service_pb2.UploadDatasetRequest(chunk=chunk)
    yield data_service_pb2.UploadDatasetRequest(end=arrays_pb2.UploadEnd(array_count=len(arrays)))


def receive_arrays(frames) -> dict[str, np.ndarray]:
    """Assemble a stream of array frames, verifying each array against its header's sha256."""
    arrays: dict[str, np.ndarray] = {}
    buffer = None
    for frame in frames:
        if frame.WhichOneof("frame") == "header":
            if buffer is not None:
                arrays[buffer.receiver.header.name] = buffer.finish()
            buffer = ArrayBuffer(frame.header)
        else:
            buffer.receiver.add(frame.chunk)
    if buffer is not None:
        arrays[buffer.receiver.header.name] = buffer.finish()
    return arrays


def sha256_hex(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@dataclasses.dataclass
class Services:
    """A registry and a data service over copies of a template, with stubs and an inventory of their contents."""

    root: pathlib.Path
    registry: rpc.Server
    data: rpc.Server
    registry_channel: grpc.Channel
    data_channel: grpc.Channel
    # Every object stored through this class, with the sha256 of each array it contains.
    datasets: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    parameter_sets: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    model_source_sha256: str = ""

    @property
    def registry_stub(self) -> model_registry_pb2_grpc.ModelRegistryStub:
        return model_registry_pb2_grpc.ModelRegistryStub(self.registry_channel)

    @property
    def data_stub(self) -> data_service_pb2_grpc.DataServiceStub:
        return data_service_pb2_grpc.DataServiceStub(self.data_channel)

    def upload_dataset(self, name: str, arrays: dict[str, np.ndarray]) -> str:
        version = self.data_stub.UploadDataset(upload_frames(name, arrays), timeout=30)
        ref = f"{version.name}@{version.version}"
        self.datasets[ref] = {array_name: sha256_hex(array) for array_name, array in arrays.items()}
        return ref

    def save_parameter_set(self, arrays: dict[str, np.ndarray], **info) -> str:
        message = model_registry_pb2.ParameterSetInfo(model=MODEL_NAME, **info)
        saved = self.registry_stub.SaveParameterSet(save_frames(message, arrays), timeout=30)
        self.parameter_sets[saved.id] = {name: sha256_hex(array) for name, array in arrays.items()}
        return saved.id

    def assert_intact(self) -> None:
        """Check that every object stored through this class is still listed and has its bytes."""
        listed = {f"{d.name}@{d.version}" for d in self._all_dataset_versions()}
        for ref, digests in self.datasets.items():
            assert ref in listed, f"dataset {ref} is no longer listed"
            for array_name, digest in digests.items():
                request = data_service_pb2.DownloadArrayRequest(ref=ref, array=array_name)
                array = receive_arrays(self.data_stub.DownloadArray(request, timeout=30))[array_name]
                assert sha256_hex(array) == digest, f"array {array_name!r} of {ref} changed"

        for set_id, digests in self.parameter_sets.items():
            request = model_registry_pb2.LoadParameterSetRequest(id=set_id)
            arrays = receive_arrays(self.registry_stub.LoadParameterSet(request, timeout=30))
            assert {name: sha256_hex(array) for name, array in arrays.items()} == digests, f"{set_id} changed"

        model = self.registry_stub.GetModel(model_registry_pb2.GetModelRequest(ref=f"{MODEL_NAME}@1"), timeout=30)
        assert hashlib.sha256(model.source.encode()).hexdigest() == model.source_sha256
        if self.model_source_sha256:
            assert model.source_sha256 == self.model_source_sha256

    def _all_dataset_versions(self):
        latest = self.data_stub.ListDatasets(data_service_pb2.ListDatasetsRequest(), timeout=30).datasets
        versions = []
        for dataset in latest:
            request = data_service_pb2.ListDatasetsRequest(name=dataset.name)
            versions.extend(self.data_stub.ListDatasets(request, timeout=30).datasets)
        return versions

    def files_outside_blob_roots(self) -> list[pathlib.Path]:
        """Files under the test's folder that are neither metadata nor inside a service's blob folder."""
        roots = [self.root / "registry", self.root / "data"]
        return sorted(
            path
            for path in self.root.rglob("*")
            if path.is_file() and not any(root in path.parents for root in roots)
        )

    def stop(self) -> None:
        self.registry_channel.close()
        self.data_channel.close()
        self.data.stop(grace_s=1.0)
        self.registry.stop(grace_s=1.0)


def start_services(root: pathlib.Path, template: pathlib.Path, limits: StreamLimits | None = None) -> Services:
    """Start a registry over a copy of ``template`` and an empty data service, under ``root``."""
    limits = limits or StreamLimits()
    copy_registry(template, root / "registry")
    registry = create_registry_server("127.0.0.1:0", root=root / "registry", limits=limits).start()
    data = create_data_server("127.0.0.1:0", root=root / "data", limits=limits).start()
    services = Services(
        root=root,
        registry=registry,
        data=data,
        registry_channel=rpc.client_channel(registry.address, limits),
        data_channel=rpc.client_channel(data.address, limits),
    )
    model = services.registry_stub.GetModel(model_registry_pb2.GetModelRequest(ref=f"{MODEL_NAME}@1"), timeout=30)
    services.model_source_sha256 = model.source_sha256
    return services
