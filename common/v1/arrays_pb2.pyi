from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArrayHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes", "sha256", "role")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    sha256: str
    role: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., sha256: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class ArrayFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ArrayHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[ArrayHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadEnd(_message.Message):
    __slots__ = ("array_count",)
    ARRAY_COUNT_FIELD_NUMBER: _ClassVar[int]
    array_count: int
    def __init__(self, array_count: _Optional[int] = ...) -> None: ...
