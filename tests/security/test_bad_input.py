"""Every RPC driven with random and malformed input.

Each reply must be OK or one of the documented error codes with a message, no thread may die,
and after each run the datasets, the model and the parameter sets stored before it must be intact.
"""

import contextlib
import itertools
import threading

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from hypothesis import given
from hypothesis import strategies as st

from lasagne_engine import rpc
from lasagne_engine.arrays import header_for, iter_chunks
from lasagne_engine.blobstore.ownership import OWNER_MARKER_NAME
from lasagne_engine.config import StreamLimits
from lasagne_engine.trainer import add_trainer
from lasagne_engine.trainer.devices import cpu_devices
from lasagne_engine.v1 import arrays_pb2, data_service_pb2, model_registry_pb2, trainer_pb2

from .messages import messages
from .services import MODEL_NAME, start_services

# The codes the services document for a request they cannot serve. INTERNAL, UNKNOWN, DATA_LOSS
# and UNAVAILABLE mean a bug, damaged storage or a dead server, so none of them is allowed.
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.PERMISSION_DENIED,
}
SERVICES = {
    "registry": model_registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"],
    "data": data_service_pb2.DESCRIPTOR.services_by_name["DataService"],
    "trainer": trainer_pb2.DESCRIPTOR.services_by_name["Trainer"],
}
# Watches wait for events that may never come, so they end at their deadline.
WATCH_TIMEOUT_S = 0.5
CALL_TIMEOUT_S = 20
# Numbers that give each drawn upload a name of its own, and that rename a drawn request which
# would delete a stored object or start a session.
FUZZ_NAMES = itertools.count()


def message_class(descriptor):
    return message_factory.GetMessageClass(descriptor)


@pytest.fixture(scope="module")
def thread_failures():
    """Exceptions that escaped any thread of this process while the module ran."""
    failures: list[threading.ExceptHookArgs] = []
    previous = threading.excepthook
    threading.excepthook = failures.append
    yield failures
    threading.excepthook = previous


@pytest.fixture(scope="module")
def services(tmp_path_factory, registry_template, compile_cache, thread_failures):
    running = start_services(tmp_path_factory.mktemp("bad-input"), registry_template, StreamLimits())
    rng = np.random.default_rng(0)
    running.upload_dataset("kept", {"x": rng.standard_normal((50, 4)).astype(np.float32), "y": np.arange(50)})
    running.upload_dataset("kept", {"x": np.zeros(3, dtype=np.int8)})
    running.save_parameter_set({"w": rng.standard_normal((8, 3)).astype(np.float32), "b": np.zeros(3)}, tags=["best"])
    running.save_parameter_set({"w": np.ones((2, 2), dtype=np.float64)}, epoch=2, step=10)

    trainer = rpc.Server("127.0.0.1:0", limits=StreamLimits())
    trainer_servicer = add_trainer(
        trainer,
        root=running.root / "trainer",
        registry_address=running.registry.address,
        data_address=running.data.address,
        compile_cache=compile_cache,
        devices=cpu_devices(1, memory_budget_bytes=1 << 30),
        backend="default",
    )
    trainer.start()
    running.trainer = trainer
    running.trainer_channel = rpc.client_channel(trainer.address, StreamLimits())
    yield running
    running.trainer_channel.close()
    trainer_servicer.manager.close()
    trainer.stop(grace_s=1.0)
    running.stop()


def channel_for(services, role: str) -> grpc.Channel:
    return {"registry": services.registry_channel, "data": services.data_channel, "trainer": services.trainer_channel}[role]


def invoke(channel: grpc.Channel, service, method, request, *, serialize=True) -> tuple[grpc.StatusCode, str]:
    """Call ``method`` with ``request`` (a message, raw bytes, or for a client stream a list of them)."""
    path = f"/{service.full_name}/{method.name}"
    serializer = (lambda message: message.SerializeToString()) if serialize else None
    response_class = message_class(method.output_type)
    timeout_s = WATCH_TIMEOUT_S if method.name.startswith("Watch") or method.name == "AttachWorker" else CALL_TIMEOUT_S
    arguments = dict(request_serializer=serializer, response_deserializer=response_class.FromString)
    try:
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(path, **arguments)(iter(request), timeout=timeout_s)
            for _ in itertools.islice(call, 20):
                pass
            call.cancel()
        elif method.client_streaming:
            channel.stream_unary(path, **arguments)(iter(request), timeout=timeout_s)
        elif method.server_streaming:
            call = channel.unary_stream(path, **arguments)(request, timeout=timeout_s)
            for _ in itertools.islice(call, 200):
                pass
            call.cancel()
        else:
            channel.unary_unary(path, **arguments)(request, timeout=timeout_s)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def assert_documented(method, code: grpc.StatusCode, details: str) -> None:
    allowed = set(DOCUMENTED)
    if method.name.startswith("Watch") or method.name == "AttachWorker":
        allowed |= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
    assert code in allowed, f"{method.name} answered {code.name}: {details}"
    if code != grpc.StatusCode.OK:
        assert details.strip(), f"{method.name} answered {code.name} without a message"


