"""Bulk array frames on the wire without protobuf's copies of their chunks.

A chunk frame (``ArrayFrame.chunk``, ``UploadDatasetRequest.chunk``, ``SaveParameterSetRequest.chunk``)
is a message with one bytes field. Building it as a protobuf message copies the chunk into the
message, and serializing it copies it again. Parsing one copies it in, and reading the field
copies it out. For chunks of about 1 MiB, these copies cost a quarter to half of a stream's throughput
in Python. So the bulk methods encode and decode chunk frames here, as the field's tag, its length
as a varint and the bytes, which is exactly the protobuf encoding of the message. Every other
frame (info, header) goes through protobuf as usual, so both ends stay wire-compatible with
plain protobuf stubs.

- :func:`encode_chunk` builds a chunk frame from a buffer with one copy.
- :func:`frame_serializer` serializes a message, or passes an encoded chunk frame through.
- :func:`frame_deserializer` returns a chunk frame's bytes as a ``memoryview`` of the received
  message, without a copy, and parses every other frame as a message.
- :func:`add_servicer` registers a servicer the way generated code does, with these
  (de)serializers for the methods given.
"""

from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

__all__ = ["add_servicer", "chunk_tag", "encode_chunk", "frame_deserializer", "frame_serializer"]

_LENGTH_DELIMITED = 2


def chunk_tag(field_number: int) -> bytes:
    """Return the tag of a length-delimited field, the first bytes of its encoding."""
    return _varint(field_number << 3 | _LENGTH_DELIMITED)


def encode_chunk(tag: bytes, data: bytes | memoryview) -> bytes:
    """Return the encoded frame whose only field, with tag ``tag``, holds ``data``.

    The result equals ``Message(chunk=bytes(data)).SerializeToString()``, built with one copy.
    """
    return b"".join((tag, _varint(len(data)), data))


def frame_serializer(frame: Any) -> bytes:
    """Serialize a protobuf message, or return an encoded chunk frame (``bytes``) unchanged."""
    if isinstance(frame, bytes):
        return frame
    return frame.SerializeToString()


def frame_deserializer(message_class: type, tag: bytes) -> Callable[[bytes], Any]:
    """Return a deserializer of a frame message whose chunk field has tag ``tag``.

    The deserializer returns a chunk frame as a ``memoryview`` of its bytes, and any other frame
    as a ``message_class`` instance.
    """
    tag_length = len(tag)

    def deserialize(data: bytes) -> Any:
        if data[:tag_length] == tag:
            length, start = _read_varint(data, tag_length)
            # Only a frame that contains nothing but the chunk takes the fast path. Protobuf parses
            # anything else, such as extra or unknown fields after the chunk.
            if length is not None and start + length == len(data):
                return memoryview(data)[start:]
        return message_class.FromString(data)

    return deserialize


def add_servicer(
    server: grpc.Server,
    service: ServiceDescriptor,
    servicer: Any,
    *,
    request_deserializers: Mapping[str, Callable[[bytes], Any]] | None = None,
    response_serializers: Mapping[str, Callable[[Any], bytes]] | None = None,
) -> None:
    """Register ``servicer``'s methods for ``service`` on ``server``, as generated code does.

    Parameters
    ----------
    server : grpc.Server
        A server not yet started.
    service : google.protobuf.descriptor.ServiceDescriptor
        The service, for example ``data_service_pb2.DESCRIPTOR.services_by_name["DataService"]``.
    servicer : object
        Has a method for each of the service's methods.
    request_deserializers, response_serializers : mapping of str to callable, optional
        Replacements for protobuf's ``FromString`` and ``SerializeToString``, by method name.
        Default: none.
    """
    request_deserializers = request_deserializers or {}
    response_serializers = response_serializers or {}
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        if method.client_streaming and method.server_streaming:
            make_handler = grpc.stream_stream_rpc_method_handler
        elif method.client_streaming:
            make_handler = grpc.stream_unary_rpc_method_handler
        elif method.server_streaming:
            make_handler = grpc.unary_stream_rpc_method_handler
        else:
            make_handler = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make_handler(
            getattr(servicer, method.name),
            request_deserializer=request_deserializers.get(method.name, request_class.FromString),
            response_serializer=response_serializers.get(method.name, response_class.SerializeToString),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, start: int) -> tuple[int | None, int]:
    value = 0
    shift = 0
    for position in range(start, min(start + 10, len(data))):
        byte = data[position]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position + 1
        shift += 7
    return None, start
