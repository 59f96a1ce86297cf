import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from lasagne_engine.v1 import arrays_pb2 as _arrays_pb2
from lasagne_engine.v1 import storage_pb2 as _storage_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArraySpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelSignature(_message.Message):
    __slots__ = ("input_shape", "input_dtype", "output_shape", "loss", "parameters", "parameter_bytes")
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    input_dtype: str
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    loss: str
    parameters: _containers.RepeatedCompositeFieldContainer[ArraySpec]
    parameter_bytes: int
    def __init__(self, input_shape: _Optional[_Iterable[int]] = ..., input_dtype: _Optional[str] = ..., output_shape: _Optional[_Iterable[int]] = ..., loss: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[ArraySpec, _Mapping]]] = ..., parameter_bytes: _Optional[int] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("name", "version", "source_sha256", "source", "description", "default_hyperparameters", "signature", "created_at", "created")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SHA256_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    source_sha256: str
    source: str
    description: str
    default_hyperparameters: _struct_pb2.Struct
    signature: ModelSignature
    created_at: _timestamp_pb2.Timestamp
    created: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., source_sha256: _Optional[str] = ..., source: _Optional[str] = ..., description: _Optional[str] = ..., default_hyperparameters: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., signature: _Optional[_Union[ModelSignature, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class RegisterModelRequest(_message.Message):
    __slots__ = ("name", "source", "description", "default_hyperparameters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    description: str
    default_hyperparameters: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., description: _Optional[str] = ..., default_hyperparameters: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("ref", "force", "allow_missing")
    REF_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MISSING_FIELD_NUMBER: _ClassVar[int]
    ref: str
    force: bool
    allow_missing: bool
    def __init__(self, ref: _Optional[str] = ..., force: _Optional[bool] = ..., allow_missing: _Optional[bool] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ("deleted_versions", "deleted_parameter_sets")
    DELETED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DELETED_PARAMETER_SETS_FIELD_NUMBER: _ClassVar[int]
    deleted_versions: _containers.RepeatedScalarFieldContainer[int]
    deleted_parameter_sets: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted_versions: _Optional[_Iterable[int]] = ..., deleted_parameter_sets: _Optional[_Iterable[str]] = ...) -> None: ...

class ParameterSet(_message.Message):
    __slots__ = ("id", "model", "model_version", "session_id", "epoch", "step", "metrics", "tags", "parent_id", "arrays", "total_bytes", "created_at", "held_by")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    HELD_BY_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    model_version: int
    session_id: str
    epoch: int
    step: int
    metrics: _containers.ScalarMap[str, float]
    tags: _containers.RepeatedScalarFieldContainer[str]
    parent_id: str
    arrays: _containers.RepeatedCompositeFieldContainer[_arrays_pb2.ArrayHeader]
    total_bytes: int
    created_at: _timestamp_pb2.Timestamp
    held_by: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ..., session_id: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., tags: _Optional[_Iterable[str]] = ..., parent_id: _Optional[str] = ..., arrays: _Optional[_Iterable[_Union[_arrays_pb2.ArrayHeader, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., held_by: _Optional[_Iterable[str]] = ...) -> None: ...

class ParameterSetInfo(_message.Message):
    __slots__ = ("model", "session_id", "epoch", "step", "metrics", "tags", "parent_id")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    session_id: str
    epoch: int
    step: int
    metrics: _containers.ScalarMap[str, float]
    tags: _containers.RepeatedScalarFieldContainer[str]
    parent_id: str
    def __init__(self, model: _Optional[str] = ..., session_id: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., tags: _Optional[_Iterable[str]] = ..., parent_id: _Optional[str] = ...) -> None: ...

class SaveParameterSetRequest(_message.Message):
    __slots__ = ("info", "header", "chunk", "end")
    INFO_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    info: ParameterSetInfo
    header: _arrays_pb2.ArrayHeader
    chunk: bytes
    end: _arrays_pb2.UploadEnd
    def __init__(self, info: _Optional[_Union[ParameterSetInfo, _Mapping]] = ..., header: _Optional[_Union[_arrays_pb2.ArrayHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ..., end: _Optional[_Union[_arrays_pb2.UploadEnd, _Mapping]] = ...) -> None: ...

class ListParameterSetsRequest(_message.Message):
    __slots__ = ("model", "session_id", "tag", "page_size", "page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    session_id: str
    tag: str
    page_size: int
    page_token: str
    def __init__(self, model: _Optional[str] = ..., session_id: _Optional[str] = ..., tag: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListParameterSetsResponse(_message.Message):
    __slots__ = ("parameter_sets", "next_page_token")
    PARAMETER_SETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parameter_sets: _containers.RepeatedCompositeFieldContainer[ParameterSet]
    next_page_token: str
    def __init__(self, parameter_sets: _Optional[_Iterable[_Union[ParameterSet, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetParameterSetRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class LoadParameterSetRequest(_message.Message):
    __slots__ = ("id", "names", "chunk_bytes", "start_array", "start_offset")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    START_ARRAY_FIELD_NUMBER: _ClassVar[int]
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    id: str
    names: _containers.RepeatedScalarFieldContainer[str]
    chunk_bytes: int
    start_array: str
    start_offset: int
    def __init__(self, id: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., chunk_bytes: _Optional[int] = ..., start_array: _Optional[str] = ..., start_offset: _Optional[int] = ...) -> None: ...

class DeleteParameterSetRequest(_message.Message):
    __slots__ = ("id", "allow_missing")
    ID_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MISSING_FIELD_NUMBER: _ClassVar[int]
    id: str
    allow_missing: bool
    def __init__(self, id: _Optional[str] = ..., allow_missing: _Optional[bool] = ...) -> None: ...

class DeleteParameterSetResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class TagParameterSetRequest(_message.Message):
    __slots__ = ("id", "add_tags", "remove_tags", "exclusive_in_session")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADD_TAGS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_TAGS_FIELD_NUMBER: _ClassVar[int]
    EXCLUSIVE_IN_SESSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    add_tags: _containers.RepeatedScalarFieldContainer[str]
    remove_tags: _containers.RepeatedScalarFieldContainer[str]
    exclusive_in_session: bool
    def __init__(self, id: _Optional[str] = ..., add_tags: _Optional[_Iterable[str]] = ..., remove_tags: _Optional[_Iterable[str]] = ..., exclusive_in_session: _Optional[bool] = ...) -> None: ...

class HoldParameterSetRequest(_message.Message):
    __slots__ = ("id", "session_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    session_id: str
    def __init__(self, id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class ParameterSetHold(_message.Message):
    __slots__ = ("id", "session_id", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    session_id: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., session_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReleaseParameterSetRequest(_message.Message):
    __slots__ = ("id", "session_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    session_id: str
    def __init__(self, id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class ReleaseParameterSetResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...
