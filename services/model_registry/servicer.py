"""The gRPC edge of the model registry: translates messages to and from the store's records."""

import base64
import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterator

import grpc
from google.protobuf import json_format, struct_pb2

from lasagne_engine import framing
from lasagne_engine.arrays import UploadLimits, check_upload_end
from lasagne_engine.config import StreamLimits
from lasagne_engine.errors import InvalidArgument, grpc_errors
from lasagne_engine.model_registry import records, store
from lasagne_engine.model_registry.uploads import ParameterSetUpload
from lasagne_engine.timeutil import to_timestamp
from lasagne_engine.v1 import arrays_pb2, model_registry_pb2, model_registry_pb2_grpc, storage_pb2

# Most parameter sets in one ListParameterSets response. With a dozen arrays each, a set's
# message takes roughly 2 KB, so a page stays far below the default 16 MiB message limit.
MAX_PAGE_SIZE = 1000
# How long a stream that ended without frames may take to show up as cancelled.
CANCEL_SETTLE_S = 0.2

logger = logging.getLogger(__name__)

# Bytes a chunk leaves free below the message limit for the frame's own fields.
FRAME_OVERHEAD_BYTES = 1024
SAVE_CHUNK_TAG = framing.chunk_tag(model_registry_pb2.SaveParameterSetRequest.DESCRIPTOR.fields_by_name["chunk"].number)
LOAD_CHUNK_TAG = framing.chunk_tag(arrays_pb2.ArrayFrame.DESCRIPTOR.fields_by_name["chunk"].number)