def safe_request(services, method, request):
    """Keep a drawn request from deleting the objects whose integrity is checked, or from starting a session.

    A valid StartSession would start a session process that compiles a network, and random names
    never match what is stored anyway, but a drawn one might.
    """
    if method.name == "StartSession" and request.model.split("@")[0] == MODEL_NAME:
        request.model = f"fuzz-{next(FUZZ_NAMES)}"
    if method.name == "DeleteDataset" and request.ref.split("@")[0] in {ref.split("@")[0] for ref in services.datasets}:
        request.ref = f"fuzz-{next(FUZZ_NAMES)}"
    if method.name == "DeleteParameterSet" and request.id in services.parameter_sets:
        request.id = "ps-ffffffffffff"
    return request


@contextlib.contextmanager
def checked_run(services, thread_failures):
    """Run a property, then check that every server responds, no thread died and nothing stored changed."""
    yield
    assert thread_failures == [], [failure.exc_value for failure in thread_failures]
    services.assert_intact()
    request = trainer_pb2.ListSessionsRequest()
    invoke(services.trainer_channel, SERVICES["trainer"], SERVICES["trainer"].methods_by_name["ListSessions"], request)


@pytest.mark.parametrize("role", list(SERVICES))
def test_random_messages(services, thread_failures, role):
    service = SERVICES[role]
    unary_request_methods = [method for method in service.methods if not method.client_streaming]

    @given(st.data())
    def run(data):
        method = data.draw(st.sampled_from(unary_request_methods), label="method")
        request = safe_request(services, method, data.draw(messages(message_class(method.input_type)), label="request"))
        code, details = invoke(channel_for(services, role), service, method, request)
        assert_documented(method, code, details)

    with checked_run(services, thread_failures):
        run()


@pytest.mark.parametrize("role", list(SERVICES))
def test_random_bytes(services, thread_failures, role):
    service = SERVICES[role]

    @given(st.sampled_from(list(service.methods)), st.lists(st.binary(max_size=200), min_size=1, max_size=4))
    def run(method, payloads):
        if method.name == "StartSession":
            payloads = payloads[:1]
        request = payloads if method.client_streaming else payloads[0]
        code, details = invoke(channel_for(services, role), service, method, request, serialize=False)
        assert_documented(method, code, details)
        if code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf message" in details:
            assert method.name in details

    with checked_run(services, thread_failures):
        run()


@pytest.mark.parametrize(
    ("role", "method_name", "frame_class"),
    [
        ("data", "UploadDataset", data_service_pb2.UploadDatasetRequest),
        ("registry", "SaveParameterSet", model_registry_pb2.SaveParameterSetRequest),
        ("trainer", "AttachWorker", trainer_pb2.WorkerReport),
    ],
)
def test_random_frame_sequences(services, thread_failures, role, method_name, frame_class):
    service = SERVICES[role]
    method = service.methods_by_name[method_name]

    @given(st.lists(messages(frame_class), max_size=8))
    def run(frames):
        code, details = invoke(channel_for(services, role), service, method, frames)
        assert_documented(method, code, details)

    with checked_run(services, thread_failures):
        run()


MUTATIONS = [
    "none", "truncate", "repeat-chunk", "swap-chunks", "drop-header", "second-info",
    "dtype", "shape", "nbytes", "sha256", "extra-bytes", "drop-end", "cancel",
]


