"""Settings shared by the services and the client, read from the environment.

Every setting has an embedded default, so ``lasagne-engine up`` needs no configuration.
"""

import os
import pathlib
from dataclasses import dataclass, field

DEFAULT_HOST = "127.0.0.1"
DEFAULT_REGISTRY_PORT = 50151
DEFAULT_DATA_PORT = 50152
DEFAULT_TRAINER_PORT = 50153

# Bulk streams move arrays in chunks of this size. 1 MiB keeps each protobuf message far below
# the message limit while amortizing the per-message cost of gRPC's Python layer.
DEFAULT_CHUNK_BYTES = 1 << 20
# Explicit on both ends: gRPC's own default receive limit is 4 MiB.
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
# Bytes a message needs next to a chunk for the frame's own fields.
FRAME_OVERHEAD_BYTES = 1024
# Upper bounds that stop a runaway or hostile upload before it fills the disk. They are not sized
# for any machine; raise them through the environment for larger datasets or models.
DEFAULT_MAX_DATASET_BYTES = 64 << 30
DEFAULT_MAX_PARAMETER_SET_BYTES = 16 << 30
# Streaming calls one client connection may have open on one server at once. Each open stream
# holds one of the server's threads, 32 by default, so one client cannot queue more streams than
# the server has threads.
DEFAULT_MAX_STREAMS_PER_CLIENT = 32


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(f"Environment variable {name}={value!r} is not an integer.") from error


def default_home() -> pathlib.Path:
    """Return the data folder: ``$LASAGNE_ENGINE_HOME``, or ``~/.lasagne-engine``."""
    configured = os.environ.get("LASAGNE_ENGINE_HOME")
    if configured:
        return pathlib.Path(configured).expanduser().resolve()
    return pathlib.Path.home() / ".lasagne-engine"


@dataclass(frozen=True)
class Addresses:
    """Addresses of the three services, as ``host:port`` strings."""

    registry: str
    data: str
    trainer: str

    @classmethod
    def from_env(cls) -> "Addresses":
        """Read ``LASAGNE_ENGINE_{REGISTRY,DATA,TRAINER}_ADDRESS``, defaulting to 127.0.0.1 and the default ports."""
        return cls(
            registry=os.environ.get("LASAGNE_ENGINE_REGISTRY_ADDRESS", f"{DEFAULT_HOST}:{DEFAULT_REGISTRY_PORT}"),
            data=os.environ.get("LASAGNE_ENGINE_DATA_ADDRESS", f"{DEFAULT_HOST}:{DEFAULT_DATA_PORT}"),
            trainer=os.environ.get("LASAGNE_ENGINE_TRAINER_ADDRESS", f"{DEFAULT_HOST}:{DEFAULT_TRAINER_PORT}"),
        )


