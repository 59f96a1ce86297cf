"""Reading TLS files and tokens from the environment and the config file."""

import logging
import os

import pytest

from lasagne_engine.client import Engine
from lasagne_engine.security import ClientSecurity, ServerSecurity, config_path, token_fingerprint

TOKEN = "t" * 32
OTHER_TOKEN = "o" * 32


@pytest.fixture
def clean_environment(monkeypatch):
    for variable in list(os.environ):
        if variable.startswith(("LASAGNE_ENGINE_TOKEN", "LASAGNE_ENGINE_TLS_", "LASAGNE_ENGINE_ALLOW")):
            monkeypatch.delenv(variable)
    monkeypatch.delenv("LASAGNE_ENGINE_CONFIG", raising=False)
    return monkeypatch


def write_config(path, text: str):
    path.write_text(text)
    path.chmod(0o600)
    return path


class TestClientSecurity:
    def test_file_with_relative_paths(self, tmp_path, development_tls, clean_environment):
        (tmp_path / "tls").symlink_to(development_tls.folder)
        config = write_config(
            tmp_path / "config.toml", f'[client]\ntoken = "{TOKEN}"\ntls_ca = "tls/ca.pem"\n'
        )

        security = ClientSecurity.from_env(config)

        assert security.token == TOKEN
        assert security.tls_ca == tmp_path / "tls" / "ca.pem"
        assert security.tls

    def test_environment_overrides_file(self, tmp_path, clean_environment):
        config = write_config(tmp_path / "config.toml", f'[client]\ntoken = "{TOKEN}"\n')
        clean_environment.setenv("LASAGNE_ENGINE_TOKEN", OTHER_TOKEN)

        assert ClientSecurity.from_env(config).token == OTHER_TOKEN

    def test_missing_file_is_empty(self, tmp_path, clean_environment):
        assert ClientSecurity.from_env(tmp_path / "absent.toml") == ClientSecurity()

    def test_default_path_follows_home(self, tmp_path, clean_environment):
        clean_environment.setenv("LASAGNE_ENGINE_HOME", str(tmp_path))

        assert config_path() == tmp_path / "config.toml"

    def test_short_token_is_rejected_without_showing_it(self):
        with pytest.raises(ValueError, match="has 6 characters; use at least 16") as raised:
            ClientSecurity(token="secret")

        assert "secret" not in str(raised.value).split("characters")[0]

    def test_token_with_space_is_rejected(self):
        with pytest.raises(ValueError, match="spaces or characters outside printable ASCII"):
            ClientSecurity(token="a" * 10 + " " + "b" * 10)

    def test_missing_ca_file(self, tmp_path, clean_environment):
        clean_environment.setenv("LASAGNE_ENGINE_TLS_CA", str(tmp_path / "nope.pem"))

        with pytest.raises(ValueError, match=r"LASAGNE_ENGINE_TLS_CA names .*nope.pem', which is not a file"):
            ClientSecurity.from_env(tmp_path / "absent.toml")

    def test_certificate_without_key(self, development_tls):
        with pytest.raises(ValueError, match="both a client certificate and its key"):
            ClientSecurity(tls_ca=development_tls.ca_cert, tls_cert=development_tls.client_cert)

    def test_invalid_toml(self, tmp_path):
        config = write_config(tmp_path / "config.toml", "[client\n")

        with pytest.raises(ValueError, match="is not valid TOML"):
            ClientSecurity.from_env(config)

    def test_repr_hides_token(self):
        assert TOKEN not in repr(ClientSecurity(token=TOKEN))
        assert token_fingerprint(TOKEN) in repr(ClientSecurity(token=TOKEN))

    def test_readable_config_with_tokens_warns(self, tmp_path, caplog):
        config = tmp_path / "config.toml"
        config.write_text(f'[client]\ntoken = "{TOKEN}"\n')
        config.chmod(0o644)

        with caplog.at_level(logging.WARNING, logger="lasagne_engine.security"):
            ClientSecurity.from_env(config)

        assert "other users may read it" in caplog.text
        assert TOKEN not in caplog.text

    def test_engine_reads_config_path(self, tmp_path, development_tls, clean_environment):
        config = write_config(
            tmp_path / "config.toml", f'[client]\ntoken = "{TOKEN}"\ntls_ca = "{development_tls.ca_cert}"\n'
        )

        with Engine(config_path=config) as from_file, Engine(config_path=config, token="") as overridden:
            assert from_file.security.token == TOKEN
            assert from_file.security.tls_ca == development_tls.ca_cert
            assert overridden.security.token == ""


class TestServerSecurity:
    def test_file_and_environment(self, tmp_path, development_tls, clean_environment):
        config = write_config(
            tmp_path / "config.toml",
            f'[server]\ntls_cert = "{development_tls.server_cert}"\ntls_key = "{development_tls.server_key}"\n'
            f'read_only_tokens = ["{TOKEN}"]\n',
        )
        clean_environment.setenv("LASAGNE_ENGINE_TOKENS_READ_WRITE", f"{OTHER_TOKEN}, {'w' * 20}")

        security = ServerSecurity.from_env(config)

        assert security.tls
        assert security.read_only_tokens == (TOKEN,)
        assert security.read_write_tokens == (OTHER_TOKEN, "w" * 20)
        assert security.authenticates_clients
        assert TOKEN not in repr(security)

    def test_token_in_both_lists(self):
        with pytest.raises(ValueError, match="is both read-only and read-write"):
            ServerSecurity(read_only_tokens=(TOKEN,), read_write_tokens=(TOKEN,))

    def test_client_ca_needs_tls(self, development_tls):
        with pytest.raises(ValueError, match="Requiring client certificates"):
            ServerSecurity(tls_client_ca=development_tls.ca_cert)

    def test_allow_insecure_bind_from_environment(self, tmp_path, clean_environment):
        clean_environment.setenv("LASAGNE_ENGINE_ALLOW_INSECURE_BIND", "1")

        assert ServerSecurity.from_env(tmp_path / "absent.toml").allow_insecure_bind

    def test_tokens_must_be_a_list(self, tmp_path, clean_environment):
        config = write_config(tmp_path / "config.toml", f'[server]\nread_write_tokens = "{TOKEN}"\n')

        with pytest.raises(ValueError, match="must be a list of strings"):
            ServerSecurity.from_env(config)