class ModelRegistryServicer(model_registry_pb2_grpc.ModelRegistryServicer):
    """Serves ``lasagne_engine.v1.ModelRegistry`` from a :class:`~lasagne_engine.model_registry.store.RegistryStore`.

    Parameters
    ----------
    registry_store : RegistryStore
        Where models and parameter sets are kept.
    limits : StreamLimits
        The server's message limits; ``chunk_bytes`` is the default chunk size of LoadParameterSet.
    """

    def __init__(self, registry_store: store.RegistryStore, limits: StreamLimits):
        self.store = registry_store
        self.limits = limits

    def close(self) -> None:
        """Close the store. Call it after the server has stopped."""
        self.store.close()

    def add_to_server(self, grpc_server: grpc.Server) -> None:
        """Register this servicer's methods on ``grpc_server``, with chunk frames kept out of protobuf."""
        framing.add_servicer(
            grpc_server,
            model_registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"],
            self,
            request_deserializers={
                "SaveParameterSet": framing.frame_deserializer(model_registry_pb2.SaveParameterSetRequest, SAVE_CHUNK_TAG)
            },
            response_serializers={"LoadParameterSet": framing.frame_serializer},
        )

    @grpc_errors
    def RegisterModel(self, request, context):
        model = self.store.register_model(
            request.name,
            request.source,
            description=request.description,
            hyperparameters=json_format.MessageToDict(request.default_hyperparameters),
        )
        return _model_version_message(model)

    @grpc_errors
    def ListModels(self, request, context):
        models = self.store.list_models(request.name)
        return model_registry_pb2.ListModelsResponse(models=[_model_version_message(model) for model in models])

    @grpc_errors
    def GetModel(self, request, context):
        return _model_version_message(self.store.get_model(request.ref))

    @grpc_errors
    def SaveParameterSet(self, request_iterator, context):
        try:
            first = next(request_iterator, None)
            cancelled = first is None and _ends_cancelled(context)
        except grpc.RpcError:
            # grpcio 1.85's request iterator raises a bare RpcError once the client cancels or disconnects.
            cancelled = True
        if cancelled:
            logger.info("SaveParameterSet was cancelled by %s before its first frame", context.peer())
            context.abort(grpc.StatusCode.CANCELLED, "SaveParameterSet was cancelled before its first frame.")
        if first is None or _frame_kind(first) != "info":
            received = "an empty stream" if first is None else f"a {_frame_kind(first)!r} frame"
            raise InvalidArgument(
                f"SaveParameterSet received {received} first; send a ParameterSetInfo frame first, "
                "then each array's header and chunks."
            )
        info = first.info

        upload = self.store.start_parameter_set(
            records.ParameterSetInfo(
                model=info.model,
                session_id=info.session_id,
                epoch=info.epoch,
                step=info.step,
                metrics=dict(info.metrics),
                tags=tuple(info.tags),
                parent_id=info.parent_id,
            )
        )
        with upload:
            limits = UploadLimits(
                what=f"parameter set {upload.id}",
                max_total_bytes=self.limits.max_parameter_set_bytes,
                total_setting="LASAGNE_ENGINE_MAX_PARAMETER_SET_BYTES",
                max_chunk_bytes=self.limits.max_chunk_bytes,
            )
            try:
                _receive_arrays(upload, request_iterator, limits)
            except grpc.RpcError:
                # grpcio 1.85's request iterator raises a bare RpcError once the client cancels or disconnects.
                upload.abort(reason="the client cancelled the stream")
                context.abort(grpc.StatusCode.CANCELLED, f"SaveParameterSet of {upload.id} was cancelled.")
            if not context.is_active():
                upload.abort(reason="the client left before the stream ended")
                context.abort(grpc.StatusCode.CANCELLED, f"SaveParameterSet of {upload.id} was cancelled.")
            parameter_set = upload.commit()
        return _parameter_set_message(parameter_set)

    @grpc_errors
    def ListParameterSets(self, request, context):
        if request.page_size < 0:
            raise InvalidArgument(
                f"Invalid page_size {request.page_size}; give a positive number of sets, or 0 for the "
                f"server's default of {MAX_PAGE_SIZE}."
            )
        filters = (request.model, request.session_id, request.tag)
        after = _decode_page_token(request.page_token, filters)
        parameter_sets, next_after = self.store.list_parameter_sets_page(
            model=request.model, session_id=request.session_id, tag=request.tag, after=after,
            limit=min(request.page_size or MAX_PAGE_SIZE, MAX_PAGE_SIZE),
        )
        return model_registry_pb2.ListParameterSetsResponse(
            parameter_sets=[_parameter_set_message(parameter_set) for parameter_set in parameter_sets],
            next_page_token="" if next_after is None else _encode_page_token(next_after, filters),
        )

    @grpc_errors
    def GetParameterSet(self, request, context):
        return _parameter_set_message(self.store.get_parameter_set(request.id))

    @grpc_errors
    def LoadParameterSet(self, request, context):
        chunk_bytes = request.chunk_bytes or self.limits.chunk_bytes
        max_chunk_bytes = min(self.limits.max_chunk_bytes, self.limits.max_message_bytes - FRAME_OVERHEAD_BYTES)
        if not 0 < chunk_bytes <= max_chunk_bytes:
            raise InvalidArgument(
                f"LoadParameterSet chunk_bytes {request.chunk_bytes} is out of range; "
                f"use 1 to {max_chunk_bytes}, or 0 for the server's default of {self.limits.chunk_bytes}."
            )
        arrays = self.store.select_arrays(
            request.id, request.names, start_array=request.start_array, start_offset=request.start_offset
        )
        if request.start_array:
            logger.info(
                "LoadParameterSet of %s resumes at byte %d of array %r for %s",
                request.id,
                request.start_offset,
                request.start_array,
                context.peer(),
            )

        # Only the first array of a resumed load starts past byte 0.
        start_offset = request.start_offset
        for array in arrays:
            yield arrays_pb2.ArrayFrame(header=_array_header_message(array))
            for chunk in self.store.read_array(request.id, array, chunk_bytes, start_offset=start_offset):
                yield framing.encode_chunk(LOAD_CHUNK_TAG, chunk)
            start_offset = 0

    @grpc_errors
    def DeleteParameterSet(self, request, context):
        deleted = self.store.delete_parameter_set(request.id, allow_missing=request.allow_missing)
        return model_registry_pb2.DeleteParameterSetResponse(deleted=deleted)

    @grpc_errors
    def DeleteModel(self, request, context):
        deleted = self.store.delete_model(request.ref, force=request.force, allow_missing=request.allow_missing)
        return model_registry_pb2.DeleteModelResponse(
            deleted_versions=deleted.versions, deleted_parameter_sets=deleted.parameter_set_ids
        )

    @grpc_errors
    def HoldParameterSet(self, request, context):
        hold = self.store.hold_parameter_set(request.id, request.session_id)
        message = model_registry_pb2.ParameterSetHold(id=hold.set_id, session_id=hold.session_id)
        message.created_at.CopyFrom(to_timestamp(hold.created_at))
        return message

    @grpc_errors
    def ReleaseParameterSet(self, request, context):
        released = self.store.release_parameter_set(request.id, request.session_id)
        return model_registry_pb2.ReleaseParameterSetResponse(released=released)

    @grpc_errors
    def CollectGarbage(self, request, context):
        report = self.store.collect_garbage(dry_run=request.dry_run)
        return storage_pb2.CollectGarbageResponse(**dataclasses.asdict(report))

    @grpc_errors
    def TagParameterSet(self, request, context):
        parameter_set = self.store.tag_parameter_set(
            request.id,
            add_tags=request.add_tags,
            remove_tags=request.remove_tags,
            exclusive_in_session=request.exclusive_in_session,
        )
        return _parameter_set_message(parameter_set)


