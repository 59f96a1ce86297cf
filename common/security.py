"""TLS files and bearer tokens of servers and clients, read from the environment or a config file.

The config file is TOML, at ``$LASAGNE_ENGINE_CONFIG`` or ``<home>/config.toml``; ``lasagne-engine
up --tls`` writes one. Relative paths in it are relative to its folder::

    [client]
    token = "..."                  # sent as "authorization: Bearer <token>" with every call
    tls_ca = "tls/ca.pem"          # verify the servers with this CA; setting it turns TLS on
    tls_cert = "tls/client.pem"    # client certificate, for servers that require one
    tls_key = "tls/client.key"

    [server]
    tls_cert = "tls/server.pem"    # setting it and tls_key turns TLS on
    tls_key = "tls/server.key"
    tls_client_ca = "tls/ca.pem"   # require client certificates signed by this CA
    read_only_tokens = ["..."]     # may call List*, Get*, Describe*, Download*, Load*, Watch*
    read_write_tokens = ["..."]    # may call everything
    allow_insecure_bind = false    # serve on a non-loopback address without TLS and authentication

Each environment variable overrides its field of the file: ``LASAGNE_ENGINE_TOKEN``,
``LASAGNE_ENGINE_TLS_CA``, ``LASAGNE_ENGINE_TLS_CERT`` and ``LASAGNE_ENGINE_TLS_KEY`` for the
client; ``LASAGNE_ENGINE_TLS_SERVER_CERT``, ``LASAGNE_ENGINE_TLS_SERVER_KEY``,
``LASAGNE_ENGINE_TLS_CLIENT_CA``, ``LASAGNE_ENGINE_TOKENS_READ_ONLY`` and
``LASAGNE_ENGINE_TOKENS_READ_WRITE`` (comma-separated) and ``LASAGNE_ENGINE_ALLOW_INSECURE_BIND``
(``1`` or ``true``) for the server. Tokens never come from the command line, where shell history
and process listings would keep them.
"""

import dataclasses
import hashlib
import logging
import os
import pathlib
import stat
import tomllib

from lasagne_engine.config import default_home

__all__ = [
    "ClientSecurity",
    "MIN_TOKEN_LENGTH",
    "ServerSecurity",
    "config_path",
    "load_config",
    "token_fingerprint",
]

logger = logging.getLogger(__name__)

CONFIG_VARIABLE = "LASAGNE_ENGINE_CONFIG"
CONFIG_FILENAME = "config.toml"
# 16 characters of secrets.token_urlsafe carry 96 bits; shorter tokens are likely typed by hand.
MIN_TOKEN_LENGTH = 16
TOKEN_HINT = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def config_path(home: pathlib.Path | None = None) -> pathlib.Path:
    """Return the config file's path: ``$LASAGNE_ENGINE_CONFIG``, else ``<home>/config.toml``.

    ``home`` defaults to ``$LASAGNE_ENGINE_HOME`` or ``~/.lasagne-engine``. The file need not exist.
    """
    configured = os.environ.get(CONFIG_VARIABLE)
    if configured:
        return pathlib.Path(configured).expanduser()
    return (home if home is not None else default_home()) / CONFIG_FILENAME


def load_config(path: pathlib.Path) -> dict:
    """Read the config file at ``path``; a missing file reads as empty.

    Raises
    ------
    ValueError
        If the file is not valid TOML.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except IsADirectoryError as error:
        raise ValueError(f"Config file {str(path)!r} is a folder; point {CONFIG_VARIABLE} at a TOML file.") from error
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"Config file {str(path)!r} is not valid TOML: {error}.") from error
    _warn_if_readable_by_others(path, config)
    return config


def token_fingerprint(token: str) -> str:
    """Return the first 8 hex digits of the token's sha256, which identify a token in logs without revealing it."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:8]


