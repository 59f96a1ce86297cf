import pathlib
import subprocess
import sys

import pytest

from lasagne_engine import rpc
from lasagne_engine.stack.healthcheck import main, reachable_address, resolve_target


@pytest.fixture
def registry_like_server():
    server = rpc.Server("127.0.0.1:0")
    server.add_service_name("lasagne_engine.v1.ModelRegistry")
    server.start()
    yield server
    server.stop(grace_s=None)


def test_healthcheck_serving_address(registry_like_server):
    assert main([registry_like_server.address]) == 0


def test_healthcheck_role_reads_listen_address(registry_like_server, monkeypatch):
    monkeypatch.setenv("LASAGNE_ENGINE_REGISTRY_ADDRESS", f"0.0.0.0:{registry_like_server.port}")

    assert main(["registry"]) == 0


def test_healthcheck_role_checks_its_service(registry_like_server, monkeypatch, capsys):
    monkeypatch.setenv("LASAGNE_ENGINE_TRAINER_ADDRESS", registry_like_server.address)

    assert main(["trainer", "--timeout-s", "2"]) == 1
    assert f"lasagne_engine.v1.Trainer at {registry_like_server.address} is not SERVING" in capsys.readouterr().err


def test_healthcheck_stopped_server(capsys):
    server = rpc.Server("127.0.0.1:0")
    server.start()
    address = server.address
    server.stop(grace_s=None)

    assert main([address, "--timeout-s", "1"]) == 1
    assert f"the server at {address} is not SERVING" in capsys.readouterr().err


def test_healthcheck_reports_bad_client_settings(registry_like_server, monkeypatch, capsys):
    monkeypatch.setenv("LASAGNE_ENGINE_TLS_CA", "/nonexistent/ca.pem")

    assert main([registry_like_server.address]) == 1
    assert "Invalid client settings: LASAGNE_ENGINE_TLS_CA names '/nonexistent/ca.pem'" in capsys.readouterr().err


def test_healthcheck_unknown_role(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["scheduler"])

    assert exit_info.value.code == 2
    assert "Unknown role 'scheduler'; give one of registry, data, trainer" in capsys.readouterr().err


def test_healthcheck_rejects_bad_timeout(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["registry", "--timeout-s", "0"])

    assert exit_info.value.code == 2
    assert "--timeout-s 0.0 must be a positive number of seconds" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("address", "expected"),
    [("0.0.0.0:50151", "127.0.0.1:50151"), ("[::]:50151", "127.0.0.1:50151"), ("registry:50151", "registry:50151")],
)
def test_reachable_address(address, expected):
    assert reachable_address(address) == expected


def test_resolve_target_service_override():
    assert resolve_target("data:50152", "lasagne_engine.v1.DataService") == (
        "data:50152", "lasagne_engine.v1.DataService")
    assert resolve_target("data:50152") == ("data:50152", "")


def test_healthcheck_console_script(registry_like_server):
    script = pathlib.Path(sys.executable).parent / "lasagne-engine-healthcheck"

    result = subprocess.run([str(script), registry_like_server.address], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