def _receive_arrays(
    upload: ParameterSetUpload, frames: Iterator[model_registry_pb2.SaveParameterSetRequest], limits: UploadLimits
) -> None:
    """Store the arrays of a save stream in ``upload``, and check that the stream closed with its end frame."""
    end = None
    for frame in frames:
        kind = _frame_kind(frame)
        if end is not None:
            raise InvalidArgument(
                f"Parameter set {upload.id} received a {kind!r} frame after its end frame; the end frame comes last."
            )
        if kind == "header":
            limits.check_header(frame.header)
            upload.begin_array(frame.header)
        elif kind == "chunk":
            chunk = frame if isinstance(frame, memoryview) else frame.chunk
            limits.check_chunk(chunk)
            upload.write(chunk)
        elif kind == "end":
            end = frame.end
        elif kind == "info":
            raise InvalidArgument(
                f"Parameter set {upload.id} received a second ParameterSetInfo frame; send it once, first."
            )
        else:
            raise InvalidArgument(
                f"Parameter set {upload.id} received a frame with none of info, header, chunk or end set."
            )
    check_upload_end(end, what=f"parameter set {upload.id}", array_count=upload.finish_arrays())


def _filters_digest(filters: tuple[str, ...]) -> str:
    return hashlib.sha256("\0".join(filters).encode()).hexdigest()[:16]


def _encode_page_token(after: int, filters: tuple[str, ...]) -> str:
    """Return an opaque token for the page after position ``after`` of the listing with ``filters``."""
    return base64.urlsafe_b64encode(f"{after}:{_filters_digest(filters)}".encode()).decode()


def _decode_page_token(token: str, filters: tuple[str, ...]) -> int:
    """Return the position a page token continues from, 0 for an empty token.

    Raises
    ------
    InvalidArgument
        If the token is malformed or was issued for other filters.
    """
    if not token:
        return 0
    try:
        position, digest = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        after = int(position)
        if after < 0:
            raise ValueError(f"negative position {after}")
    except (ValueError, UnicodeError) as error:
        raise InvalidArgument(
            f"Invalid page_token {token!r}; pass the next_page_token of the previous response unchanged."
        ) from error
    if digest != _filters_digest(filters):
        raise InvalidArgument(
            f"page_token {token!r} belongs to a listing with other filters; keep model, session_id and tag "
            "the same for every page, or start again without a token."
        )
    return after


def _frame_kind(frame) -> str | None:
    # The save deserializer hands chunk frames over as memoryviews of their bytes.
    if isinstance(frame, memoryview):
        return "chunk"
    return frame.WhichOneof("frame")


def _model_version_message(model: records.ModelVersion) -> model_registry_pb2.ModelVersion:
    hyperparameters = struct_pb2.Struct()
    hyperparameters.update(model.default_hyperparameters)
    signature = model.signature
    message = model_registry_pb2.ModelVersion(
        name=model.name,
        version=model.version,
        source_sha256=model.source_sha256,
        source=model.source or "",
        description=model.description,
        default_hyperparameters=hyperparameters,
        signature=model_registry_pb2.ModelSignature(
            input_shape=signature["input_shape"],
            input_dtype=signature["input_dtype"],
            output_shape=signature["output_shape"],
            loss=signature["loss"],
            parameters=[
                model_registry_pb2.ArraySpec(name=parameter["name"], dtype=parameter["dtype"], shape=parameter["shape"])
                for parameter in signature["parameters"]
            ],
            parameter_bytes=signature["parameter_bytes"],
        ),
        created=model.created,
    )
    message.created_at.CopyFrom(to_timestamp(model.created_at))
    return message


def _array_header_message(array: records.ArrayRecord) -> arrays_pb2.ArrayHeader:
    return arrays_pb2.ArrayHeader(
        name=array.name,
        dtype=array.dtype,
        shape=list(array.shape),
        nbytes=array.nbytes,
        sha256=array.sha256,
        role=array.role,
    )


def _parameter_set_message(parameter_set: records.ParameterSet) -> model_registry_pb2.ParameterSet:
    message = model_registry_pb2.ParameterSet(
        id=parameter_set.id,
        model=parameter_set.model,
        model_version=parameter_set.model_version,
        session_id=parameter_set.session_id,
        epoch=parameter_set.epoch,
        step=parameter_set.step,
        metrics=parameter_set.metrics,
        tags=list(parameter_set.tags),
        parent_id=parameter_set.parent_id,
        arrays=[_array_header_message(array) for array in parameter_set.arrays],
        total_bytes=parameter_set.total_bytes,
        held_by=list(parameter_set.held_by),
    )
    message.created_at.CopyFrom(to_timestamp(parameter_set.created_at))
    return message


def _ends_cancelled(context) -> bool:
    """Tell whether a request stream that ended without frames did so because the client cancelled.

    grpcio can end the request iterator of a cancelled call as if the client had closed an
    empty stream, and mark the call inactive a moment later, so this waits up to
    ``CANCEL_SETTLE_S`` for that mark. A client that really sent an empty stream waits that long
    for its INVALID_ARGUMENT.
    """
    deadline = time.monotonic() + CANCEL_SETTLE_S
    while context.is_active():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True