@dataclasses.dataclass(frozen=True)
class ClientSecurity:
    """Credentials a client presents to the services: a bearer token and TLS files.

    Attributes
    ----------
    token : str
        Bearer token sent with every call; empty sends none.
    tls_ca : pathlib.Path or None
        PEM file of the CA that signed the servers' certificates. Setting it turns TLS on.
    tls_cert, tls_key : pathlib.Path or None
        PEM files of a client certificate and its key, for servers that require one.
    """

    token: str = ""
    tls_ca: pathlib.Path | None = None
    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None

    def __post_init__(self) -> None:
        if self.token:
            _check_token(self.token, source="the client token")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("Give both a client certificate and its key (tls_cert and tls_key), or neither.")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError(
                "A client certificate needs TLS; give tls_ca, the CA file that signed the servers' certificates."
            )

    def __repr__(self) -> str:
        # The token stays out of reprs, which end up in logs and tracebacks.
        token = token_fingerprint(self.token) if self.token else "none"
        return f"ClientSecurity(token={token}, tls_ca={self.tls_ca}, tls_cert={self.tls_cert})"

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None

    @classmethod
    def from_env(cls, path: pathlib.Path | None = None) -> "ClientSecurity":
        """Read the client's settings from the environment and the ``[client]`` section of the config file.

        Parameters
        ----------
        path : pathlib.Path, optional
            Config file. Default :func:`config_path`.

        Raises
        ------
        ValueError
            If the file is not valid TOML, a path does not exist, or the token is too short.
        """
        path = path if path is not None else config_path()
        section = _section(load_config(path), "client", path)
        return cls(
            token=_setting("LASAGNE_ENGINE_TOKEN", section, "token", path) or "",
            tls_ca=_path_setting("LASAGNE_ENGINE_TLS_CA", section, "tls_ca", path),
            tls_cert=_path_setting("LASAGNE_ENGINE_TLS_CERT", section, "tls_cert", path),
            tls_key=_path_setting("LASAGNE_ENGINE_TLS_KEY", section, "tls_key", path),
        )

    def environment(self) -> dict[str, str]:
        """Return the environment variables that give a child process these settings and no others."""
        variables = {CONFIG_VARIABLE: os.devnull}
        if self.token:
            variables["LASAGNE_ENGINE_TOKEN"] = self.token
        for name, value in (
            ("LASAGNE_ENGINE_TLS_CA", self.tls_ca),
            ("LASAGNE_ENGINE_TLS_CERT", self.tls_cert),
            ("LASAGNE_ENGINE_TLS_KEY", self.tls_key),
        ):
            if value is not None:
                variables[name] = str(value)
        return variables


@dataclasses.dataclass(frozen=True)
class ServerSecurity:
    """Requirements a server places on its clients: TLS files and the tokens it accepts.

    Attributes
    ----------
    tls_cert, tls_key : pathlib.Path or None
        PEM files of the server's certificate chain and key. Setting both turns TLS on.
    tls_client_ca : pathlib.Path or None
        PEM file of the CA whose client certificates the server requires. Default: none required.
    read_only_tokens, read_write_tokens : tuple of str
        Accepted bearer tokens. When both are empty the server accepts calls without a token.
    allow_insecure_bind : bool
        Serve on an address other than loopback without TLS and authentication, with a warning.
    """

    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None
    tls_client_ca: pathlib.Path | None = None
    read_only_tokens: tuple[str, ...] = ()
    read_write_tokens: tuple[str, ...] = ()
    allow_insecure_bind: bool = False

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("Give both a server certificate and its key (tls_cert and tls_key), or neither.")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("Requiring client certificates (tls_client_ca) needs TLS; give tls_cert and tls_key too.")
        for kind, tokens in (("read-only", self.read_only_tokens), ("read-write", self.read_write_tokens)):
            for position, token in enumerate(tokens, start=1):
                _check_token(token, source=f"{kind} token {position}")
        both = set(self.read_only_tokens) & set(self.read_write_tokens)
        if both:
            raise ValueError(
                f"Token {token_fingerprint(next(iter(both)))} is both read-only and read-write; list it once."
            )

    def __repr__(self) -> str:
        return (
            f"ServerSecurity(tls_cert={self.tls_cert}, tls_client_ca={self.tls_client_ca}, "
            f"read_only_tokens={len(self.read_only_tokens)}, read_write_tokens={len(self.read_write_tokens)}, "
            f"allow_insecure_bind={self.allow_insecure_bind})"
        )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def requires_token(self) -> bool:
        return bool(self.read_only_tokens or self.read_write_tokens)

    @property
    def authenticates_clients(self) -> bool:
        """Whether every call must prove who sent it, by a token or a client certificate."""
        return self.requires_token or self.tls_client_ca is not None

    @classmethod
    def from_env(cls, path: pathlib.Path | None = None) -> "ServerSecurity":
        """Read the server's settings from the environment and the ``[server]`` section of the config file.

        Parameters
        ----------
        path : pathlib.Path, optional
            Config file. Default :func:`config_path`.

        Raises
        ------
        ValueError
            If the file is not valid TOML, a path does not exist, or a token is too short or listed twice.
        """
        path = path if path is not None else config_path()
        section = _section(load_config(path), "server", path)
        allow = _setting("LASAGNE_ENGINE_ALLOW_INSECURE_BIND", section, "allow_insecure_bind", path)
        return cls(
            tls_cert=_path_setting("LASAGNE_ENGINE_TLS_SERVER_CERT", section, "tls_cert", path),
            tls_key=_path_setting("LASAGNE_ENGINE_TLS_SERVER_KEY", section, "tls_key", path),
            tls_client_ca=_path_setting("LASAGNE_ENGINE_TLS_CLIENT_CA", section, "tls_client_ca", path),
            read_only_tokens=_tokens_setting("LASAGNE_ENGINE_TOKENS_READ_ONLY", section, "read_only_tokens", path),
            read_write_tokens=_tokens_setting("LASAGNE_ENGINE_TOKENS_READ_WRITE", section, "read_write_tokens", path),
            allow_insecure_bind=allow in (True, "1", "true", "True", "yes"),
        )


