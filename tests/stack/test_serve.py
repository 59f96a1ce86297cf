import pytest

from lasagne_engine import rpc
from lasagne_engine.config import Addresses, Paths
from lasagne_engine.stack import build_servers
from lasagne_engine.stack.daemon import SERVICE_NAMES
from lasagne_engine.stack.serve import stop_servers


def loopback_addresses() -> Addresses:
    return Addresses(registry="127.0.0.1:0", data="127.0.0.1:0", trainer="127.0.0.1:0")


def test_every_server_reports_health(tmp_path):
    servers = build_servers(["registry", "data", "trainer"], paths=Paths(tmp_path), addresses=loopback_addresses())
    for server in servers.values():
        server.start()
    try:
        for role, server in servers.items():
            assert rpc.is_serving(server.address), role
            assert rpc.is_serving(server.address, service=SERVICE_NAMES[role]), role
            other_roles = [other for other in SERVICE_NAMES if other != role]
            assert not rpc.is_serving(server.address, service=SERVICE_NAMES[other_roles[0]])
    finally:
        stop_servers(servers, grace_s=1.0)


def test_single_role_serves_only_itself(tmp_path):
    servers = build_servers(["data"], paths=Paths(tmp_path), addresses=loopback_addresses())

    assert list(servers) == ["data"]
    servers["data"].start()
    try:
        assert rpc.is_serving(servers["data"].address, service=SERVICE_NAMES["data"])
    finally:
        stop_servers(servers, grace_s=1.0)


def test_unknown_role_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="Unknown role 'scheduler'"):
        build_servers(["scheduler"], paths=Paths(tmp_path), addresses=loopback_addresses())
