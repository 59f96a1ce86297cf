import hashlib
import logging
import math
import threading
import time

import grpc
import numpy as np
import pytest

from lasagne_engine.arrays import header_for
from lasagne_engine.blobstore.ownership import OWNER_MARKER_NAME
from lasagne_engine.v1 import arrays_pb2, model_registry_pb2

from .helpers import assert_serving, copy_registry, count_load_chunks, load_arrays, save_frames, wait_until

Request = model_registry_pb2.SaveParameterSetRequest


@pytest.fixture
def registry(start_registry, digits_registry_template, tmp_path):
    """A running registry where model 'digits' version 1 is registered."""
    root = tmp_path / "registry"
    copy_registry(digits_registry_template, root)
    return start_registry(root)


@pytest.fixture
def arrays():
    generator = np.random.default_rng(7)
    return {
        "hidden_W": generator.standard_normal((64, 32)).astype(np.float32),
        "hidden_b": generator.standard_normal(32).astype(np.float32),
        "counts": generator.integers(-1000, 1000, size=(3, 4, 5)).astype(np.int64),
        "mask": generator.random(7) > 0.5,
        "scale": np.array(2.5, dtype=np.float64),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def info(model="digits", **fields):
    return model_registry_pb2.ParameterSetInfo(model=model, **fields)


def save(stub, arrays, *, chunk_bytes=1 << 16, **fields):
    return stub.SaveParameterSet(save_frames(info(**fields), arrays, chunk_bytes=chunk_bytes), timeout=60)


def list_sets(stub, **filters):
    return list(stub.ListParameterSets(model_registry_pb2.ListParameterSetsRequest(**filters)).parameter_sets)


def stored_blobs(root):
    """Parameter set blobs under the registry's local blob folder, without the owner marker."""
    folder = root / "blobs" / "parameter-sets"
    if not folder.exists():
        return []
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and path.name != OWNER_MARKER_NAME
    )


def partial_blobs(root):
    folder = root / "blobs" / ".incoming"
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def assert_nothing_stored(registry):
    assert list_sets(registry.stub) == []
    assert stored_blobs(registry.root) == []
    assert partial_blobs(registry.root) == []
    assert_serving(registry.stub)


