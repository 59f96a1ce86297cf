"""A network link cut in the middle of a load: the client resumes where the stream stopped."""

import logging
import re

import numpy as np
import pytest

from lasagne_engine.client import Engine
from lasagne_engine.config import StreamLimits
from tests.faults.tcp_proxy import CuttingProxy
from tests.faults.test_kill import CHUNK_BYTES, engine_for, sha256_hex
from tests.security.services import MODEL_NAME


@pytest.fixture
def proxy_to():
    """Return a function that starts a :class:`CuttingProxy` to an address; the proxies stop afterwards."""
    proxies = []

    def start(upstream: str) -> CuttingProxy:
        proxy = CuttingProxy(upstream).start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()


def test_load_resumes_after_cut(start_service, proxy_to, caplog):
    registry = start_service("registry")
    rng = np.random.default_rng(5)
    arrays = {
        "a": rng.standard_normal(1 << 18).astype(np.float32),  # 1 MiB
        "b": rng.standard_normal(1 << 19).astype(np.float32),  # 2 MiB
        "c": rng.integers(0, 100, size=1 << 17, dtype=np.int64),  # 1 MiB
    }
    total_bytes = sum(array.nbytes for array in arrays.values())
    with engine_for(registry) as engine:
        saved = engine.save_parameter_set(MODEL_NAME, arrays)

    proxy = proxy_to(registry.address)
    # The proxy passes 3 MiB, up to the middle of array 'b'. The client receives less, because the
    # bytes still in flight when the connection closes are lost.
    cut_after_bytes = 3 << 20
    proxy.cut_next_connection(cut_after_bytes)
    with caplog.at_level(logging.WARNING, logger="lasagne_engine.client.engine"):
        with Engine(
            registry_address=proxy.endpoint,
            data_address=registry.address,
            trainer_address=registry.address,
            limits=StreamLimits(chunk_bytes=CHUNK_BYTES),
            token="",
            max_retries=5,
        ) as engine:
            loaded = engine.load_parameter_set(saved.id)

    assert proxy.cuts == 1
    assert list(loaded) == list(arrays)
    for name, array in arrays.items():
        assert sha256_hex(loaded[name]) == sha256_hex(array), name

    resumes = [record.getMessage() for record in caplog.records if "resuming in" in record.getMessage()]
    assert len(resumes) == 1
    position = re.search(rf"Load of parameter set {saved.id!r} failed at byte (\d+) of array '([\w.-]+)'", resumes[0])
    assert position is not None, resumes[0]
    offset, array_name = int(position[1]), position[2]
    assert f"LoadParameterSet of {saved.id} resumes at byte {offset} of array {array_name!r}" in registry.log()
    # A load that started again from byte 0 would send every byte on the second connection.
    resumed_bytes = proxy.downstream_bytes[-1]
    assert resumed_bytes < total_bytes