@dataclass(frozen=True)
class StreamLimits:
    """Chunk and message sizes for the bulk streams, and the limits a server enforces on them.

    ``max_chunk_bytes`` defaults to the message limit less 1 KiB of frame overhead. A server
    rejects an upload chunk larger than it, a dataset or parameter set larger than its maximum,
    and a client's stream beyond ``max_streams_per_client`` with RESOURCE_EXHAUSTED.
    """

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_chunk_bytes: int | None = None
    max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES
    max_parameter_set_bytes: int = DEFAULT_MAX_PARAMETER_SET_BYTES
    max_streams_per_client: int = DEFAULT_MAX_STREAMS_PER_CLIENT

    def __post_init__(self) -> None:
        if self.max_chunk_bytes is None:
            object.__setattr__(self, "max_chunk_bytes", self.max_message_bytes - FRAME_OVERHEAD_BYTES)

    @classmethod
    def from_env(cls) -> "StreamLimits":
        """Read ``LASAGNE_ENGINE_CHUNK_BYTES``, ``LASAGNE_ENGINE_MAX_MESSAGE_BYTES``,
        ``LASAGNE_ENGINE_MAX_CHUNK_BYTES``, ``LASAGNE_ENGINE_MAX_DATASET_BYTES``,
        ``LASAGNE_ENGINE_MAX_PARAMETER_SET_BYTES`` and ``LASAGNE_ENGINE_MAX_STREAMS_PER_CLIENT``.

        Raises
        ------
        ValueError
            If a variable is not an integer, or the sizes contradict each other.
        """
        max_message_bytes = _env_int("LASAGNE_ENGINE_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES)
        limits = cls(
            chunk_bytes=_env_int("LASAGNE_ENGINE_CHUNK_BYTES", DEFAULT_CHUNK_BYTES),
            max_message_bytes=max_message_bytes,
            max_chunk_bytes=_env_int("LASAGNE_ENGINE_MAX_CHUNK_BYTES", max_message_bytes - FRAME_OVERHEAD_BYTES),
            max_dataset_bytes=_env_int("LASAGNE_ENGINE_MAX_DATASET_BYTES", DEFAULT_MAX_DATASET_BYTES),
            max_parameter_set_bytes=_env_int("LASAGNE_ENGINE_MAX_PARAMETER_SET_BYTES", DEFAULT_MAX_PARAMETER_SET_BYTES),
            max_streams_per_client=_env_int("LASAGNE_ENGINE_MAX_STREAMS_PER_CLIENT", DEFAULT_MAX_STREAMS_PER_CLIENT),
        )
        if limits.chunk_bytes <= 0 or limits.chunk_bytes > limits.max_message_bytes - FRAME_OVERHEAD_BYTES:
            raise ValueError(
                f"LASAGNE_ENGINE_CHUNK_BYTES={limits.chunk_bytes} must be positive and at least 1 KiB below "
                f"LASAGNE_ENGINE_MAX_MESSAGE_BYTES={limits.max_message_bytes}."
            )
        if not limits.chunk_bytes <= limits.max_chunk_bytes <= limits.max_message_bytes - FRAME_OVERHEAD_BYTES:
            raise ValueError(
                f"LASAGNE_ENGINE_MAX_CHUNK_BYTES={limits.max_chunk_bytes} must be at least "
                f"LASAGNE_ENGINE_CHUNK_BYTES={limits.chunk_bytes} and at least 1 KiB below "
                f"LASAGNE_ENGINE_MAX_MESSAGE_BYTES={limits.max_message_bytes}."
            )
        for name, value in (
            ("LASAGNE_ENGINE_MAX_DATASET_BYTES", limits.max_dataset_bytes),
            ("LASAGNE_ENGINE_MAX_PARAMETER_SET_BYTES", limits.max_parameter_set_bytes),
            ("LASAGNE_ENGINE_MAX_STREAMS_PER_CLIENT", limits.max_streams_per_client),
        ):
            if value <= 0:
                raise ValueError(f"{name}={value} must be a positive integer.")
        return limits


@dataclass(frozen=True)
class Paths:
    """The folders under the data folder, one per service, plus the shared compile cache."""

    home: pathlib.Path = field(default_factory=default_home)

    @property
    def registry(self) -> pathlib.Path:
        return self.home / "registry"

    @property
    def data(self) -> pathlib.Path:
        return self.home / "data"

    @property
    def trainer(self) -> pathlib.Path:
        return self.home / "trainer"

    @property
    def compile_cache(self) -> pathlib.Path:
        """PyTensor's and JAX's compile caches: ``$LASAGNE_ENGINE_COMPILE_CACHE`` or ``<home>/compile-cache``."""
        configured = os.environ.get("LASAGNE_ENGINE_COMPILE_CACHE")
        if configured:
            return pathlib.Path(configured).expanduser().resolve()
        return self.home / "compile-cache"

    @property
    def run(self) -> pathlib.Path:
        """Pid and log files of the processes started by ``lasagne-engine up``."""
        return self.home / "run"