def _check_token(token: str, *, source: str) -> None:
    # The message never contains the token itself.
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"The {source} has {len(token)} characters; use at least {MIN_TOKEN_LENGTH} random characters ({TOKEN_HINT})."
        )
    if not token.isascii() or not token.isprintable() or any(character.isspace() for character in token):
        raise ValueError(
            f"The {source} contains spaces or characters outside printable ASCII, which a gRPC header cannot carry; "
            f"{TOKEN_HINT}."
        )


def _section(config: dict, name: str, path: pathlib.Path) -> dict:
    section = config.get(name, {})
    if not isinstance(section, dict):
        raise ValueError(f"Config file {str(path)!r} has {name!r} as a value; write it as a [{name}] table.")
    return section


def _setting(variable: str, section: dict, key: str, path: pathlib.Path):
    value = os.environ.get(variable)
    if value:
        return value
    value = section.get(key)
    if key == "token" and value is not None and not isinstance(value, str):
        raise ValueError(f"token in {str(path)!r} must be a string in quotes.")
    return value


def _path_setting(variable: str, section: dict, key: str, path: pathlib.Path) -> pathlib.Path | None:
    from_environment = os.environ.get(variable)
    if from_environment:
        resolved, source = pathlib.Path(from_environment).expanduser(), variable
    elif section.get(key):
        if not isinstance(section[key], str):
            raise ValueError(f"{key} in {str(path)!r} is {section[key]!r}; write it as a path in quotes.")
        # Relative paths in the file are relative to the file, so the folder can move as a whole.
        resolved, source = path.parent / pathlib.Path(section[key]).expanduser(), f"{key} in {str(path)!r}"
    else:
        return None
    if not resolved.is_file():
        raise ValueError(f"{source} names {str(resolved)!r}, which is not a file; give the path of a PEM file.")
    return resolved


def _tokens_setting(variable: str, section: dict, key: str, path: pathlib.Path) -> tuple[str, ...]:
    from_environment = os.environ.get(variable)
    if from_environment:
        return tuple(token.strip() for token in from_environment.split(",") if token.strip())
    tokens = section.get(key, [])
    if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
        raise ValueError(f"{key} in {str(path)!r} must be a list of strings, as in {key} = [\"...\"].")
    return tuple(tokens)


def _warn_if_readable_by_others(path: pathlib.Path, config: dict) -> None:
    client = config.get("client") if isinstance(config.get("client"), dict) else {}
    server = config.get("server") if isinstance(config.get("server"), dict) else {}
    holds_tokens = bool(client.get("token")) or any(server.get(key) for key in ("read_only_tokens", "read_write_tokens"))
    if holds_tokens and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "Config file %s contains tokens and other users may read it; restrict it with: chmod 600 %s", path, path
        )
