import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from lasagne_engine.v1 import arrays_pb2 as _arrays_pb2
from lasagne_engine.v1 import storage_pb2 as _storage_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DatasetInfo(_message.Message):
    __slots__ = ("name", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class UploadDatasetRequest(_message.Message):
    __slots__ = ("info", "header", "chunk", "end")
    INFO_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    info: DatasetInfo
    header: _arrays_pb2.ArrayHeader
    chunk: bytes
    end: _arrays_pb2.UploadEnd
    def __init__(self, info: _Optional[_Union[DatasetInfo, _Mapping]] = ..., header: _Optional[_Union[_arrays_pb2.ArrayHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ..., end: _Optional[_Union[_arrays_pb2.UploadEnd, _Mapping]] = ...) -> None: ...

class DatasetVersion(_message.Message):
    __slots__ = ("name", "version", "description", "arrays", "total_bytes", "created_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    description: str
    arrays: _containers.RepeatedCompositeFieldContainer[_arrays_pb2.ArrayHeader]
    total_bytes: int
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., description: _Optional[str] = ..., arrays: _Optional[_Iterable[_Union[_arrays_pb2.ArrayHeader, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetVersion]
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetVersion, _Mapping]]] = ...) -> None: ...

class DescribeDatasetRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class DownloadArrayRequest(_message.Message):
    __slots__ = ("ref", "array", "start_offset", "chunk_bytes")
    REF_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    ref: str
    array: str
    start_offset: int
    chunk_bytes: int
    def __init__(self, ref: _Optional[str] = ..., array: _Optional[str] = ..., start_offset: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("ref", "allow_missing")
    REF_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MISSING_FIELD_NUMBER: _ClassVar[int]
    ref: str
    allow_missing: bool
    def __init__(self, ref: _Optional[str] = ..., allow_missing: _Optional[bool] = ...) -> None: ...

class DeleteDatasetResponse(_message.Message):
    __slots__ = ("deleted_versions",)
    DELETED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    deleted_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, deleted_versions: _Optional[_Iterable[int]] = ...) -> None: ...
