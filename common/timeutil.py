"""Conversions between protobuf timestamps and the float seconds stored in SQLite."""

from google.protobuf import timestamp_pb2


def to_timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromNanoseconds(int(seconds * 1e9))
    return timestamp
