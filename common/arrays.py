"""Moving numpy arrays through gRPC streams as a header followed by chunks of raw bytes.

The sender describes each array with an ``ArrayHeader`` (name, dtype, shape, byte count, sha256)
and then sends its C-order bytes in chunks. The receiver checks every chunk against the header as
it arrives and writes it straight into its sink, a blob being stored or a preallocated array, so
neither side keeps a second copy of the array.
"""

import hashlib
import math
from collections.abc import Callable, Iterator

import numpy as np

from lasagne_engine.errors import IntegrityError, InvalidArgument, ResourceExhausted
from lasagne_engine.names import validate_name
from lasagne_engine.v1 import arrays_pb2

MAX_DIMENSIONS = 32
# Kinds of numpy dtype an array may have: bool, signed and unsigned integers, floats, complex.
SUPPORTED_DTYPE_KINDS = "biufc"


def canonical_dtype(dtype_text: str, *, array_name: str = "") -> np.dtype:
    """Parse a dtype string and return it with explicit little-endian byte order.

    Raises
    ------
    InvalidArgument
        If the string is not a numpy dtype, or the dtype is not boolean or numeric.
    """
    where = f" of array {array_name!r}" if array_name else ""
    try:
        dtype = np.dtype(dtype_text)
    except TypeError as error:
        raise InvalidArgument(
            f"Invalid dtype {dtype_text!r}{where}: use a numpy dtype string such as '<f4' or '<i8'."
        ) from error
    if dtype.kind not in SUPPORTED_DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise InvalidArgument(
            f"Unsupported dtype {dtype_text!r}{where}: arrays must be boolean, integer, float or complex."
        )
    return dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype


def dtype_text(dtype: np.dtype) -> str:
    """Return the canonical string of a dtype, as stored in headers (for example ``'<f4'``)."""
    return canonical_dtype(np.dtype(dtype).str).str


def validate_header(header: arrays_pb2.ArrayHeader, *, max_bytes: int | None = None) -> np.dtype:
    """Check a header's name, dtype, shape and byte count against each other.

    Returns
    -------
    numpy.dtype
        The array's canonical dtype.

    Raises
    ------
    InvalidArgument
        If any field is invalid or ``nbytes`` differs from ``prod(shape) * itemsize``.
    """
    validate_name(header.name, kind="array")
    dtype = canonical_dtype(header.dtype, array_name=header.name)
    shape = list(header.shape)
    if len(shape) > MAX_DIMENSIONS:
        raise InvalidArgument(f"Array {header.name!r} has {len(shape)} dimensions; the maximum is {MAX_DIMENSIONS}.")
    if any(size < 0 for size in shape):
        raise InvalidArgument(f"Array {header.name!r} has a negative size in its shape {tuple(shape)}.")
    expected = math.prod(shape) * dtype.itemsize
    if header.nbytes != expected:
        raise InvalidArgument(
            f"Array {header.name!r} declares {header.nbytes} bytes, but shape {tuple(shape)} of dtype "
            f"{dtype.str} holds {expected} bytes; send nbytes = prod(shape) * itemsize."
        )
    if max_bytes is not None and expected > max_bytes:
        raise InvalidArgument(f"Array {header.name!r} has {expected} bytes; the maximum is {max_bytes}.")
    if header.sha256 and (len(header.sha256) != 64 or any(c not in "0123456789abcdef" for c in header.sha256)):
        raise InvalidArgument(f"Array {header.name!r} has sha256 {header.sha256!r}; give 64 lowercase hex digits.")
    return dtype


def as_contiguous(array: np.ndarray) -> np.ndarray:
    """Return the array in C order with a little-endian dtype, copying only when needed."""
    array = np.asarray(array)
    canonical = canonical_dtype(array.dtype.str)
    # Not np.ascontiguousarray, which returns a 0-d array with shape (1,).
    return np.asarray(array, dtype=canonical, order="C")


def sha256_of(array: np.ndarray) -> str:
    """Return the hex sha256 of an array's C-order bytes."""
    return hashlib.sha256(as_contiguous(array).reshape(-1).view(np.uint8).data).hexdigest()


def header_for(name: str, array: np.ndarray, *, role: str = "", sha256: str | None = None) -> arrays_pb2.ArrayHeader:
    """Build the header describing ``array``, computing its sha256 unless given."""
    array = as_contiguous(array)
    return arrays_pb2.ArrayHeader(
        name=name,
        dtype=array.dtype.str,
        shape=list(array.shape),
        nbytes=array.nbytes,
        sha256=sha256 if sha256 is not None else sha256_of(array),
        role=role,
    )


def iter_chunks(array: np.ndarray, chunk_bytes: int, start_offset: int = 0) -> Iterator[bytes]:
    """Yield the array's C-order bytes from ``start_offset`` in pieces of at most ``chunk_bytes``."""
    flat = as_contiguous(array).reshape(-1).view(np.uint8)
    for offset in range(start_offset, flat.size, chunk_bytes):
        # bytes() is the one copy protobuf needs: a bytes field does not take a memoryview.
        yield bytes(flat[offset : offset + chunk_bytes].data)


