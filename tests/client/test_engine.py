import pytest

from lasagne_engine.client import Engine
from lasagne_engine.config import StreamLimits
from lasagne_engine.rpc import Server


def test_health_reports_each_service():
    server = Server("127.0.0.1:0", limits=StreamLimits())
    server.add_service_name("lasagne_engine.v1.ModelRegistry")
    server.add_service_name("lasagne_engine.v1.DataService")
    server.start()
    try:
        addresses = {"registry_address": server.address, "data_address": server.address}
        with Engine(**addresses, trainer_address=server.address) as engine:
            health = engine.health()
    finally:
        server.stop(grace_s=None)

    # The server does not report the trainer's service name, so the trainer counts as down.
    assert health == {"registry": True, "data": True, "trainer": False}


def test_addresses_default_from_environment(monkeypatch):
    monkeypatch.setenv("LASAGNE_ENGINE_DATA_ADDRESS", "127.0.0.1:6001")
    monkeypatch.delenv("LASAGNE_ENGINE_REGISTRY_ADDRESS", raising=False)

    with Engine(trainer_address="127.0.0.1:6003") as engine:
        assert engine.addresses.registry == "127.0.0.1:50151"
        assert engine.addresses.data == "127.0.0.1:6001"
        assert engine.addresses.trainer == "127.0.0.1:6003"


# Addresses where nothing listens; the tests that use them never open a connection.
UNUSED_ADDRESSES = {
    "registry_address": "127.0.0.1:6001",
    "data_address": "127.0.0.1:6002",
    "trainer_address": "127.0.0.1:6003",
}


def test_closed_engine_rejects_calls():
    with Engine(**UNUSED_ADDRESSES) as engine:
        pass

    with pytest.raises(RuntimeError, match="This Engine is closed; create a new Engine"):
        engine.get_model("mlp")
    with pytest.raises(RuntimeError, match="This Engine is closed"):
        engine.health()
    engine.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout_s": 0}, r"timeout_s=0 must be a positive number of seconds"),
        ({"limits": StreamLimits(chunk_bytes=0)}, r"limits.chunk_bytes=0 must be positive"),
        ({"limits": StreamLimits(chunk_bytes=2048, max_message_bytes=2048)}, r"at least 1 KiB below"),
    ],
    ids=["timeout", "zero-chunk", "chunk-above-message-limit"],
)
def test_invalid_options_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        Engine(**UNUSED_ADDRESSES, **options)
