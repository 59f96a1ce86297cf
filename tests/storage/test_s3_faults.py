"""The S3 blob store through a proxy that drops, delays and breaks requests on 127.0.0.1."""

import hashlib
import os
import re

import pytest

from lasagne_engine.blobstore import BlobStoreFull, BlobStoreUnavailable, S3BlobStore, S3Location
from lasagne_engine.blobstore import s3 as s3_module

from .conftest import FAST_BACKOFF_S
from .faulty_proxy import Delay, Drop, Fail, FaultyProxy, LoseResponse, Truncate
from .s3_server import free_port

PART_BYTES = 5 << 20
OBJECT_BYTES = 3 * PART_BYTES + 12345


@pytest.fixture
def proxy(s3_server):
    running = FaultyProxy(s3_server.endpoint).start()
    yield running
    running.stop()


@pytest.fixture
def proxied_store(s3_server, proxy):
    """A store on a new bucket whose requests go through ``proxy``, with 2 s timeouts."""
    store = s3_server.store(endpoint=proxy.endpoint, part_bytes=PART_BYTES, backoff_s=FAST_BACKOFF_S, timeout_s=2.0)
    yield store
    store.close()


def part_number(request) -> int | None:
    match = re.search(r"partNumber=(\d+)", request.query)
    return int(match.group(1)) if match else None


class FirstAttemptFaults:
    """Injects one fault into the first request that matches each rule, and none into its retries."""

    def __init__(self, rules):
        self.rules = list(rules)

    def __call__(self, request):
        for index, (matches, fault) in enumerate(self.rules):
            if matches(request):
                del self.rules[index]
                return fault
        return None


class TestMultipartThroughFaults:
    def test_object_arrives_whole(self, proxied_store, proxy):
        data = os.urandom(OBJECT_BYTES)
        proxy.policy = FirstAttemptFaults(
            [
                (lambda r: part_number(r) == 1, LoseResponse()),
                (lambda r: part_number(r) == 2, Drop()),
                (lambda r: part_number(r) == 3, Delay(0.3)),
                (lambda r: part_number(r) == 4, Fail(503, "SlowDown", "Please reduce your request rate.")),
                (lambda r: r.method == "POST" and "uploadId=" in r.query, LoseResponse()),
            ]
        )
        retries_before = _retries_total()

        with proxied_store.writer("big") as writer:
            for offset in range(0, len(data), 1 << 20):
                writer.write(data[offset : offset + (1 << 20)])
            writer.commit()

        assert proxy.policy.rules == []
        assert len(proxy.faults()) == 5
        # The delayed part succeeds on its first attempt; the other four faults each cost one retry.
        assert _retries_total() - retries_before == 4
        uploaded = [part_number(request) for request, _ in proxy.log if part_number(request)]
        assert sorted(set(uploaded)) == [1, 2, 3, 4]
        assert len(uploaded) == 7
        with proxied_store.open("big") as stream:
            assert hashlib.sha256(stream.read()).hexdigest() == hashlib.sha256(data).hexdigest()

    def test_download_resumes_after_truncation(self, proxied_store, proxy):
        data = os.urandom(2 * PART_BYTES)
        proxied_store.put_bytes("blob", data)
        proxy.policy = FirstAttemptFaults([(lambda r: r.method == "GET", Truncate(3 << 20))])

        with proxied_store.open("blob", 1000) as stream:
            received = stream.read()

        assert received == data[1000:]
        ranges = [request for request, _ in proxy.log if request.method == "GET"]
        assert len(ranges) == 2


class TestUnavailable:
    def test_unreachable_endpoint(self):
        unreachable = S3BlobStore(
            S3Location(bucket="unreachable", prefix="", endpoint=f"127.0.0.1:{free_port()}", secure=False),
            max_attempts=3,
            backoff_s=FAST_BACKOFF_S,
        )

        with pytest.raises(BlobStoreUnavailable, match=r"failed to store 'k' after 3 attempts .* Check that the endpoint"):
            unreachable.put_bytes("k", b"data")
        with pytest.raises(BlobStoreUnavailable, match=r"127\.0\.0\.1:\d+ failed to look up 'k' after 3 attempts"):
            unreachable.size("k")
        unreachable.close()

    def test_slow_server_times_out(self, proxied_store, proxy):
        proxied_store.max_attempts = 2
        proxy.policy = lambda request: Delay(3.0) if request.method == "PUT" else None

        with pytest.raises(BlobStoreUnavailable, match="after 2 attempts") as raised:
            proxied_store.put_bytes("k", b"data")

        assert raised.value.code.name == "UNAVAILABLE"
        assert "ReadTimeoutError" in str(raised.value) or "timed out" in str(raised.value)

    def test_recovers_when_server_returns(self, proxied_store, proxy):
        down = {"value": True}
        proxy.policy = lambda request: Drop() if down["value"] else None
        proxied_store.max_attempts = 2

        with pytest.raises(BlobStoreUnavailable):
            proxied_store.put_bytes("k", b"data")
        down["value"] = False
        proxied_store.put_bytes("k", b"data")

        assert proxied_store.get_bytes("k") == b"data"


class TestFull:
    @pytest.mark.parametrize("code", ["XMinioStorageFull", "QuotaExceeded"])
    def test_storage_full(self, proxied_store, proxy, code):
        full = Fail(507, code, "Storage backend has reached its minimum free drive threshold.")
        proxy.policy = lambda request: full if request.method == "PUT" else None

        with pytest.raises(BlobStoreFull, match=rf"has no room to store 'k': {code}") as raised:
            proxied_store.put_bytes("k", b"data")

        assert raised.value.code.name == "RESOURCE_EXHAUSTED"
        assert len(proxy.faults()) == 1

    def test_full_multipart_is_aborted(self, proxied_store, proxy):
        proxy.policy = lambda request: Fail(507, "XMinioStorageFull") if part_number(request) == 2 else None

        with pytest.raises(BlobStoreFull):
            with proxied_store.writer("big") as writer:
                writer.write(os.urandom(2 * PART_BYTES + 1))
                writer.commit()

        proxy.policy = lambda request: None
        assert proxied_store.abort_incomplete_writes("", keep=lambda key: False) == 0
        assert list(proxied_store.list("")) == []


def _retries_total() -> float:
    return sum(
        sample.value
        for metric in s3_module.RETRIES.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
