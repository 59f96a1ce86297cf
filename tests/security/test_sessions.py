"""What session processes receive, and a session that trains against services with TLS and tokens."""

import os
import pathlib

import pytest

from lasagne_engine.client import Engine
from lasagne_engine.client.demo import MODEL_SOURCE, digits_split
from lasagne_engine.trainer.launcher import LaunchRequest, LocalLauncher
from lasagne_engine.trainer.worker import TOKEN_VARIABLE
from lasagne_engine.v1 import trainer_pb2

from .conftest import READ_WRITE_TOKEN


def launch_request(tmp_path: pathlib.Path) -> LaunchRequest:
    return LaunchRequest(
        session_id="s-0123456789ab",
        token="session-secret-" + "5" * 20,
        trainer_address="127.0.0.1:1",
        device="cpu:0",
        backend="default",
        working_dir=tmp_path,
    )


def test_session_environment_carries_only_client_settings(tmp_path, monkeypatch, development_tls):
    server_tokens = "server-only-" + "7" * 20
    monkeypatch.setenv("LASAGNE_ENGINE_TOKENS_READ_WRITE", server_tokens)
    monkeypatch.setenv("LASAGNE_ENGINE_TOKENS_READ_ONLY", "server-read-" + "8" * 20)
    monkeypatch.setenv("LASAGNE_ENGINE_TLS_SERVER_KEY", str(development_tls.server_key))
    monkeypatch.setenv("LASAGNE_ENGINE_TLS_SERVER_CERT", str(development_tls.server_cert))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-sessions")
    monkeypatch.setenv("MINIO_ROOT_PASSWORD", "not-for-sessions")
    monkeypatch.setenv("LASAGNE_ENGINE_TOKEN", READ_WRITE_TOKEN)
    monkeypatch.setenv("LASAGNE_ENGINE_TLS_CA", str(development_tls.ca_cert))

    environment = LocalLauncher(compile_cache=tmp_path / "cache").environment(launch_request(tmp_path))

    assert environment["LASAGNE_ENGINE_TOKEN"] == READ_WRITE_TOKEN
    assert environment["LASAGNE_ENGINE_TLS_CA"] == str(development_tls.ca_cert)
    assert environment["LASAGNE_ENGINE_CONFIG"] == os.devnull
    assert environment[TOKEN_VARIABLE] == "session-secret-" + "5" * 20
    for withheld in (
        "LASAGNE_ENGINE_TOKENS_READ_WRITE",
        "LASAGNE_ENGINE_TOKENS_READ_ONLY",
        "LASAGNE_ENGINE_TLS_SERVER_KEY",
        "LASAGNE_ENGINE_TLS_SERVER_CERT",
        "AWS_SECRET_ACCESS_KEY",
        "MINIO_ROOT_PASSWORD",
    ):
        assert withheld not in environment
    assert server_tokens not in "".join(environment.values())


def test_session_environment_without_security(tmp_path, monkeypatch):
    for variable in ("LASAGNE_ENGINE_TOKEN", "LASAGNE_ENGINE_TLS_CA"):
        monkeypatch.delenv(variable, raising=False)

    environment = LocalLauncher(compile_cache=tmp_path / "cache").environment(launch_request(tmp_path))

    assert "LASAGNE_ENGINE_TOKEN" not in environment
    assert "LASAGNE_ENGINE_TLS_CA" not in environment
    assert environment["LASAGNE_ENGINE_CONFIG"] == os.devnull


@pytest.mark.slow
def test_session_trains_with_tls_and_tokens(secure_stack):
    with Engine(**secure_stack.addresses(), token=READ_WRITE_TOKEN, tls_ca=secure_stack.tls.ca_cert) as engine:
        dataset = engine.upload_dataset("digits", digits_split())
        model = engine.register_model("mlp", MODEL_SOURCE.read_text(), default_hyperparameters={"hidden_units": 32})
        session = engine.start_session(
            f"{model.name}@{model.version}", f"{dataset.name}@{dataset.version}", epochs=1, batch_size=64
        )
        final = engine.wait_session(session.id, timeout_s=300)
        saved = engine.list_parameter_sets(session_id=session.id)

    # The session process downloaded, attached and saved over TLS with the token it was given.
    assert final.state == trainer_pb2.COMPLETED, final.error
    assert len(saved) == 1
    assert final.last_parameter_set_id == saved[0].id
