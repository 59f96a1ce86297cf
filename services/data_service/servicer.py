"""The gRPC edge of the data service: translates messages and maps domain errors to status codes."""

import dataclasses
import logging
from collections.abc import Iterable, Iterator

import grpc

from lasagne_engine import framing
from lasagne_engine.arrays import UploadLimits, check_upload_end
from lasagne_engine.config import StreamLimits
from lasagne_engine.data_service.store import ArrayRecord, DatasetRecord, DatasetStore
from lasagne_engine.errors import EngineError, InvalidArgument, grpc_errors
from lasagne_engine.timeutil import to_timestamp
from lasagne_engine.v1 import arrays_pb2, data_service_pb2, data_service_pb2_grpc, storage_pb2

__all__ = ["DataServiceServicer", "SERVICE_NAME"]

logger = logging.getLogger(__name__)

SERVICE_NAME = "lasagne_engine.v1.DataService"
# Room left in each message for the frame's own fields next to a chunk.
MESSAGE_OVERHEAD_BYTES = 1024
UPLOAD_CHUNK_TAG = framing.chunk_tag(data_service_pb2.UploadDatasetRequest.DESCRIPTOR.fields_by_name["chunk"].number)
DOWNLOAD_CHUNK_TAG = framing.chunk_tag(arrays_pb2.ArrayFrame.DESCRIPTOR.fields_by_name["chunk"].number)


class UploadCancelled(EngineError):
    """The client cancelled an upload stream or lost its connection before the stream ended."""

    code = grpc.StatusCode.CANCELLED


class DataServiceServicer(data_service_pb2_grpc.DataServiceServicer):
    """Serves ``lasagne_engine.v1.DataService`` from a :class:`DatasetStore`.

    Parameters
    ----------
    store : DatasetStore
        Where datasets are stored.
    limits : StreamLimits
        The default chunk size of downloads and the message size limit that caps it.
    """

    def __init__(self, store: DatasetStore, *, limits: StreamLimits):
        self.store = store
        self.limits = limits

    def add_to_server(self, grpc_server: grpc.Server) -> None:
        """Register this servicer's methods on ``grpc_server``, with chunk frames kept out of protobuf."""
        framing.add_servicer(
            grpc_server,
            data_service_pb2.DESCRIPTOR.services_by_name["DataService"],
            self,
            request_deserializers={
                "UploadDataset": framing.frame_deserializer(data_service_pb2.UploadDatasetRequest, UPLOAD_CHUNK_TAG)
            },
            response_serializers={"DownloadArray": framing.frame_serializer},
        )

    @grpc_errors
    def UploadDataset(self, request_iterator, context):
        frames = _receive(request_iterator)
        first = next(frames, None)
        if first is None or _frame_kind(first) != "info":
            kind = "no frame" if first is None else f"a {_frame_kind(first)!r} frame"
            raise InvalidArgument(
                f"UploadDataset received {kind} first; send an 'info' frame with the dataset name first."
            )

        with self.store.begin_upload(first.info.name, description=first.info.description) as upload:
            limits = UploadLimits(
                what=f"dataset {upload.name!r}",
                max_total_bytes=self.limits.max_dataset_bytes,
                total_setting="LASAGNE_ENGINE_MAX_DATASET_BYTES",
                max_chunk_bytes=self.limits.max_chunk_bytes,
            )
            end = None
            for frame in frames:
                kind = _frame_kind(frame)
                if end is not None:
                    raise InvalidArgument(
                        f"Upload of dataset {upload.name!r} received a {kind!r} frame after its end frame; "
                        "the end frame comes last."
                    )
                if kind == "chunk":
                    chunk = frame if isinstance(frame, memoryview) else frame.chunk
                    limits.check_chunk(chunk)
                    upload.write(chunk)
                elif kind == "header":
                    limits.check_header(frame.header)
                    upload.start_array(frame.header)
                elif kind == "end":
                    end = frame.end
                elif kind == "info":
                    raise InvalidArgument(
                        f"Upload of dataset {upload.name!r} received a second 'info' frame; "
                        "send one info frame, then a header and chunks for each array."
                    )
                else:
                    raise InvalidArgument(
                        f"Upload of dataset {upload.name!r} received a frame with no field set; "
                        "set one of info, header, chunk or end in each frame."
                    )
            check_upload_end(end, what=f"dataset {upload.name!r}", array_count=upload.finish_arrays())
            record = upload.commit()

        return _dataset_version(record)

    @grpc_errors
    def ListDatasets(self, request, context):
        records = self.store.list_datasets(request.name)
        return data_service_pb2.ListDatasetsResponse(datasets=[_dataset_version(record) for record in records])

    @grpc_errors
    def DescribeDataset(self, request, context):
        return _dataset_version(self.store.describe(request.ref))

    @grpc_errors
    def DownloadArray(self, request, context):
        chunk_bytes = self._chunk_bytes(request.chunk_bytes)
        array, chunks = self.store.read_array(
            request.ref, request.array, start_offset=request.start_offset, chunk_bytes=chunk_bytes
        )

        yield arrays_pb2.ArrayFrame(header=_array_header(array))
        for chunk in chunks:
            yield framing.encode_chunk(DOWNLOAD_CHUNK_TAG, chunk)

    @grpc_errors
    def DeleteDataset(self, request, context):
        versions = self.store.delete(request.ref, allow_missing=request.allow_missing)
        return data_service_pb2.DeleteDatasetResponse(deleted_versions=versions)

    @grpc_errors
    def CollectGarbage(self, request, context):
        report = self.store.collect_garbage(dry_run=request.dry_run)
        return storage_pb2.CollectGarbageResponse(**dataclasses.asdict(report))

    def _chunk_bytes(self, requested: int) -> int:
        if requested < 0:
            raise InvalidArgument(
                f"Invalid chunk_bytes {requested!r}: give a positive number of bytes, or 0 for the server default."
            )
        chunk_bytes = requested or self.limits.chunk_bytes
        return min(chunk_bytes, self.limits.max_chunk_bytes, self.limits.max_message_bytes - MESSAGE_OVERHEAD_BYTES)


def _frame_kind(frame) -> str | None:
    # The upload deserializer hands chunk frames over as memoryviews of their bytes.
    if isinstance(frame, memoryview):
        return "chunk"
    return frame.WhichOneof("frame")


def _receive(request_iterator: Iterable) -> Iterator:
    # gRPC raises a bare RpcError from the request iterator when the client cancels or
    # disconnects. As a domain error it aborts the upload, which deletes its blobs, and is then
    # logged and reported as CANCELLED instead of an unexpected INTERNAL failure.
    try:
        yield from request_iterator
    except grpc.RpcError as error:
        raise UploadCancelled(
            "The client cancelled the upload or lost its connection before the stream ended; nothing was stored."
        ) from error


def _array_header(array: ArrayRecord) -> arrays_pb2.ArrayHeader:
    return arrays_pb2.ArrayHeader(
        name=array.name,
        dtype=array.dtype,
        shape=list(array.shape),
        nbytes=array.nbytes,
        sha256=array.sha256,
    )


def _dataset_version(record: DatasetRecord) -> data_service_pb2.DatasetVersion:
    return data_service_pb2.DatasetVersion(
        name=record.name,
        version=record.version,
        description=record.description,
        arrays=[_array_header(array) for array in record.arrays],
        total_bytes=record.total_bytes,
        created_at=to_timestamp(record.created_at),
    )
