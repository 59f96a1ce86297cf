"""The blob store contract, run against the local folder and against S3 through the minio SDK."""

import os

import pytest

from lasagne_engine.blobstore import LocalBlobStore, S3BlobStore

# Two full parts and a partial third at S3's smallest part size.
MULTIPART_BYTES = 12 << 20
PART_BYTES = 5 << 20


def payload(size: int) -> bytes:
    return os.urandom(size)


def write_in_chunks(store, key: str, data: bytes, chunk_bytes: int = 1 << 20) -> None:
    with store.writer(key) as writer:
        for offset in range(0, len(data), chunk_bytes):
            writer.write(data[offset : offset + chunk_bytes])
        writer.commit()


class TestRoundtrip:
    def test_put_and_get(self, blob_store):
        blob_store.put_bytes("a/b/c", b"hello")

        assert blob_store.get_bytes("a/b/c") == b"hello"
        assert blob_store.size("a/b/c") == 5

    def test_empty_object(self, blob_store):
        blob_store.put_bytes("empty", b"")

        assert blob_store.get_bytes("empty") == b""
        assert blob_store.size("empty") == 0

    def test_open_at_offset(self, blob_store):
        data = payload(1000)
        blob_store.put_bytes("k", data)

        with blob_store.open("k", 600) as stream:
            assert stream.read() == data[600:]
        with blob_store.open("k", 1000) as stream:
            assert stream.read() == b""

    def test_sequential_reads(self, blob_store):
        data = payload(100_000)
        blob_store.put_bytes("k", data)

        pieces = []
        with blob_store.open("k") as stream:
            while piece := stream.read(7_001):
                pieces.append(piece)

        assert b"".join(pieces) == data
        assert all(len(piece) == 7_001 for piece in pieces[:-1])

    def test_commit_replaces(self, blob_store):
        blob_store.put_bytes("k", b"old")
        blob_store.put_bytes("k", b"new value")

        assert blob_store.get_bytes("k") == b"new value"


class TestMissing:
    def test_open_missing(self, blob_store):
        with pytest.raises(KeyError):
            blob_store.open("missing")

    def test_size_missing(self, blob_store):
        with pytest.raises(KeyError):
            blob_store.size("missing")

    def test_delete_missing(self, blob_store):
        blob_store.delete("missing")


class TestListing:
    def test_list_prefix_sorted(self, blob_store):
        for key in ["d/2/x", "d/1/y", "d/1/x", "e/1/x"]:
            blob_store.put_bytes(key, b".")

        assert list(blob_store.list("d/")) == ["d/1/x", "d/1/y", "d/2/x"]
        assert list(blob_store.list("e/")) == ["e/1/x"]
        assert list(blob_store.list("f/")) == []

    def test_delete_prefix(self, blob_store):
        for key in ["d/1", "d/2", "e/1"]:
            blob_store.put_bytes(key, b".")

        assert blob_store.delete_prefix("d/") == 2

        assert list(blob_store.list("")) == ["e/1"]


class TestAtomicWrites:
    def test_invisible_before_commit(self, blob_store):
        with blob_store.writer("k") as writer:
            writer.write(b"partial")

            assert list(blob_store.list("")) == []
            with pytest.raises(KeyError):
                blob_store.size("k")
            writer.commit()

        assert blob_store.get_bytes("k") == b"partial"

    def test_abort_leaves_nothing(self, blob_store):
        with blob_store.writer("k") as writer:
            writer.write(b"partial")

        assert list(blob_store.list("")) == []

    def test_abort_keeps_previous_object(self, blob_store):
        blob_store.put_bytes("k", b"committed")

        with blob_store.writer("k") as writer:
            writer.write(b"replacement that never commits")

        assert blob_store.get_bytes("k") == b"committed"


class TestLargeObjects:
    def test_multipart_roundtrip(self, make_blob_store):
        store = make_blob_store(part_bytes=PART_BYTES)
        data = os.urandom(MULTIPART_BYTES)

        write_in_chunks(store, "big", data)

        assert store.size("big") == MULTIPART_BYTES
        with store.open("big", PART_BYTES - 3) as stream:
            assert stream.read() == data[PART_BYTES - 3 :]

    def test_multipart_invisible_before_commit(self, make_blob_store):
        store = make_blob_store(part_bytes=PART_BYTES)
        data = os.urandom(MULTIPART_BYTES)

        writer = store.writer("big")
        writer.write(data)

        assert list(store.list("")) == []
        writer.abort()
        assert list(store.list("")) == []
        assert store.abort_incomplete_writes("", keep=lambda key: False) == 0


class TestAbandonedWrites:
    def test_s3_dead_writer_upload_aborted(self, s3_server):
        store = s3_server.store(part_bytes=PART_BYTES)
        writer = store.writer("datasets/d/u1/x")
        writer.write(os.urandom(PART_BYTES + 1))
        # The writer is dropped without abort(), as when its process dies after the first part.
        del writer

        assert store.abort_incomplete_writes("datasets/", keep=lambda key: key == "datasets/d/u1/x") == 0
        assert store.abort_incomplete_writes("models/", keep=lambda key: False) == 0
        assert store.abort_incomplete_writes("datasets/", keep=lambda key: False) == 1
        assert store.abort_incomplete_writes("datasets/", keep=lambda key: False) == 0
        assert list(store.list("")) == []
        store.close()

    def test_local_sweep_spares_live_writes(self, tmp_path):
        store = LocalBlobStore(tmp_path)
        live = store.writer("a")
        live.write(b"in progress")
        dead = store.writer("b")
        dead.write(b"left by a crash")
        # Closing the file without removing it releases its lock, as the death of its process would.
        dead._file.close()

        LocalBlobStore(tmp_path)

        assert live._temporary_path.exists()
        assert not dead._temporary_path.exists()
        live.commit()
        assert store.get_bytes("a") == b"in progress"


def test_backends_are_distinct(blob_store, backend):
    assert isinstance(blob_store, {"local": LocalBlobStore, "s3": S3BlobStore}[backend])


def test_local_commit_syncs_folders(tmp_path, monkeypatch):
    # A power cut cannot be simulated, so the test records which files and folders get an fsync.
    store = LocalBlobStore(tmp_path / "blobs")
    store.put_bytes("datasets/old/1/x", b"makes datasets/ exist")
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store.put_bytes("datasets/new/2/x", b"payload")

    root = store.root
    blob_folder = str(root / "datasets" / "new" / "2")
    assert synced[0].startswith(str(root / ".incoming" / "blob-"))
    assert blob_folder in synced
    assert str(root / "datasets" / "new") in synced
    assert str(root / "datasets") in synced
    assert str(root) not in synced
    assert synced.index(blob_folder) > 0


def test_s3_read_of_deleted_object(s3_server):
    store = s3_server.store(backoff_s=0.01)
    store.put_bytes("d/1/x", payload(1000))

    # The reader sends its GET on the first read, so a delete after open() makes that GET fail.
    with store.open("d/1/x") as stream:
        store.delete("d/1/x")
        with pytest.raises(KeyError, match="d/1/x"):
            stream.read()
    store.close()