class TestSaveAndLoad:
    def test_roundtrip_small_chunks(self, registry, arrays):
        saved = save(
            registry.stub, arrays, chunk_bytes=7, session_id="session-1", epoch=3, step=120,
            metrics={"loss": 0.25, "accuracy": 0.9}, tags=["latest"],
        )

        loaded = load_arrays(registry.stub, saved.id, chunk_bytes=5)

        assert list(loaded) == list(arrays)
        for name, original in arrays.items():
            assert loaded[name].dtype == original.dtype.newbyteorder("<")
            assert loaded[name].shape == original.shape
            np.testing.assert_array_equal(loaded[name], original)
        expected_chunks = sum(math.ceil(array.nbytes / 5) for array in arrays.values())
        assert count_load_chunks(registry.stub, saved.id, chunk_bytes=5) == expected_chunks

    def test_saved_metadata(self, registry, arrays):
        saved = save(
            registry.stub, arrays, chunk_bytes=7, session_id="session-1", epoch=3, step=120,
            metrics={"loss": 0.25}, tags=["latest", "first"],
        )

        assert saved.id.startswith("ps-")
        assert len(saved.id) == 15
        assert saved.model == "digits"
        assert saved.model_version == 1
        assert saved.session_id == "session-1"
        assert (saved.epoch, saved.step) == (3, 120)
        assert dict(saved.metrics) == {"loss": 0.25}
        assert list(saved.tags) == ["first", "latest"]
        assert saved.total_bytes == sum(array.nbytes for array in arrays.values())
        assert saved.created_at.seconds > 0
        assert [array.name for array in saved.arrays] == list(arrays)
        for header, original in zip(saved.arrays, arrays.values(), strict=True):
            assert header.sha256 == hashlib.sha256(np.ascontiguousarray(original).tobytes()).hexdigest()
            assert header.role == "trainable"
        assert registry.stub.GetParameterSet(model_registry_pb2.GetParameterSetRequest(id=saved.id)) == saved
        assert stored_blobs(registry.root) == sorted(f"{saved.id}/{name}" for name in arrays)

    def test_load_default_chunk_size(self, registry, arrays):
        saved = save(registry.stub, arrays, chunk_bytes=100)

        chunks = count_load_chunks(registry.stub, saved.id, chunk_bytes=0)

        assert chunks == sum(array.nbytes > 0 for array in arrays.values())

    def test_load_selected_names(self, registry, arrays):
        saved = save(registry.stub, arrays)

        loaded = load_arrays(registry.stub, saved.id, names=["counts", "hidden_b"])

        assert list(loaded) == ["counts", "hidden_b"]
        np.testing.assert_array_equal(loaded["counts"], arrays["counts"])

    def test_load_unknown_name(self, registry, arrays):
        saved = save(registry.stub, arrays)

        with pytest.raises(grpc.RpcError) as caught:
            load_arrays(registry.stub, saved.id, names=["hidden_b", "nope"])

        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no array named 'nope'" in caught.value.details()
        assert_serving(registry.stub)

    @pytest.mark.parametrize("chunk_bytes", [-1, 64 << 20], ids=["negative", "over-message-limit"])
    def test_load_chunk_bytes_out_of_range(self, registry, arrays, chunk_bytes):
        saved = save(registry.stub, arrays)

        with pytest.raises(grpc.RpcError) as caught:
            load_arrays(registry.stub, saved.id, chunk_bytes=chunk_bytes)

        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"chunk_bytes {chunk_bytes} is out of range" in caught.value.details()

    def test_load_corrupted_blob(self, registry, arrays):
        saved = save(registry.stub, arrays)
        blob = registry.root / "blobs" / "parameter-sets" / saved.id / "hidden_b"
        corrupted = bytearray(blob.read_bytes())
        corrupted[0] ^= 0xFF
        blob.write_bytes(bytes(corrupted))
        recorded = next(array.sha256 for array in saved.arrays if array.name == "hidden_b")

        with pytest.raises(grpc.RpcError) as caught:
            load_arrays(registry.stub, saved.id, names=["hidden_b"])

        assert caught.value.code() == grpc.StatusCode.DATA_LOSS
        assert "Array 'hidden_b'" in caught.value.details()
        assert recorded in caught.value.details()
        assert hashlib.sha256(bytes(corrupted)).hexdigest() in caught.value.details()
        assert_serving(registry.stub)

    def test_model_version_resolved(self, registry, model_source, arrays):
        registry.stub.RegisterModel(
            model_registry_pb2.RegisterModelRequest(name="digits", source=model_source + "\n# v2\n"), timeout=120
        )

        latest = save(registry.stub, arrays, model="digits")
        pinned = save(registry.stub, arrays, model="digits@1")

        assert latest.model_version == 2
        assert pinned.model_version == 1
        assert [s.id for s in list_sets(registry.stub, model="digits")] == [latest.id, pinned.id]
        assert [s.id for s in list_sets(registry.stub, model="digits@1")] == [pinned.id]

    def test_parent_recorded(self, registry, arrays):
        parent = save(registry.stub, arrays)

        child = save(registry.stub, arrays, parent_id=parent.id)

        assert child.parent_id == parent.id


def mismatched_sha_frames(arrays):
    array = arrays["hidden_b"]
    header = header_for("hidden_b", array, sha256=hashlib.sha256(b"other bytes").hexdigest())
    return [Request(info=info()), Request(header=header), Request(chunk=array.tobytes())]


def header_frames(header, chunk=b""):
    frames = [Request(info=info()), Request(header=header)]
    return frames + [Request(chunk=chunk)] if chunk else frames


FOUR_FLOATS = arrays_pb2.ArrayHeader(name="w", dtype="<f4", shape=[4], nbytes=16)