@st.composite
def mutated_streams(draw):
    """Draw one array's stream and one way to break it, returning the frames, the array name and the mutation."""
    count = draw(st.integers(min_value=2, max_value=400))
    dtype = draw(st.sampled_from(["<f4", "<f8", "<i2", "|u1", "|b1", "<c8"]))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    array = np.random.default_rng(seed).integers(0, 250, count).astype(dtype)
    chunk_bytes = draw(st.integers(min_value=1, max_value=max(1, array.nbytes // 2)))
    header = header_for("w", array)
    chunks = list(iter_chunks(array, chunk_bytes))
    mutation = draw(st.sampled_from(MUTATIONS))
    return header, chunks, mutation, draw(st.integers(min_value=0, max_value=len(chunks) - 1))


def break_stream(header, chunks: list[bytes], mutation: str, index: int):
    """Return the header and chunks with ``mutation`` applied, and whether the result is still a valid upload."""
    original_header, original_bytes = header, b"".join(chunks)
    header = type(header).FromString(header.SerializeToString())
    chunks = list(chunks)
    if mutation == "truncate":
        chunks = chunks[:index]
    elif mutation == "repeat-chunk":
        chunks.insert(index, chunks[index])
    elif mutation == "swap-chunks" and len(chunks) > 1:
        other = (index + 1) % len(chunks)
        chunks[index], chunks[other] = chunks[other], chunks[index]
    elif mutation == "dtype":
        header.dtype = "<f8" if header.dtype != "<f8" else "<i2"
    elif mutation == "shape":
        header.shape[0] += index + 1
    elif mutation == "nbytes":
        header.nbytes += index + 1
    elif mutation == "sha256":
        header.sha256 = "0" * 64
    elif mutation == "extra-bytes":
        chunks.append(b"\x01")
    # Another dtype of the same item size describes the same bytes, so that upload is valid.
    same_size = np.dtype(header.dtype).itemsize == np.dtype(original_header.dtype).itemsize
    valid = (
        mutation not in ("drop-header", "second-info", "drop-end")
        and b"".join(chunks) == original_bytes
        and list(header.shape) == list(original_header.shape)
        and header.nbytes == original_header.nbytes
        and header.sha256 == original_header.sha256
        and same_size
    )
    return header, chunks, valid


def mutated_frames(frame_class, info_frame, header, chunks, mutation):
    frames = [info_frame]
    if mutation != "drop-header":
        frames.append(frame_class(header=header))
    if mutation == "second-info":
        frames.append(info_frame)
    frames.extend(frame_class(chunk=chunk) for chunk in chunks)
    if mutation != "drop-end":
        frames.append(frame_class(end=arrays_pb2.UploadEnd(array_count=1)))
    return frames


class CancellingStream:
    """A request stream that cancels its own call after ``after`` frames."""

    def __init__(self, frames, after: int):
        self.frames = frames
        self.after = after
        self.call = None

    def __iter__(self):
        for position, frame in enumerate(self.frames):
            if position == self.after and self.call is not None:
                self.call.cancel()
                return
            yield frame


def send_mutated(stub_method, frames, mutation: str, index: int) -> tuple[grpc.StatusCode, str]:
    if mutation == "cancel":
        stream = CancellingStream(frames, after=min(index + 1, len(frames) - 1))
        stream.call = stub_method.future(iter(stream), timeout=CALL_TIMEOUT_S)
        try:
            stream.call.result()
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
        except grpc.FutureCancelledError:
            return grpc.StatusCode.CANCELLED, "cancelled by the client"
        return grpc.StatusCode.OK, ""
    try:
        stub_method(iter(frames), timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def test_broken_dataset_uploads(services, thread_failures):
    @given(mutated_streams())
    def run(drawn):
        header, chunks, mutation, index = drawn
        header, chunks, valid = break_stream(header, chunks, mutation, index)
        name = f"fuzz-{next(FUZZ_NAMES)}"
        info = data_service_pb2.UploadDatasetRequest(info=data_service_pb2.DatasetInfo(name=name))
        frames = mutated_frames(data_service_pb2.UploadDatasetRequest, info, header, chunks, mutation)

        code, details = send_mutated(services.data_stub.UploadDataset, frames, mutation, index)

        if mutation == "cancel":
            assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.OK), details
        elif valid:
            assert code == grpc.StatusCode.OK, details
        else:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{mutation}: {code.name}: {details}"
            expected = ("'w'", "chunk before any array header", "second 'info'", "without an end frame")
            assert any(fragment in details for fragment in expected), details
        if code != grpc.StatusCode.OK:
            with pytest.raises(grpc.RpcError) as raised:
                services.data_stub.DescribeDataset(data_service_pb2.DescribeDatasetRequest(ref=name), timeout=10)
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND

    with checked_run(services, thread_failures):
        run()
    assert services.data.stream_limit.open_streams() == 0


def test_broken_parameter_set_saves(services, thread_failures):
    @given(mutated_streams())
    def run(drawn):
        header, chunks, mutation, index = drawn
        header, chunks, valid = break_stream(header, chunks, mutation, index)
        session_id = f"fuzz-{next(FUZZ_NAMES)}"
        info = model_registry_pb2.SaveParameterSetRequest(
            info=model_registry_pb2.ParameterSetInfo(model=MODEL_NAME, session_id=session_id)
        )
        frames = mutated_frames(model_registry_pb2.SaveParameterSetRequest, info, header, chunks, mutation)

        code, details = send_mutated(services.registry_stub.SaveParameterSet, frames, mutation, index)

        if mutation == "cancel":
            assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.OK), details
        elif valid:
            assert code == grpc.StatusCode.OK, details
        else:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{mutation}: {code.name}: {details}"
            expected = ("'w'", "before any array header", "second ParameterSetInfo", "without an end frame")
            assert any(fragment in details for fragment in expected), details
        if code != grpc.StatusCode.OK:
            request = model_registry_pb2.ListParameterSetsRequest(session_id=session_id)
            assert list(services.registry_stub.ListParameterSets(request, timeout=10).parameter_sets) == []

    with checked_run(services, thread_failures):
        run()
    assert services.registry.stream_limit.open_streams() == 0


def test_no_partial_blobs_remain(services):
    """Rejected and cancelled uploads leave no blob behind once the servers have cleaned up."""
    stored_registry = {p.id for p in services.registry_stub.ListParameterSets(
        model_registry_pb2.ListParameterSetsRequest(), timeout=10).parameter_sets}
    folders = {path.name for path in (services.root / "registry" / "blobs" / "parameter-sets").iterdir()
               if path.name != OWNER_MARKER_NAME}

    assert folders <= stored_registry
    assert not list((services.root / "data" / "blobs").glob(".incoming/blob-*"))
