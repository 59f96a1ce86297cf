from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class CollectGarbageRequest(_message.Message):
    __slots__ = ("dry_run",)
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    def __init__(self, dry_run: _Optional[bool] = ...) -> None: ...

class CollectGarbageResponse(_message.Message):
    __slots__ = ("orphan_blobs", "incomplete_writes", "pending_deletions_completed", "pending_deletions_remaining")
    ORPHAN_BLOBS_FIELD_NUMBER: _ClassVar[int]
    INCOMPLETE_WRITES_FIELD_NUMBER: _ClassVar[int]
    PENDING_DELETIONS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    PENDING_DELETIONS_REMAINING_FIELD_NUMBER: _ClassVar[int]
    orphan_blobs: int
    incomplete_writes: int
    pending_deletions_completed: int
    pending_deletions_remaining: int
    def __init__(self, orphan_blobs: _Optional[int] = ..., incomplete_writes: _Optional[int] = ..., pending_deletions_completed: _Optional[int] = ..., pending_deletions_remaining: _Optional[int] = ...) -> None: ...