class ArrayReceiver:
    """Checks the chunks of one array against its header and hands them to a sink.

    Parameters
    ----------
    header : ArrayHeader
        The validated header of the array.
    sink : callable
        Called with each chunk, in order.
    start_offset : int
        Byte offset of the first chunk, when a download resumes midway. The digest then covers only
        the bytes received here, so it is checked only when ``start_offset`` is 0. Default 0.
    """

    def __init__(self, header: arrays_pb2.ArrayHeader, sink: Callable[[bytes], None], *, start_offset: int = 0):
        self.header = header
        self.received = start_offset
        self._sink = sink
        self._digest = hashlib.sha256() if start_offset == 0 else None

    def add(self, chunk: bytes) -> None:
        """Pass one chunk to the sink.

        Raises
        ------
        InvalidArgument
            If the chunk would carry the array past its declared byte count.
        """
        if self.received + len(chunk) > self.header.nbytes:
            raise InvalidArgument(
                f"Array {self.header.name!r} received more than its declared {self.header.nbytes} bytes; "
                "the chunks disagree with the header's shape and dtype."
            )
        self._sink(chunk)
        if self._digest is not None:
            self._digest.update(chunk)
        self.received += len(chunk)

    def finish(self) -> str:
        """Check that every byte arrived and the sha256 matches; return the hex digest.

        Raises
        ------
        InvalidArgument
            If fewer bytes arrived than the header declares.
        IntegrityError
            If the header carries a sha256 and the bytes have another.
        """
        if self.received != self.header.nbytes:
            raise InvalidArgument(
                f"Array {self.header.name!r} ended after {self.received} of its declared {self.header.nbytes} "
                "bytes; send every chunk before the next header or the end of the stream."
            )
        if self._digest is None:
            return self.header.sha256
        digest = self._digest.hexdigest()
        if self.header.sha256 and digest != self.header.sha256:
            raise IntegrityError(
                f"Array {self.header.name!r} has sha256 {digest}, but its header recorded {self.header.sha256}."
            )
        return digest


class ArrayBuffer:
    """A preallocated array that chunks are written into in place, for the receiving client."""

    def __init__(self, header: arrays_pb2.ArrayHeader, *, start_offset: int = 0, out: np.ndarray | None = None):
        dtype = validate_header(header)
        shape = tuple(header.shape)
        if out is None:
            out = np.empty(shape, dtype=dtype)
        elif out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError(f"The output array must be C-contiguous with shape {shape} and dtype {dtype.str}.")
        self.array = out
        self._bytes = out.reshape(-1).view(np.uint8)
        self.receiver = ArrayReceiver(header, self._write, start_offset=start_offset)

    def _write(self, chunk: bytes) -> None:
        offset = self.receiver.received
        self._bytes[offset : offset + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)

    def finish(self) -> np.ndarray:
        """Verify the array as :meth:`ArrayReceiver.finish` does and return it."""
        self.receiver.finish()
        return self.array


class UploadLimits:
    """Checks the chunks and declared sizes of one upload against a server's limits.

    Parameters
    ----------
    what : str
        The object being uploaded, for messages, for example ``"dataset 'digits'"``.
    max_total_bytes : int
        Maximum sum of the declared sizes of all arrays of the upload.
    total_setting : str
        Server setting that raises ``max_total_bytes``, named in the message.
    max_chunk_bytes : int
        Maximum size of one chunk.
    """

    def __init__(self, *, what: str, max_total_bytes: int, total_setting: str, max_chunk_bytes: int):
        self.what = what
        self.max_total_bytes = max_total_bytes
        self.total_setting = total_setting
        self.max_chunk_bytes = max_chunk_bytes
        self.declared_bytes = 0

    def check_header(self, header: arrays_pb2.ArrayHeader) -> None:
        """Validate ``header`` and add its size to the upload's total.

        Raises
        ------
        InvalidArgument
            If the header is invalid.
        ResourceExhausted
            If the upload's arrays would exceed ``max_total_bytes`` together.
        """
        validate_header(header)
        total = self.declared_bytes + header.nbytes
        if total > self.max_total_bytes:
            raise ResourceExhausted(
                f"Array {header.name!r} of {header.nbytes} bytes would bring {self.what} to {total} bytes; "
                f"the server's maximum is {self.max_total_bytes} bytes ({self.total_setting}). "
                "Split the arrays into several uploads, or raise the limit on the server."
            )
        self.declared_bytes = total

    def check_chunk(self, chunk: bytes) -> None:
        """Raise ResourceExhausted if ``chunk`` is larger than ``max_chunk_bytes``."""
        if len(chunk) > self.max_chunk_bytes:
            raise ResourceExhausted(
                f"A chunk of {len(chunk)} bytes for {self.what} is larger than the server's maximum of "
                f"{self.max_chunk_bytes} bytes per chunk; send smaller chunks (LASAGNE_ENGINE_CHUNK_BYTES on "
                "the client) or raise LASAGNE_ENGINE_MAX_CHUNK_BYTES on the server."
            )


def check_upload_end(end: arrays_pb2.UploadEnd | None, *, what: str, array_count: int) -> None:
    """Check that an upload stream closed with its end frame and sent as many arrays as it declares.

    ``end`` is None when the stream ended without an end frame. When a client cancels its call,
    grpcio 1.85's server can end the request stream as if the client had closed it normally, so
    only this frame shows that the client sent everything it meant to.

    Raises
    ------
    InvalidArgument
        If the end frame is missing or declares another number of arrays than ``array_count``.
    """
    if end is None:
        arrays = "1 array" if array_count == 1 else f"{array_count} arrays"
        raise InvalidArgument(
            f"The upload of {what} ended after {arrays} without an end frame, so nothing was "
            "stored: the client stopped midway, or does not send the frame. Send an 'end' frame with the "
            "number of arrays last."
        )
    if end.array_count != array_count:
        raise InvalidArgument(
            f"The upload of {what} declares {end.array_count} arrays in its end frame but sent {array_count}; "
            "nothing was stored. Send a header and the chunks of every array before the end frame."
        )
