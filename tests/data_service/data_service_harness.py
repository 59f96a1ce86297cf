"""A data service on 127.0.0.1 for the tests, and helpers that build upload streams."""

import contextlib
import dataclasses
import hashlib
import pathlib
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lasagne_engine.blobstore import BlobStore
from lasagne_engine.blobstore.ownership import OWNER_MARKER_NAME
from lasagne_engine.config import StreamLimits
from lasagne_engine.data_service import create_server
from lasagne_engine.rpc import Server, insecure_channel
from lasagne_engine.v1 import arrays_pb2, data_service_pb2, data_service_pb2_grpc


@dataclasses.dataclass
class RunningDataService:
    server: Server
    root: pathlib.Path
    channel: grpc.Channel
    stub: data_service_pb2_grpc.DataServiceStub
    health: health_pb2_grpc.HealthStub

    @property
    def blob_root(self) -> pathlib.Path:
        """Folder of the default local blob store."""
        return self.root / "blobs"

    def dataset_files(self) -> list[pathlib.Path]:
        """Committed blob files under the store's ``datasets/`` prefix, without its owner marker."""
        return sorted(
            path
            for path in (self.blob_root / "datasets").rglob("*")
            if path.is_file() and path.name != OWNER_MARKER_NAME
        )

    def partial_files(self) -> list[pathlib.Path]:
        """Temporary files of blob writes in progress."""
        return sorted((self.blob_root / ".incoming").glob("blob-*"))

    def assert_serving(self) -> None:
        reply = self.health.Check(health_pb2.HealthCheckRequest(service="lasagne_engine.v1.DataService"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        self.stub.ListDatasets(data_service_pb2.ListDatasetsRequest(), timeout=5)


@contextlib.contextmanager
def serve(
    root: pathlib.Path, *, limits: StreamLimits | None = None, blob_store: BlobStore | None = None
) -> Iterator[RunningDataService]:
    """Start a data service on a free port of 127.0.0.1, connect to it, and stop it afterwards."""
    limits = limits or StreamLimits()
    server = create_server("127.0.0.1:0", root=root, blob_store=blob_store, limits=limits).start()
    channel = insecure_channel(server.address, limits)
    try:
        yield RunningDataService(
            server=server,
            root=root,
            channel=channel,
            stub=data_service_pb2_grpc.DataServiceStub(channel),
            health=health_pb2_grpc.HealthStub(channel),
        )
    finally:
        channel.close()
        server.stop(grace_s=1.0)


def sha256_hex(array: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(array).tobytes()).hexdigest()


def header_of(name: str, array: np.ndarray, *, sha256: str = "", **overrides) -> arrays_pb2.ArrayHeader:
    """Build an array header from numpy's own description of ``array``, with ``overrides`` replacing fields."""
    fields = {"name": name, "dtype": array.dtype.str, "shape": list(array.shape), "nbytes": array.nbytes}
    fields.update(overrides)
    return arrays_pb2.ArrayHeader(sha256=sha256, **fields)


def split_bytes(data: bytes, chunk_bytes: int) -> list[bytes]:
    return [data[offset : offset + chunk_bytes] for offset in range(0, len(data), chunk_bytes)]


def info_frame(name: str, description: str = "") -> data_service_pb2.UploadDatasetRequest:
    return data_service_pb2.UploadDatasetRequest(info=data_service_pb2.DatasetInfo(name=name, description=description))


def header_frame(header: arrays_pb2.ArrayHeader) -> data_service_pb2.UploadDatasetRequest:
    return data_service_pb2.UploadDatasetRequest(header=header)


def chunk_frame(chunk: bytes) -> data_service_pb2.UploadDatasetRequest:
    return data_service_pb2.UploadDatasetRequest(chunk=chunk)


def end_frame(array_count: int) -> data_service_pb2.UploadDatasetRequest:
    return data_service_pb2.UploadDatasetRequest(end=arrays_pb2.UploadEnd(array_count=array_count))


def upload_frames(
    name: str, arrays: dict[str, np.ndarray], *, chunk_bytes: int = 1 << 16, description: str = "", with_sha256=True
) -> list[data_service_pb2.UploadDatasetRequest]:
    """The frames of a well-formed upload of ``arrays``."""
    frames = [info_frame(name, description)]
    for array_name, array in arrays.items():
        # np.asarray keeps a 0-d array 0-d, where np.ascontiguousarray would give it shape (1,).
        array = np.asarray(array, order="C")
        frames.append(header_frame(header_of(array_name, array, sha256=sha256_hex(array) if with_sha256 else "")))
        frames.extend(chunk_frame(chunk) for chunk in split_bytes(array.tobytes(), chunk_bytes))
    frames.append(end_frame(len(arrays)))
    return frames


def upload(
    service: RunningDataService, name: str, arrays: dict[str, np.ndarray], **options
) -> data_service_pb2.DatasetVersion:
    return service.stub.UploadDataset(iter(upload_frames(name, arrays, **options)), timeout=30)


def download(
    service: RunningDataService, ref: str, array: str, *, start_offset: int = 0, chunk_bytes: int = 0
) -> tuple[arrays_pb2.ArrayHeader, list[bytes]]:
    """Download one array and return its header and the chunks as received."""
    request = data_service_pb2.DownloadArrayRequest(
        ref=ref, array=array, start_offset=start_offset, chunk_bytes=chunk_bytes
    )
    frames = list(service.stub.DownloadArray(request, timeout=30))
    assert frames[0].WhichOneof("frame") == "header"
    assert all(frame.WhichOneof("frame") == "chunk" for frame in frames[1:])
    return frames[0].header, [frame.chunk for frame in frames[1:]]


def assert_rejected(error_info, code: grpc.StatusCode, *fragments: str) -> None:
    """Assert that the RpcError in ``error_info`` has ``code`` and every fragment in its details."""
    assert error_info.value.code() == code, error_info.value.details()
    for fragment in fragments:
        assert fragment in error_info.value.details()


def wait_until(condition: Callable[[], bool], *, timeout_s: float = 10.0) -> bool:
    """Poll ``condition`` every 10 ms until it is true or ``timeout_s`` passes, and return its last value."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