REJECTED_STREAMS = {
    "too-many-bytes": (
        lambda arrays: header_frames(FOUR_FLOATS, b"\0" * 20),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Array 'w' received more than its declared 16 bytes",
    ),
    "too-few-bytes": (
        lambda arrays: header_frames(FOUR_FLOATS, b"\0" * 12),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Array 'w' ended after 12 of its declared 16 bytes",
    ),
    "nbytes-not-shape": (
        lambda arrays: header_frames(arrays_pb2.ArrayHeader(name="w", dtype="<f4", shape=[4], nbytes=12)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "declares 12 bytes",
    ),
    "sha-mismatch": (
        mismatched_sha_frames,
        grpc.StatusCode.INVALID_ARGUMENT,
        "Array 'hidden_b' has sha256",
    ),
    "no-info-first": (
        lambda arrays: [Request(header=FOUR_FLOATS), Request(chunk=b"\0" * 16)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "received a 'header' frame first",
    ),
    "empty-stream": (
        lambda arrays: [],
        grpc.StatusCode.INVALID_ARGUMENT,
        "received an empty stream first",
    ),
    "chunk-before-header": (
        lambda arrays: [Request(info=info()), Request(chunk=b"\0" * 16)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "chunk before any array header",
    ),
    "second-info": (
        lambda arrays: [*header_frames(FOUR_FLOATS, b"\0" * 16), Request(info=info())],
        grpc.StatusCode.INVALID_ARGUMENT,
        "second ParameterSetInfo",
    ),
    "duplicate-array": (
        lambda arrays: [*header_frames(FOUR_FLOATS, b"\0" * 16), Request(header=FOUR_FLOATS)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "received array 'w' twice",
    ),
    "bad-role": (
        lambda arrays: header_frames(
            arrays_pb2.ArrayHeader(name="w", dtype="<f4", shape=[4], nbytes=16, role="weights"), b"\0" * 16
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "role 'weights'",
    ),
    "bad-array-name": (
        lambda arrays: header_frames(arrays_pb2.ArrayHeader(name="../w", dtype="<f4", shape=[4], nbytes=16)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Invalid array name '../w'",
    ),
    "no-arrays": (
        lambda arrays: [Request(info=info()), Request(end=arrays_pb2.UploadEnd(array_count=0))],
        grpc.StatusCode.INVALID_ARGUMENT,
        "has no arrays",
    ),
    "missing-end": (
        lambda arrays: header_frames(FOUR_FLOATS, b"\0" * 16),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ended after 1 array without an end frame",
    ),
    "end-count-differs": (
        lambda arrays: [*header_frames(FOUR_FLOATS, b"\0" * 16), Request(end=arrays_pb2.UploadEnd(array_count=3))],
        grpc.StatusCode.INVALID_ARGUMENT,
        "declares 3 arrays in its end frame but sent 1",
    ),
    "frame-after-end": (
        lambda arrays: [
            *header_frames(FOUR_FLOATS, b"\0" * 16), Request(end=arrays_pb2.UploadEnd(array_count=1)), Request(chunk=b"\0"),
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        "'chunk' frame after its end frame",
    ),
    "unknown-model": (
        lambda arrays: [Request(info=info(model="nope")), *header_frames(FOUR_FLOATS, b"\0" * 16)[1:]],
        grpc.StatusCode.NOT_FOUND,
        "No model 'nope'",
    ),
    "unknown-model-version": (
        lambda arrays: [Request(info=info(model="digits@4")), *header_frames(FOUR_FLOATS, b"\0" * 16)[1:]],
        grpc.StatusCode.NOT_FOUND,
        "'digits@4'",
    ),
    "unknown-parent": (
        lambda arrays: [Request(info=info(parent_id="ps-000000000000")), *header_frames(FOUR_FLOATS, b"\0" * 16)[1:]],
        grpc.StatusCode.NOT_FOUND,
        "No parent parameter set with id 'ps-000000000000'",
    ),
    "bad-tag": (
        lambda arrays: [Request(info=info(tags=["no good"])), *header_frames(FOUR_FLOATS, b"\0" * 16)[1:]],
        grpc.StatusCode.INVALID_ARGUMENT,
        "Invalid tag name 'no good'",
    ),
}



def load_frames(stub, set_id, **fields):
    """Return the (kind, value) frames of one LoadParameterSet stream."""
    request = model_registry_pb2.LoadParameterSetRequest(id=set_id, **fields)
    frames = []
    for frame in stub.LoadParameterSet(request, timeout=30):
        kind = frame.WhichOneof("frame")
        frames.append((kind, frame.header.name if kind == "header" else frame.chunk))
    return frames


class TestResumedLoad:
    @pytest.mark.parametrize("start_offset", [0, 1, 100, 128])
    def test_starts_at_array_and_byte(self, registry, arrays, start_offset):
        saved = save(registry.stub, arrays)

        frames = load_frames(registry.stub, saved.id, start_array="hidden_b", start_offset=start_offset, chunk_bytes=30)

        headers = [value for kind, value in frames if kind == "header"]
        assert headers == ["hidden_b", "counts", "mask", "scale", "empty"]
        first_chunks = []
        for kind, value in frames[1:]:
            if kind == "header":
                break
            first_chunks.append(value)
        assert b"".join(first_chunks) == arrays["hidden_b"].tobytes()[start_offset:]
        assert all(len(chunk) <= 30 for chunk in first_chunks)

    def test_start_in_selected_names(self, registry, arrays):
        saved = save(registry.stub, arrays)

        frames = load_frames(registry.stub, saved.id, names=["counts", "hidden_W", "scale"], start_array="hidden_W")

        assert [value for kind, value in frames if kind == "header"] == ["hidden_W", "scale"]

    @pytest.mark.parametrize(
        "fields, code, message",
        [
            ({"start_array": "nope"}, grpc.StatusCode.NOT_FOUND, "no array named 'nope' to start from"),
            ({"start_array": "bad/name"}, grpc.StatusCode.INVALID_ARGUMENT, "Invalid array name 'bad/name'"),
            ({"start_offset": 4}, grpc.StatusCode.INVALID_ARGUMENT, "start_offset 4 was given without start_array"),
            (
                {"start_array": "hidden_b", "start_offset": -1},
                grpc.StatusCode.INVALID_ARGUMENT,
                "Invalid start_offset -1 for array 'hidden_b'",
            ),
            (
                {"start_array": "hidden_b", "start_offset": 129},
                grpc.StatusCode.INVALID_ARGUMENT,
                "give an offset from 0 to its size, 128 bytes",
            ),
            (
                {"names": ["counts"], "start_array": "hidden_b"},
                grpc.StatusCode.INVALID_ARGUMENT,
                "start_array 'hidden_b' is not among the requested names ['counts']",
            ),
        ],
        ids=["unknown-array", "malformed-array", "offset-without-array", "negative-offset", "offset-past-end", "not-selected"],
    )
    def test_bad_start(self, registry, arrays, fields, code, message):
        saved = save(registry.stub, arrays)

        with pytest.raises(grpc.RpcError) as caught:
            load_frames(registry.stub, saved.id, **fields)

        assert caught.value.code() == code
        assert message in caught.value.details()
        assert_serving(registry.stub)

    @pytest.mark.parametrize("start_offset", [64, 127, 128])
    def test_corruption_before_start_reported(self, registry, arrays, start_offset):
        saved = save(registry.stub, arrays)
        blob = registry.root / "blobs" / "parameter-sets" / saved.id / "hidden_b"
        corrupted = bytearray(blob.read_bytes())
        corrupted[0] ^= 0xFF
        blob.write_bytes(bytes(corrupted))

        with pytest.raises(grpc.RpcError) as caught:
            load_frames(registry.stub, saved.id, start_array="hidden_b", start_offset=start_offset, chunk_bytes=16)

        assert caught.value.code() == grpc.StatusCode.DATA_LOSS
        assert "Array 'hidden_b'" in caught.value.details()
        assert hashlib.sha256(bytes(corrupted)).hexdigest() in caught.value.details()
        assert_serving(registry.stub)

    def test_truncated_blob_before_start_reported(self, registry, arrays):
        saved = save(registry.stub, arrays)
        blob = registry.root / "blobs" / "parameter-sets" / saved.id / "hidden_b"
        blob.write_bytes(blob.read_bytes()[:50])

        with pytest.raises(grpc.RpcError) as caught:
            load_frames(registry.stub, saved.id, start_array="hidden_b", start_offset=100, chunk_bytes=16)

        assert caught.value.code() == grpc.StatusCode.DATA_LOSS
        assert "has 50 bytes" in caught.value.details()
        assert "128 were recorded" in caught.value.details()


class TestSaveRejects:
    @pytest.mark.parametrize("case", list(REJECTED_STREAMS))
    def test_rejected_stream(self, registry, arrays, case):
        build_frames, code, message = REJECTED_STREAMS[case]

        with pytest.raises(grpc.RpcError) as caught:
            registry.stub.SaveParameterSet(iter(build_frames(arrays)), timeout=60)

        assert caught.value.code() == code
        assert message in caught.value.details()
        assert_nothing_stored(registry)

    def test_sha_mismatch_names_both_digests(self, registry, arrays):
        with pytest.raises(grpc.RpcError) as caught:
            registry.stub.SaveParameterSet(iter(mismatched_sha_frames(arrays)), timeout=60)

        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert hashlib.sha256(arrays["hidden_b"].tobytes()).hexdigest() in caught.value.details()
        assert hashlib.sha256(b"other bytes").hexdigest() in caught.value.details()

    def test_client_stops_midway(self, registry, arrays):
        def frames_then_failure():
            sent = 0
            for frame in save_frames(info(), arrays, chunk_bytes=64):
                yield frame
                sent += frame.WhichOneof("frame") == "chunk"
                # Part of hidden_W has been sent; hidden_b and later arrays never are.
                if sent == 20:
                    wait_until(lambda: partial_blobs(registry.root))
                    raise RuntimeError("client failed midway")

        with pytest.raises(grpc.RpcError) as caught:
            registry.stub.SaveParameterSet(frames_then_failure(), timeout=60)
        assert caught.value.code() == grpc.StatusCode.UNKNOWN

        # The server cleans up on its own thread, after the client has returned.
        wait_until(lambda: not stored_blobs(registry.root) and not partial_blobs(registry.root))
        assert_nothing_stored(registry)

    def test_client_cancels_before_first_frame(self, registry, caplog):
        started = threading.Event()

        def no_frames():
            started.set()
            threading.Event().wait(30)
            yield from ()

        with caplog.at_level(logging.INFO, logger="lasagne_engine"):
            call = registry.stub.SaveParameterSet.future(no_frames(), timeout=60)
            assert started.wait(10)
            # Long enough for the server to be blocked reading the first frame.
            time.sleep(0.5)
            call.cancel()
            wait_until(lambda: "before its first frame" in caplog.text)

        assert call.cancelled()
        assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
        assert "INTERNAL" not in caplog.text
        assert_serving(registry.stub)

    def test_client_stops_between_arrays(self, registry, arrays):
        def frames_then_failure():
            for frame in save_frames(info(), arrays, chunk_bytes=1 << 10):
                if frame.WhichOneof("frame") == "header" and frame.header.name == "counts":
                    # hidden_W is committed once hidden_b's header arrives; hidden_b is still partial.
                    wait_until(lambda: [key.split("/")[1] for key in stored_blobs(registry.root)] == ["hidden_W"])
                    wait_until(lambda: partial_blobs(registry.root))
                    raise RuntimeError("client failed after two whole arrays")
                yield frame

        with pytest.raises(grpc.RpcError) as caught:
            registry.stub.SaveParameterSet(frames_then_failure(), timeout=60)
        assert caught.value.code() == grpc.StatusCode.UNKNOWN

        wait_until(lambda: not stored_blobs(registry.root) and not partial_blobs(registry.root))
        assert_nothing_stored(registry)


class TestListParameterSets:
    def test_pages_follow_saves_and_deletes(self, registry, arrays):
        saved = [save(registry.stub, arrays, session_id="paged").id for _ in range(5)]
        other = save(registry.stub, arrays, session_id="other").id

        def page(token: str = "") -> model_registry_pb2.ListParameterSetsResponse:
            request = model_registry_pb2.ListParameterSetsRequest(session_id="paged", page_size=2, page_token=token)
            return registry.stub.ListParameterSets(request)

        first = page()
        # A set deleted after the first page and one saved meanwhile: the listing goes on from where it was.
        registry.stub.DeleteParameterSet(model_registry_pb2.DeleteParameterSetRequest(id=saved[2]))
        late = save(registry.stub, arrays, session_id="paged").id
        second = page(first.next_page_token)
        third = page(second.next_page_token)

        assert [s.id for s in first.parameter_sets] == saved[:2]
        assert [s.id for s in second.parameter_sets] == saved[3:5]
        assert [s.id for s in third.parameter_sets] == [late]
        assert first.next_page_token and second.next_page_token
        assert third.next_page_token == ""
        assert other not in {s.id for s in [*first.parameter_sets, *second.parameter_sets, *third.parameter_sets]}

    @pytest.mark.parametrize(
        ("page_size", "page_token", "message"),
        [
            (-1, "", "Invalid page_size -1"),
            (2, "not a token", "Invalid page_token 'not a token'"),
            (2, "MTI6YWJj", "belongs to a listing with other filters"),
        ],
        ids=["negative-size", "garbled-token", "other-filters"],
    )
    def test_bad_page_request(self, registry, page_size, page_token, message):
        request = model_registry_pb2.ListParameterSetsRequest(page_size=page_size, page_token=page_token)

        with pytest.raises(grpc.RpcError) as caught:
            registry.stub.ListParameterSets(request)

        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in caught.value.details()

    def test_client_reads_every_page(self, registry, arrays, monkeypatch):
        from lasagne_engine.client import Engine
        from lasagne_engine.model_registry import servicer

        monkeypatch.setattr(servicer, "MAX_PAGE_SIZE", 2)
        saved = [save(registry.stub, arrays, session_id="many").id for _ in range(5)]

        with Engine(registry_address=registry.server.address, data_address="127.0.0.1:1", trainer_address="127.0.0.1:1") as engine:
            listed = engine.list_parameter_sets(session_id="many")

        assert [s.id for s in listed] == saved

    def test_filters(self, registry, arrays):
        first = save(registry.stub, arrays, session_id="one", tags=["best"])
        second = save(registry.stub, arrays, session_id="two")
        third = save(registry.stub, arrays, session_id="one")

        assert [s.id for s in list_sets(registry.stub)] == [first.id, second.id, third.id]
        assert [s.id for s in list_sets(registry.stub, model="digits")] == [first.id, second.id, third.id]
        assert [s.id for s in list_sets(registry.stub, session_id="one")] == [first.id, third.id]
        assert [s.id for s in list_sets(registry.stub, tag="best")] == [first.id]
        assert [s.id for s in list_sets(registry.stub, session_id="two", tag="best")] == []
        assert list_sets(registry.stub, session_id="three") == []

    def test_unknown_model(self, registry):
        with pytest.raises(grpc.RpcError) as caught:
            list_sets(registry.stub, model="digitz")

        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "did you mean 'digits'?" in caught.value.details()

    @pytest.mark.parametrize("set_id", ["ps-12", "../etc", "PS-0123456789AB", ""], ids=str)
    def test_get_bad_id(self, registry, set_id):
        with pytest.raises(grpc.RpcError) as caught:
            registry.stub.GetParameterSet(model_registry_pb2.GetParameterSetRequest(id=set_id))

        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"Invalid parameter set id {set_id!r}" in caught.value.details()
        assert_serving(registry.stub)

    def test_get_unknown_id(self, registry):
        with pytest.raises(grpc.RpcError) as caught:
            registry.stub.GetParameterSet(model_registry_pb2.GetParameterSetRequest(id="ps-0123456789ab"))

        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'ps-0123456789ab'" in caught.value.details()


def tag(stub, set_id, add=(), remove=(), exclusive=False):
    request = model_registry_pb2.TagParameterSetRequest(
        id=set_id, add_tags=list(add), remove_tags=list(remove), exclusive_in_session=exclusive
    )
    return stub.TagParameterSet(request)


class TestTagParameterSet:
    def test_exclusive_move(self, registry, arrays):
        first = save(registry.stub, arrays, session_id="one", tags=["best"])
        second = save(registry.stub, arrays, session_id="one")
        other_session = save(registry.stub, arrays, session_id="two", tags=["best"])

        tagged = tag(registry.stub, second.id, add=["best"], exclusive=True)

        assert list(tagged.tags) == ["best"]
        assert [s.id for s in list_sets(registry.stub, tag="best")] == [second.id, other_session.id]
        assert list(registry.stub.GetParameterSet(model_registry_pb2.GetParameterSetRequest(id=first.id)).tags) == []

    def test_shared_without_exclusive(self, registry, arrays):
        first = save(registry.stub, arrays, session_id="one", tags=["best"])
        second = save(registry.stub, arrays, session_id="one")

        tag(registry.stub, second.id, add=["best"])

        assert [s.id for s in list_sets(registry.stub, tag="best")] == [first.id, second.id]

    def test_add_and_remove(self, registry, arrays):
        saved = save(registry.stub, arrays, tags=["old", "keep"])

        tagged = tag(registry.stub, saved.id, add=["new", "keep"], remove=["old", "absent"])

        assert list(tagged.tags) == ["keep", "new"]

    def test_tag_added_and_removed(self, registry, arrays):
        saved = save(registry.stub, arrays)

        with pytest.raises(grpc.RpcError) as caught:
            tag(registry.stub, saved.id, add=["best"], remove=["best"])

        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'best' is both added to and removed from" in caught.value.details()

    def test_bad_tag_and_unknown_id(self, registry, arrays):
        saved = save(registry.stub, arrays)

        with pytest.raises(grpc.RpcError) as caught:
            tag(registry.stub, saved.id, add=["a/b"])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Invalid tag name 'a/b'" in caught.value.details()

        with pytest.raises(grpc.RpcError) as caught:
            tag(registry.stub, "ps-0123456789ab", add=["best"])
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert_serving(registry.stub)


class TestDeleteParameterSet:
    def test_delete(self, registry, arrays):
        remaining = save(registry.stub, arrays)
        deleted = save(registry.stub, arrays)

        reply = registry.stub.DeleteParameterSet(model_registry_pb2.DeleteParameterSetRequest(id=deleted.id))

        assert reply.deleted
        assert [s.id for s in list_sets(registry.stub)] == [remaining.id]
        assert stored_blobs(registry.root) == sorted(f"{remaining.id}/{name}" for name in arrays)
        with pytest.raises(grpc.RpcError) as caught:
            registry.stub.GetParameterSet(model_registry_pb2.GetParameterSetRequest(id=deleted.id))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    def test_delete_twice(self, registry, arrays):
        saved = save(registry.stub, arrays)
        registry.stub.DeleteParameterSet(model_registry_pb2.DeleteParameterSetRequest(id=saved.id))

        with pytest.raises(grpc.RpcError) as caught:
            registry.stub.DeleteParameterSet(model_registry_pb2.DeleteParameterSetRequest(id=saved.id))

        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert saved.id in caught.value.details()
        assert_serving(registry.stub)

    def test_loading_deleted_set(self, registry, arrays):
        saved = save(registry.stub, arrays)
        registry.stub.DeleteParameterSet(model_registry_pb2.DeleteParameterSetRequest(id=saved.id))

        with pytest.raises(grpc.RpcError) as caught:
            load_arrays(registry.stub, saved.id)

        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
