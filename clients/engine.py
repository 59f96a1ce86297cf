import contextlib
import dataclasses
import logging
import os
import pathlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from google.protobuf import struct_pb2

from lasagne_engine import framing, rpc
from lasagne_engine.arrays import ArrayBuffer, as_contiguous, canonical_dtype, header_for
from lasagne_engine.client import placement
from lasagne_engine.client.errors import (
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    IntegrityError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    from_rpc_error,
)
from lasagne_engine.client.retries import RetryingInterceptor, RetryPolicy
from lasagne_engine.config import Addresses, StreamLimits
from lasagne_engine.errors import InvalidArgument
from lasagne_engine.names import validate_name
from lasagne_engine.security import ClientSecurity
from lasagne_engine.v1 import (
    arrays_pb2,
    data_service_pb2,
    data_service_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
    storage_pb2,
    trainer_pb2,
    trainer_pb2_grpc,
)

__all__ = ["FINAL_STATES", "Engine", "state_name"]

logger = logging.getLogger(__name__)

FINAL_STATES: frozenset[int] = frozenset(
    {
        trainer_pb2.COMPLETED,
        trainer_pb2.STOPPED,
        trainer_pb2.EARLY_STOPPED,
        trainer_pb2.FAILED,
        trainer_pb2.INTERRUPTED,
    }
)

# The registry builds each new model in a subprocess before it responds, which takes far longer
# than an ordinary call.
_REGISTER_MODEL_MIN_TIMEOUT_S = 300.0
# A health check costs the server almost no work, so a short deadline keeps health() quick when
# a service accepts connections but hangs.
_HEALTH_TIMEOUT_S = 5.0
# Pause before watching a session again after its stream ended without a final state.
_REWATCH_PAUSE_S = 1.0

_SERVICE_NAMES = {
    "registry": model_registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"].full_name,
    "data": data_service_pb2.DESCRIPTOR.services_by_name["DataService"].full_name,
    "trainer": trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].full_name,
}
_STUB_CLASSES: dict[str, Callable[[grpc.Channel], Any]] = {
    "registry": model_registry_pb2_grpc.ModelRegistryStub,
    "data": data_service_pb2_grpc.DataServiceStub,
    "trainer": trainer_pb2_grpc.TrainerStub,
}

_ARRAY_FRAME_CHUNK_TAG = framing.chunk_tag(arrays_pb2.ArrayFrame.DESCRIPTOR.fields_by_name["chunk"].number)
# The bulk methods by name: channel method, path, request serializer, response deserializer.
# Chunk frames skip protobuf's copies on the way out and in; see lasagne_engine.framing.
_BULK_METHODS: dict[str, tuple[str, str, Callable[[Any], bytes], Callable[[bytes], Any]]] = {
    "UploadDataset": (
        "stream_unary",
        "/lasagne_engine.v1.DataService/UploadDataset",
        framing.frame_serializer,
        data_service_pb2.DatasetVersion.FromString,
    ),
    "DownloadArray": (
        "unary_stream",
        "/lasagne_engine.v1.DataService/DownloadArray",
        data_service_pb2.DownloadArrayRequest.SerializeToString,
        framing.frame_deserializer(arrays_pb2.ArrayFrame, _ARRAY_FRAME_CHUNK_TAG),
    ),
    "SaveParameterSet": (
        "stream_unary",
        "/lasagne_engine.v1.ModelRegistry/SaveParameterSet",
        framing.frame_serializer,
        model_registry_pb2.ParameterSet.FromString,
    ),
    "LoadParameterSet": (
        "unary_stream",
        "/lasagne_engine.v1.ModelRegistry/LoadParameterSet",
        model_registry_pb2.LoadParameterSetRequest.SerializeToString,
        framing.frame_deserializer(arrays_pb2.ArrayFrame, _ARRAY_FRAME_CHUNK_TAG),
    ),
}


def state_name(state: int) -> str:
    """Return the lowercase name of a session state, for example ``"running"``.

    A value this client does not know, sent by a newer trainer, becomes ``"unknown(<value>)"``.
    """
    try:
        return trainer_pb2.SessionState.Name(state).lower()
    except ValueError:
        return f"unknown({state})"


class Engine:
    """Client of the LasagneEngine model registry, data service and trainer.

    Each service gets its own channel, opened on its first call. Every method raises a subclass
    of :class:`~lasagne_engine.client.errors.EngineError` for a failed call, so callers can
    branch on the gRPC status, and returns the protobuf messages of the
    ``lasagne_engine.v1`` contract. Use the engine as a context manager, or call :meth:`close`,
    to close the channels::

        with Engine() as engine:
            version = engine.upload_dataset("digits", {"X_train": X, "y_train": y})
            arrays = engine.load_dataset(f"digits@{version.version}")

    Parameters
    ----------
    registry_address, data_address, trainer_address : str, optional
        ``host:port`` of each service. Default: ``LASAGNE_ENGINE_{REGISTRY,DATA,TRAINER}_ADDRESS``,
        or 127.0.0.1 with the default ports when a variable is not set.
    timeout_s : float
        Deadline of each call in seconds, including each attempt of a bulk upload or download,
        so raise it for transfers that take longer. :meth:`register_model` waits at least 300 s,
        and :meth:`watch_session` has no deadline. Default 60.
    limits : StreamLimits, optional
        Chunk size of bulk streams and message size limit of the channels. Default:
        ``StreamLimits.from_env()``.
    token : str, optional
        Bearer token sent with every call; ``""`` sends none. Default: ``$LASAGNE_ENGINE_TOKEN``,
        else ``token`` in the ``[client]`` section of the config file, else none.
    tls_ca : str or os.PathLike, optional
        PEM file of the CA that signed the services' certificates; giving one turns TLS on.
        Default: ``$LASAGNE_ENGINE_TLS_CA``, else ``tls_ca`` in the config file, else plaintext.
    tls_cert, tls_key : str or os.PathLike, optional
        PEM files of a client certificate and its key, for services that require one. Default:
        ``$LASAGNE_ENGINE_TLS_CERT`` and ``$LASAGNE_ENGINE_TLS_KEY``, else the config file, else none.
    config_path : str or os.PathLike, optional
        TOML config file of the defaults above. Default: ``$LASAGNE_ENGINE_CONFIG``, else
        ``config.toml`` in ``$LASAGNE_ENGINE_HOME`` or ``~/.lasagne-engine``; a missing file is empty.
    max_retries : int
        Retries of a call that fails with UNAVAILABLE, for calls that are safe to repeat: the
        list, get and describe calls, tag_parameter_set, and downloads and loads, which resume
        where they stopped. The waits double from about 0.25 s to at most 4 s, within the call's
        ``timeout_s``. Uploads, saves, registrations, deletions and watches are not retried;
        wait_session watches again by itself. Default 5.
    trainer_addresses : sequence of str, optional
        Several trainers to place sessions on, as ``host:port``. :meth:`start_session` tries them
        in the order of :func:`~lasagne_engine.client.placement.placement_order`,
        :meth:`list_sessions` lists the sessions of all, and the calls about one session go to
        the trainer that has it. Default: ``$LASAGNE_ENGINE_TRAINER_ADDRESSES`` (comma-separated)
        when ``trainer_address`` is not given, else the one trainer of ``trainer_address``.

    Attributes
    ----------
    addresses : Addresses
        ``host:port`` of each service.
    timeout_s : float
        Deadline of each call in seconds.
    limits : StreamLimits
        Chunk and message sizes in use.
    security : ClientSecurity
        The token and TLS files in use.
    retry_policy : RetryPolicy
        Retries of idempotent calls.
    trainer_addresses : tuple of str
        Every trainer, the first being ``addresses.trainer``.

    Raises
    ------
    ValueError
        If ``timeout_s`` is not positive, ``limits.chunk_bytes`` is not positive and at least
        1 KiB below ``limits.max_message_bytes``, ``max_retries`` is negative, or the token or
        TLS settings are invalid (a token under 16 characters, a missing file, a certificate
        without its key), or ``trainer_addresses`` is empty, repeats an address or leaves out
        ``trainer_address``.
    """

    def __init__(
        self,
        *,
        registry_address: str | None = None,
        data_address: str | None = None,
        trainer_address: str | None = None,
        timeout_s: float = 60.0,
        limits: StreamLimits | None = None,
        token: str | None = None,
        tls_ca: str | os.PathLike | None = None,
        tls_cert: str | os.PathLike | None = None,
        tls_key: str | os.PathLike | None = None,
        config_path: str | os.PathLike | None = None,
        max_retries: int = 5,
        trainer_addresses: Sequence[str] | None = None,
    ):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s!r} must be a positive number of seconds.")
        limits = limits if limits is not None else StreamLimits.from_env()
        if limits.chunk_bytes <= 0 or limits.chunk_bytes > limits.max_message_bytes - 1024:
            raise ValueError(
                f"limits.chunk_bytes={limits.chunk_bytes} must be positive and at least 1 KiB below "
                f"limits.max_message_bytes={limits.max_message_bytes}."
            )

        trainers = placement.trainer_addresses(trainer_address, trainer_addresses)
        if trainers is not None:
            trainer_address = trainers[0]
        if registry_address is None or data_address is None or trainer_address is None:
            defaults = Addresses.from_env()
            registry_address = registry_address or defaults.registry
            data_address = data_address or defaults.data
            trainer_address = trainer_address or defaults.trainer
        self.addresses = Addresses(registry=registry_address, data=data_address, trainer=trainer_address)
        self.trainer_addresses = trainers or (self.addresses.trainer,)
        self.timeout_s = timeout_s
        self.limits = limits
        self.security = _client_security(
            token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, config_path=config_path
        )
        self.retry_policy = RetryPolicy(max_retries)

        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, Any] = {}
        # The channels the stubs call through, for the bulk methods' own (de)serializers.
        self._call_channels: dict[str, grpc.Channel] = {}
        self._bulk_methods: dict[str, Callable[..., Any]] = {}
        # The trainer of each session seen so far, when there are several trainers.
        self._session_trainers: dict[str, str] = {}
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"Engine(registry_address={self.addresses.registry!r}, data_address={self.addresses.data!r}, "
            f"trainer_address={self.addresses.trainer!r})"
        )

    # Lifecycle

    def close(self) -> None:
        """Close the channels opened so far. Later calls raise ``RuntimeError``, and a second close does nothing."""
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
            self._stubs.clear()
            self._call_channels.clear()
            self._bulk_methods.clear()
            self._closed = True

        for channel in channels:
            channel.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def health(self) -> dict[str, bool]:
        """Check whether each service reports SERVING.

        Returns
        -------
        dict of str to bool
            Keys ``"registry"``, ``"data"`` and ``"trainer"``. A service that cannot be reached,
            or does not respond within 5 s, counts as not serving.

        Raises
        ------
        RuntimeError
            If the engine is closed.
        """
        self._check_open()
        addresses = dataclasses.asdict(self.addresses)
        timeout_s = min(self.timeout_s, _HEALTH_TIMEOUT_S)
        return {
            key: rpc.is_serving(address, timeout_s=timeout_s, service=_SERVICE_NAMES[key], security=self.security)
            for key, address in addresses.items()
        }

    # Datasets

    def upload_dataset(
        self, name: str, arrays: Mapping[str, np.ndarray], *, description: str = ""
    ) -> data_service_pb2.DatasetVersion:
        """Upload a new version of a dataset.

        The arrays are streamed one after another in chunks of ``limits.chunk_bytes``. An array
        that is not C-contiguous with a little-endian dtype is copied while it is being sent,
        one array at a time.

        Parameters
        ----------
        name : str
            Dataset name: 1 to 128 characters from ``[A-Za-z0-9._-]``.
        arrays : mapping of str to numpy.ndarray
            The arrays by name. Dtypes must be boolean, integer, float or complex.
        description : str
            Free-form text stored with the version. Default: empty.

        Returns
        -------
        lasagne_engine.v1.data_service_pb2.DatasetVersion
            The stored version, with its number and array headers.

        Raises
        ------
        InvalidArgumentError
            If a name or dtype is invalid, checked here before sending, or if the server rejects
            the upload.
        ResourceExhaustedError
            If the dataset exceeds a size limit of the server.
        UnavailableError
            If the data service cannot be reached.
        EngineError
            For any other failure of the call.
        """
        prepared = _prepare_arrays(arrays, roles=None)
        try:
            validate_name(name, kind="dataset")
        except InvalidArgument as error:
            raise InvalidArgumentError(str(error)) from error

        info = data_service_pb2.DatasetInfo(name=name, description=description)
        frames = _RequestStream(
            _upload_frames(data_service_pb2.UploadDatasetRequest, info, prepared, chunk_bytes=self.limits.chunk_bytes)
        )
        return self._call_with_stream(self._bulk("data", "UploadDataset"), frames)

    def list_datasets(self, name: str = "") -> list[data_service_pb2.DatasetVersion]:
        """List every version of dataset ``name``, or the latest version of every dataset.

        Parameters
        ----------
        name : str
            Dataset name. Default: empty, which lists the latest version of every dataset.

        Returns
        -------
        list of lasagne_engine.v1.data_service_pb2.DatasetVersion

        Raises
        ------
        InvalidArgumentError
            If the name is invalid.
        UnavailableError
            If the data service cannot be reached.
        EngineError
            For any other failure of the call.
        """
        response = self._call(self._stub("data").ListDatasets, data_service_pb2.ListDatasetsRequest(name=name))
        return list(response.datasets)

    def describe_dataset(self, ref: str) -> data_service_pb2.DatasetVersion:
        """Return one dataset version with its array headers.

        Parameters
        ----------
        ref : str
            ``"name"`` for the latest version or ``"name@3"`` for version 3.

        Returns
        -------
        lasagne_engine.v1.data_service_pb2.DatasetVersion

        Raises
        ------
        InvalidArgumentError
            If the reference is invalid.
        NotFoundError
            If the dataset or version does not exist.
        UnavailableError
            If the data service cannot be reached.
        EngineError
            For any other failure of the call.
        """
        return self._call(self._stub("data").DescribeDataset, data_service_pb2.DescribeDatasetRequest(ref=ref))

    def download_array(self, ref: str, array: str, *, out: np.ndarray | None = None) -> np.ndarray:
        """Download one array of a dataset version into a single preallocated numpy array.

        If the stream fails with UNAVAILABLE, the download resumes from the bytes already received,
        as often as ``max_retries`` allows, after the same growing pauses as other retried calls.
        Each resumption is logged as a warning. Once every byte has arrived, the client checks the array's sha256 against the
        header's.

        Parameters
        ----------
        ref : str
            ``"name"`` or ``"name@3"``. Pass a versioned reference when downloading several
            arrays, so that a version uploaded meanwhile cannot mix into the result.
        array : str
            Name of the array in that version.
        out : numpy.ndarray, optional
            C-contiguous array with the shape and little-endian dtype of the stored one, to write
            into instead of allocating. Default: a new array.

        Returns
        -------
        numpy.ndarray
            The array, which is ``out`` when given.

        Raises
        ------
        NotFoundError
            If the dataset, version or array does not exist.
        UnavailableError
            If the data service stays unreachable through every resumption.
        IntegrityError
            If the assembled bytes have another sha256 than the header records.
        DataLossError
            If the stream breaks the array protocol, or the header changes between resumptions.
        DeadlineExceededError
            If one attempt takes longer than ``timeout_s``.
        ValueError
            If ``out`` does not match the array's shape and dtype, or is not C-contiguous.
        EngineError
            For any other failure of the call.
        """
        download_method = self._bulk("data", "DownloadArray")
        download = _ArrayDownload(source=f"dataset {ref!r}", out=out)

        backoffs_s = self.retry_policy.backoffs_s()
        retries = 0
        while True:
            request = data_service_pb2.DownloadArrayRequest(
                ref=ref, array=array, start_offset=download.received, chunk_bytes=self.limits.chunk_bytes
            )
            call = download_method(request, timeout=self.timeout_s)
            try:
                download.consume(call)
                break
            except grpc.RpcError as error:
                delay_s = next(backoffs_s, None)
                if error.code() != grpc.StatusCode.UNAVAILABLE or delay_s is None:
                    raise from_rpc_error(error) from error
                retries += 1
                logger.warning(
                    "Download of array %r of dataset %r failed after %d bytes (%s); resuming in %.1f s, "
                    "retry %d of %d",
                    array,
                    ref,
                    download.received,
                    error.details(),
                    delay_s,
                    retries,
                    self.retry_policy.max_retries,
                )
            finally:
                call.cancel()
            time.sleep(delay_s)

        return download.finish()

    def load_dataset(self, ref: str, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Download the arrays of one dataset version.

        The reference is resolved to a concrete version once, so every array comes from the same
        version even if another one is uploaded meanwhile.

        Parameters
        ----------
        ref : str
            ``"name"`` for the latest version or ``"name@3"`` for version 3.
        names : sequence of str, optional
            Arrays to download. Default: every array of the version.

        Returns
        -------
        dict of str to numpy.ndarray
            The arrays by name, in the order of ``names`` or of the version.

        Raises
        ------
        NotFoundError
            If the dataset or version does not exist, or the version has no array of a given name.
        UnavailableError
            If the data service cannot be reached.
        IntegrityError
            If an array's bytes have another sha256 than its header records.
        EngineError
            For any other failure of a call, as listed in :meth:`download_array`.
        """
        version = self.describe_dataset(ref)
        concrete_ref = f"{version.name}@{version.version}"
        stored = [header.name for header in version.arrays]

        if names is None:
            names = stored
        missing = [name for name in names if name not in stored]
        if missing:
            raise NotFoundError(
                f"Dataset {concrete_ref!r} has no array named {', '.join(map(repr, missing))}; "
                f"its arrays are {', '.join(map(repr, stored)) or 'none'}."
            )

        return {name: self.download_array(concrete_ref, name) for name in names}

    def delete_dataset(self, ref: str, *, allow_missing: bool = False) -> list[int]:
        """Delete one version (``"name@3"``) or every version (``"name"``) of a dataset, with its blobs.

        The data service removes the metadata first and then the blobs. A blob that fails to
        delete is retried by the service later, so the call succeeds once the metadata is gone.

        Parameters
        ----------
        ref : str
            ``"name@3"`` or ``"name"``.
        allow_missing : bool
            Return an empty list instead of raising NotFoundError when nothing matches, so that a
            retried delete succeeds. Default False.

        Returns
        -------
        list of int
            The deleted version numbers.

        Raises
        ------
        NotFoundError
            If the dataset or version does not exist and ``allow_missing`` is not set.
        FailedPreconditionError
            If the server rejects the deletion because a version is in use.
        UnavailableError
            If the data service cannot be reached.
        EngineError
            For any other failure of the call.
        """
        request = data_service_pb2.DeleteDatasetRequest(ref=ref, allow_missing=allow_missing)
        response = self._call(self._stub("data").DeleteDataset, request)
        return list(response.deleted_versions)

    # Models

    def register_model(
        self,
        name: str,
        source: str,
        *,
        description: str = "",
        default_hyperparameters: Mapping[str, Any] | None = None,
    ) -> model_registry_pb2.ModelVersion:
        """Register a model definition, creating a new version unless the source is unchanged.

        The registry builds the model in a subprocess before it responds, so this call waits at
        least 300 s, or ``timeout_s`` when that is longer.

        Parameters
        ----------
        name : str
            Model name: 1 to 128 characters from ``[A-Za-z0-9._-]``.
        source : str
            Python source defining ``build(hyperparameters) -> (input variable, output variable)``.
        description : str
            Free-form text stored with the version. Default: empty.
        default_hyperparameters : mapping, optional
            JSON-like values passed to ``build()`` at registration and merged under the
            hyperparameters of each session. Default: none.

        Returns
        -------
        lasagne_engine.v1.model_registry_pb2.ModelVersion
            The version; its ``created`` field is false when the source matched the latest version.

        Raises
        ------
        InvalidArgumentError
            If a hyperparameter is not JSON-like, or the server rejects the name or source, for
            example because building the model failed.
        UnavailableError
            If the registry cannot be reached.
        DeadlineExceededError
            If the registry does not respond in time.
        EngineError
            For any other failure of the call.
        """
        request = model_registry_pb2.RegisterModelRequest(name=name, source=source, description=description)
        if default_hyperparameters is not None:
            request.default_hyperparameters.CopyFrom(_to_struct(default_hyperparameters, "default_hyperparameters"))
        timeout_s = max(self.timeout_s, _REGISTER_MODEL_MIN_TIMEOUT_S)
        return self._call(self._stub("registry").RegisterModel, request, timeout_s=timeout_s)

    def list_models(self, name: str = "") -> list[model_registry_pb2.ModelVersion]:
        """List every version of model ``name``, or the latest version of every model.

        The ``source`` field of listed versions is empty. :meth:`get_model` returns it.

        Returns
        -------
        list of lasagne_engine.v1.model_registry_pb2.ModelVersion

        Raises
        ------
        InvalidArgumentError
            If the name is invalid.
        UnavailableError
            If the registry cannot be reached.
        EngineError
            For any other failure of the call.
        """
        response = self._call(self._stub("registry").ListModels, model_registry_pb2.ListModelsRequest(name=name))
        return list(response.models)

    def get_model(self, ref: str) -> model_registry_pb2.ModelVersion:
        """Return one model version with its source (``"name"`` for the latest, ``"name@3"`` for version 3).

        Returns
        -------
        lasagne_engine.v1.model_registry_pb2.ModelVersion

        Raises
        ------
        InvalidArgumentError
            If the reference is invalid.
        NotFoundError
            If the model or version does not exist.
        UnavailableError
            If the registry cannot be reached.
        EngineError
            For any other failure of the call.
        """
        return self._call(self._stub("registry").GetModel, model_registry_pb2.GetModelRequest(ref=ref))

    def delete_model(
        self, ref: str, *, force: bool = False, allow_missing: bool = False
    ) -> model_registry_pb2.DeleteModelResponse:
        """Delete one model version (``"name@3"``) or every version (``"name"``), with its source.

        Version numbers are never reused: the next registration gets the number after the
        highest one ever handed out.

        Parameters
        ----------
        ref : str
            ``"name@3"`` or ``"name"``.
        force : bool
            Also delete the parameter sets of those versions. Without it, a version that has
            parameter sets is kept and the call raises FailedPreconditionError. Default False.
        allow_missing : bool
            Return an empty response instead of raising NotFoundError when nothing matches.
            Default False.

        Returns
        -------
        lasagne_engine.v1.model_registry_pb2.DeleteModelResponse
            ``deleted_versions``, and the ids in ``deleted_parameter_sets`` when ``force`` is set.

        Raises
        ------
        InvalidArgumentError
            If the reference is invalid.
        NotFoundError
            If the model or version does not exist and ``allow_missing`` is not set.
        FailedPreconditionError
            If a version has parameter sets and ``force`` is not set, or a session holds one of
            them; the message names the sets or the sessions.
        UnavailableError
            If the registry or its blob store cannot be reached.
        EngineError
            For any other failure of the call.
        """
        request = model_registry_pb2.DeleteModelRequest(ref=ref, force=force, allow_missing=allow_missing)
        return self._call(self._stub("registry").DeleteModel, request)

    # Parameter sets

    def save_parameter_set(
        self,
        model: str,
        arrays: Mapping[str, np.ndarray],
        *,
        roles: Mapping[str, str] | None = None,
        session_id: str = "",
        epoch: int = 0,
        step: int = 0,
        metrics: Mapping[str, float] | None = None,
        tags: Sequence[str] = (),
        parent_id: str = "",
    ) -> model_registry_pb2.ParameterSet:
        """Store a parameter set of a model version.

        Parameters
        ----------
        model : str
            ``"name"`` or ``"name@version"`` of the model the parameters belong to.
        arrays : mapping of str to numpy.ndarray
            The parameter arrays by name.
        roles : mapping of str to str, optional
            Role of each array by name: ``"trainable"``, ``"state"`` or ``"optimizer"``. Default:
            no role, which leaves the choice to the registry.
        session_id : str
            Training session that produced the set. Default: empty.
        epoch, step : int
            Training progress when the set was saved. Default 0.
        metrics : mapping of str to float, optional
            Metrics of the set, for example ``{"val_loss": 0.12}``. Default: none.
        tags : sequence of str
            Tags to attach. Default: none.
        parent_id : str
            Parameter set this one was trained from. Default: empty.

        Returns
        -------
        lasagne_engine.v1.model_registry_pb2.ParameterSet
            The stored set, with its id and array headers.

        Raises
        ------
        InvalidArgumentError
            If an array name or dtype is invalid, or ``roles`` names an array not in ``arrays``.
            The client checks these before sending. The server raises it too, for example when
            the arrays do not match the model's parameters.
        NotFoundError
            If the model or the parent set does not exist.
        UnavailableError
            If the registry cannot be reached.
        EngineError
            For any other failure of the call.
        """
        prepared = _prepare_arrays(arrays, roles=roles)

        info = model_registry_pb2.ParameterSetInfo(
            model=model,
            session_id=session_id,
            epoch=epoch,
            step=step,
            metrics={key: float(value) for key, value in (metrics or {}).items()},
            tags=list(tags),
            parent_id=parent_id,
        )
        frames = _RequestStream(
            _upload_frames(
                model_registry_pb2.SaveParameterSetRequest,
                info,
                prepared,
                chunk_bytes=self.limits.chunk_bytes,
                roles=roles or {},
            )
        )
        return self._call_with_stream(self._bulk("registry", "SaveParameterSet"), frames)

    def list_parameter_sets(
        self, model: str = "", *, session_id: str = "", tag: str = ""
    ) -> list[model_registry_pb2.ParameterSet]:
        """List parameter sets, optionally only those of a model, a session or with a tag.

        The registry returns at most 1000 sets per call, so this requests page after page until
        the last one.

        Parameters
        ----------
        model : str
            ``"name"`` or ``"name@version"``. Default: empty, which lists every model's sets.
        session_id : str
            Only sets saved by this session. Default: empty, any session.
        tag : str
            Only sets carrying this tag. Default: empty, any tags.

        Returns
        -------
        list of lasagne_engine.v1.model_registry_pb2.ParameterSet

        Raises
        ------
        InvalidArgumentError
            If the model reference or tag is invalid.
        UnavailableError
            If the registry cannot be reached.
        EngineError
            For any other failure of the call.
        """
        parameter_sets: list[model_registry_pb2.ParameterSet] = []
        page_token = ""
        while True:
            request = model_registry_pb2.ListParameterSetsRequest(
                model=model, session_id=session_id, tag=tag, page_token=page_token
            )
            response = self._call(self._stub("registry").ListParameterSets, request)
            parameter_sets.extend(response.parameter_sets)
            page_token = response.next_page_token
            if not page_token:
                return parameter_sets

    def get_parameter_set(self, parameter_set_id: str) -> model_registry_pb2.ParameterSet:
        """Return a parameter set's metadata and array headers.

        Returns
        -------
        lasagne_engine.v1.model_registry_pb2.ParameterSet

        Raises
        ------
        NotFoundError
            If no parameter set has this id.
        UnavailableError
            If the registry cannot be reached.
        EngineError
            For any other failure of the call.
        """
        request = model_registry_pb2.GetParameterSetRequest(id=parameter_set_id)
        return self._call(self._stub("registry").GetParameterSet, request)

    def load_parameter_set(self, parameter_set_id: str, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Download the arrays of a parameter set, each into one preallocated numpy array.

        If the stream fails with UNAVAILABLE, the load resumes at the array and byte it had
        reached, writing into the arrays already allocated, as often as ``max_retries`` allows and
        after the same growing pauses as other retried calls. Each resumption is logged as a
        warning with the set's id and the position. Each array's sha256 is checked against its
        header once all its bytes have arrived, across resumptions.

        Parameters
        ----------
        parameter_set_id : str
            Id of the parameter set.
        names : sequence of str, optional
            Arrays to load. Default: every array of the set.

        Returns
        -------
        dict of str to numpy.ndarray
            The arrays by name, in the order the registry sent them.

        Raises
        ------
        NotFoundError
            If the parameter set, or one of ``names``, does not exist.
        IntegrityError
            If an array's bytes have another sha256 than its header records.
        DataLossError
            If the stream breaks the array protocol, lacks one of ``names``, or a resumed stream
            does not continue the array it stopped in.
        UnavailableError
            If the registry stays unreachable through every resumption.
        EngineError
            For any other failure of the call.
        """
        load_method = self._bulk("registry", "LoadParameterSet")
        load = _ParameterSetLoad(source=f"parameter set {parameter_set_id!r}")
        backoffs_s = self.retry_policy.backoffs_s()
        retries = 0
        while True:
            start_array, start_offset = load.resume_point
            request = model_registry_pb2.LoadParameterSetRequest(
                id=parameter_set_id,
                names=list(names or ()),
                chunk_bytes=self.limits.chunk_bytes,
                start_array=start_array,
                start_offset=start_offset,
            )
            call = load_method(request, timeout=self.timeout_s)
            try:
                load.consume(call)
                break
            except grpc.RpcError as error:
                delay_s = next(backoffs_s, None)
                if error.code() != grpc.StatusCode.UNAVAILABLE or delay_s is None:
                    raise from_rpc_error(error) from error
                retries += 1
                start_array, start_offset = load.resume_point
                logger.warning(
                    "Load of parameter set %r failed at byte %d of array %r (%s); resuming in %.1f s, "
                    "retry %d of %d",
                    parameter_set_id,
                    start_offset,
                    start_array or "(none received yet)",
                    error.details(),
                    delay_s,
                    retries,
                    self.retry_policy.max_retries,
                )
            finally:
                call.cancel()
            time.sleep(delay_s)

        arrays = load.finish()
        missing = [name for name in names or () if name not in arrays]
        if missing:
            raise DataLossError(
                f"The registry's stream of {load.source} ended without the requested arrays "
                f"{', '.join(map(repr, missing))}."
            )
        return arrays

    def delete_parameter_set(self, parameter_set_id: str, *, allow_missing: bool = False) -> bool:
        """Delete a parameter set and its arrays.

        Parameters
        ----------
        parameter_set_id : str
            Id of the parameter set.
        allow_missing : bool
            Return False instead of raising NotFoundError when no set has this id, so that a
            retried delete succeeds. Default False.

        Returns
        -------
        bool
            True if the set was deleted, False if it did not exist and ``allow_missing`` is set.

        Raises
        ------
        NotFoundError
            If no parameter set has this id and ``allow_missing`` is not set.
        FailedPreconditionError
            If a session holds the set (see :meth:`hold_parameter_set`); the message names the sessions.
        UnavailableError
            If the registry cannot be reached.
        EngineError
            For any other failure of the call.
        """
        request = model_registry_pb2.DeleteParameterSetRequest(id=parameter_set_id, allow_missing=allow_missing)
        response = self._call(self._stub("registry").DeleteParameterSet, request)
        if not response.deleted and not allow_missing:
            raise NotFoundError(
                f"The registry reported that it deleted nothing for parameter set {parameter_set_id!r}; "
                "list parameter sets to check the id."
            )
        return response.deleted

    def tag_parameter_set(
        self,
        parameter_set_id: str,
        *,
        add: Sequence[str] = (),
        remove: Sequence[str] = (),
        exclusive_in_session: bool = False,
    ) -> model_registry_pb2.ParameterSet:
        """Add and remove tags of a parameter set.

        Parameters
        ----------
        parameter_set_id : str
            Id of the parameter set.
        add, remove : sequence of str
            Tags to add and to remove. Default: none.
        exclusive_in_session : bool
            Move each added tag: remove it from the other sets of the same session in the same
            transaction, as for a "best" tag. Default False.

        Returns
        -------
        lasagne_engine.v1.model_registry_pb2.ParameterSet
            The set with its new tags.

        Raises
        ------
        InvalidArgumentError
            If a tag is invalid.
        NotFoundError
            If no parameter set has this id.
        UnavailableError
            If the registry cannot be reached.
        EngineError
            For any other failure of the call.
        """
        request = model_registry_pb2.TagParameterSetRequest(
            id=parameter_set_id,
            add_tags=list(add),
            remove_tags=list(remove),
            exclusive_in_session=exclusive_in_session,
        )
        return self._call(self._stub("registry").TagParameterSet, request)

    def hold_parameter_set(self, parameter_set_id: str, session_id: str) -> model_registry_pb2.ParameterSetHold:
        """Record that a session uses a parameter set, so that the set cannot be deleted meanwhile.

        Holding a set the session already holds returns the existing hold. The hold lasts until
        :meth:`release_parameter_set`; the registry does not end it when the session ends.

        Parameters
        ----------
        parameter_set_id : str
            Id of the parameter set.
        session_id : str
            Id of the session that uses it: 1 to 128 printable characters.

        Returns
        -------
        lasagne_engine.v1.model_registry_pb2.ParameterSetHold

        Raises
        ------
        InvalidArgumentError
            If the id or the session id is malformed.
        NotFoundError
            If no parameter set has this id.
        UnavailableError
            If the registry cannot be reached.
        EngineError
            For any other failure of the call.
        """
        request = model_registry_pb2.HoldParameterSetRequest(id=parameter_set_id, session_id=session_id)
        return self._call(self._stub("registry").HoldParameterSet, request)

    def release_parameter_set(self, parameter_set_id: str, session_id: str) -> int:
        """End a session's hold on a parameter set, or with ``parameter_set_id=""`` on every set it holds.

        Releasing a hold that does not exist, or that of a deleted set, is not an error.

        Parameters
        ----------
        parameter_set_id : str
            Id of the parameter set, or empty for every set the session holds.
        session_id : str
            Id of the session.

        Returns
        -------
        int
            How many holds ended.

        Raises
        ------
        InvalidArgumentError
            If the id or the session id is malformed.
        UnavailableError
            If the registry cannot be reached.
        EngineError
            For any other failure of the call.
        """
        request = model_registry_pb2.ReleaseParameterSetRequest(id=parameter_set_id, session_id=session_id)
        return self._call(self._stub("registry").ReleaseParameterSet, request).released

    # Storage

    def collect_garbage(
        self, *, dry_run: bool = False, services: Sequence[str] = ("registry", "data")
    ) -> dict[str, storage_pb2.CollectGarbageResponse]:
        """Ask the registry and the data service to remove orphan blobs and retry failed blob deletions.

        Orphan blobs are those that no metadata refers to, which a service that stopped mid-upload
        leaves behind. The services also collect garbage at each start.

        Parameters
        ----------
        dry_run : bool
            Only count what would be removed. Default False.
        services : sequence of str
            The services to ask, among ``"registry"`` and ``"data"``. Default both.

        Returns
        -------
        dict of str to lasagne_engine.v1.storage_pb2.CollectGarbageResponse
            The report of each service, under its name.

        Raises
        ------
        ValueError
            If ``services`` names another service.
        UnavailableError
            If a service or its blob store cannot be reached.
        EngineError
            For any other failure of a call.
        """
        unknown = sorted(set(services) - {"registry", "data"})
        if unknown:
            raise ValueError(f"Unknown services {unknown} for collect_garbage; choose from 'registry' and 'data'.")
        request = storage_pb2.CollectGarbageRequest(dry_run=dry_run)
        return {service: self._call(self._stub(service).CollectGarbage, request) for service in services}

    # Training sessions

    def start_session(
        self,
        model: str,
        dataset: str,
        *,
        optimizer: str | None = None,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        epochs: int | None = None,
        seed: int | None = None,
        model_hyperparameters: Mapping[str, Any] | None = None,
        monitor: str = "",
        init_parameter_set: str = "",
        description: str = "",
        train_inputs: str = "",
        train_targets: str = "",
        val_inputs: str = "",
        val_targets: str = "",
        device: str = "",
        resume_from: str = "",
        early_stopping_patience: int = 0,
        keep_best: int = 0,
        keep_latest: int = 0,
        statistics_every_steps: int = 0,
    ) -> trainer_pb2.Session:
        """Start a training session of a model on a dataset.

        The session waits in state QUEUED until a device is free, then runs in a process of its own.
        A hyperparameter left as None takes the trainer's default, given below. With
        ``resume_from``, it takes instead the value the source session last had, if the same
        trainer ran that session: its learning rate after any live change, its batch size, epochs,
        seed and model hyperparameters.

        Parameters
        ----------
        model, dataset : str
            ``"name"`` or ``"name@version"``.
        optimizer : str, optional
            ``"sgd"``, ``"momentum"``, ``"nesterov"``, ``"adam"``, ``"adamw"``, ``"rmsprop"`` or
            ``"adagrad"``. Default ``"adam"``.
        learning_rate : float, optional
            Default 1e-3.
        batch_size : int, optional
            Examples per step. Default 32.
        epochs : int, optional
            Default 10.
        seed : int, optional
            Seed of parameter initialization and shuffling. Default 0.
        model_hyperparameters : mapping, optional
            JSON-like values passed to the model's ``build()``, merged over its registered
            defaults. Default: the registered defaults.
        monitor : str
            Validation metric that selects the "best" parameter set, for example
            ``"val_accuracy"``. Default: empty, which means ``"val_loss"``.
        init_parameter_set : str
            Id of a parameter set whose arrays replace the initial parameters. Default: empty.
        description : str
            Free-form label shown in listings. Default: empty.
        train_inputs, train_targets, val_inputs, val_targets : str
            Names of the dataset arrays to train and validate on. Default: empty, which means
            ``X_train``, ``y_train``, ``X_val`` and ``y_val``.
        device : str
            Device to run on, such as ``"gpu:1"``; empty takes the first free device. Default empty.
        resume_from : str
            Id of a parameter set to continue from: its arrays and optimizer state are loaded and
            the step and epoch numbering continues from it, up to ``epochs`` in total. Default empty.
        early_stopping_patience : int
            Stop after this many epochs without an improvement of ``monitor``; 0 (the default) never stops early.
        keep_best, keep_latest : int
            Keep the best ``keep_best`` and the latest ``keep_latest`` parameter sets of the session
            and delete the rest; 0 for both (the default) keeps every set.
        statistics_every_steps : int
            Per-parameter statistics every N steps; 0 (the default) takes the trainer's cadence and a
            negative value turns them off.

        Returns
        -------
        lasagne_engine.v1.trainer_pb2.Session
            The new session, usually in state QUEUED or PENDING.

        Raises
        ------
        InvalidArgumentError
            If a hyperparameter is invalid or not JSON-like.
        NotFoundError
            If the model, dataset, an array or the initial parameter set does not exist.
        ResourceExhaustedError
            If the session's estimated memory fits no device's budget; the message gives the
            bytes needed and the largest budget.
        UnavailableError
            If the trainer cannot be reached.
        EngineError
            For any other failure of the call.
        """
        explicit = {"optimizer": optimizer, "learning_rate": learning_rate, "batch_size": batch_size,
                    "epochs": epochs, "seed": seed}
        hyperparameters = trainer_pb2.Hyperparameters(
            **{name: value for name, value in explicit.items() if value is not None},
            monitor=monitor,
            early_stopping_patience=early_stopping_patience,
            keep_best=keep_best,
            keep_latest=keep_latest,
            statistics_every_steps=statistics_every_steps,
        )
        if model_hyperparameters is not None:
            hyperparameters.model.CopyFrom(_to_struct(model_hyperparameters, "model_hyperparameters"))
        request = trainer_pb2.StartSessionRequest(
            model=model,
            dataset=dataset,
            hyperparameters=hyperparameters,
            train_inputs=train_inputs,
            train_targets=train_targets,
            val_inputs=val_inputs,
            val_targets=val_targets,
            init_parameter_set=init_parameter_set,
            description=description,
            device=device,
            resume_from=resume_from,
        )
        if len(self.trainer_addresses) > 1:
            return self._start_on_best_trainer(request)
        return self._call(self._stub("trainer").StartSession, request)

    def pause_session(self, session_id: str, *, release: bool = False) -> trainer_pb2.Session:
        """Pause a running session before its next step.

        Parameters
        ----------
        session_id : str
            The session.
        release : bool
            Also checkpoint and free the device for the next queued session; the session becomes
            SUSPENDED instead of PAUSED. Default False.

        Raises
        ------
        NotFoundError
            If there is no such session.
        FailedPreconditionError
            If the session is not running.
        """
        request = trainer_pb2.PauseSessionRequest(id=session_id, release=release)
        return self._call(self._session_stub(session_id).PauseSession, request)

    def resume_session(self, session_id: str) -> trainer_pb2.Session:
        """Resume a paused session, or requeue a suspended or interrupted one from its last parameter set.

        Raises
        ------
        NotFoundError
            If there is no such session.
        FailedPreconditionError
            If the session is neither paused, suspended nor interrupted.
        """
        return self._call(self._session_stub(session_id).ResumeSession, trainer_pb2.ResumeSessionRequest(id=session_id))

    def checkpoint_session(self, session_id: str) -> str:
        """Have a running or paused session save a parameter set now; return the set's id.

        Raises
        ------
        NotFoundError
            If there is no such session.
        FailedPreconditionError
            If the session is not running or paused.
        """
        reply = self._call(
            self._session_stub(session_id).CheckpointSession, trainer_pb2.CheckpointSessionRequest(id=session_id),
            timeout_s=max(self.timeout_s, 150.0),
        )
        return reply.parameter_set_id

    def update_hyperparameters(self, session_id: str, *, learning_rate: float) -> trainer_pb2.Session:
        """Change a live session's learning rate, applied at its next step without recompiling.

        The change is recorded in the session's ``history``.

        Raises
        ------
        InvalidArgumentError
            If the learning rate is not a positive finite number.
        FailedPreconditionError
            If the session has finished.
        """
        request = trainer_pb2.UpdateHyperparametersRequest(id=session_id, learning_rate=learning_rate)
        return self._call(
            self._session_stub(session_id).UpdateHyperparameters, request, timeout_s=max(self.timeout_s, 150.0)
        )

    def get_devices(self) -> trainer_pb2.GetDevicesResponse:
        """List the trainer's devices with memory budgets, memory in use and sessions, and the queue."""
        return self._call(self._stub("trainer").GetDevices, trainer_pb2.GetDevicesRequest())

    def list_sessions(self, states: Sequence[int] = ()) -> list[trainer_pb2.Session]:
        """List training sessions, optionally only those in the given states.

        Parameters
        ----------
        states : sequence of SessionState values
            For example ``[trainer_pb2.RUNNING]``. Default: empty, which lists every session.

        Returns
        -------
        list of lasagne_engine.v1.trainer_pb2.Session

        Raises
        ------
        UnavailableError
            If the trainer cannot be reached.
        EngineError
            For any other failure of the call.
        """
        request = trainer_pb2.ListSessionsRequest(states=list(states))
        if len(self.trainer_addresses) > 1:
            return self._list_on_all_trainers(request)
        return list(self._call(self._stub("trainer").ListSessions, request).sessions)

    def get_session(self, session_id: str) -> trainer_pb2.Session:
        """Return a training session with its state and epoch metrics.

        Returns
        -------
        lasagne_engine.v1.trainer_pb2.Session

        Raises
        ------
        NotFoundError
            If no session has this id.
        UnavailableError
            If the trainer cannot be reached.
        EngineError
            For any other failure of the call.
        """
        return self._call(self._session_stub(session_id).GetSession, trainer_pb2.GetSessionRequest(id=session_id))

    def stop_session(self, session_id: str) -> trainer_pb2.Session:
        """Ask a live session to save a final parameter set and end in state STOPPED.

        The call returns once the request is delivered. Use :meth:`wait_session` to wait for the
        session to end.

        Returns
        -------
        lasagne_engine.v1.trainer_pb2.Session
            The session as the trainer saw it when the request arrived.

        Raises
        ------
        NotFoundError
            If no session has this id.
        FailedPreconditionError
            If the session has already ended.
        UnavailableError
            If the trainer cannot be reached.
        EngineError
            For any other failure of the call.
        """
        return self._call(self._session_stub(session_id).StopSession, trainer_pb2.StopSessionRequest(id=session_id))

    def watch_session(self, session_id: str) -> Iterator[trainer_pb2.SessionEvent]:
        """Stream a session's events: a snapshot, then progress, epoch ends and state changes.

        The stream has no deadline and ends when the session reaches a final state. Closing the
        iterator cancels the call, so wrap it in ``contextlib.closing`` when a loop may stop
        early. The call starts at the first ``next()``.

        Returns
        -------
        iterator of lasagne_engine.v1.trainer_pb2.SessionEvent

        Raises
        ------
        NotFoundError
            While iterating, if no session has this id.
        UnavailableError
            While iterating, if the trainer cannot be reached or shuts down.
        EngineError
            While iterating, for any other failure of the call.
        RuntimeError
            If the engine is closed.
        """
        return _watch(self._session_stub(session_id), session_id, timeout_s=None)

    def watch_metrics(self, session_ids: Sequence[str] = ()) -> Iterator[trainer_pb2.MetricPoint]:
        """Stream metric points of sessions as their processes report them.

        Each point is one value, such as ``train_loss``, ``val_loss``, ``val_accuracy``,
        ``examples_per_second`` or ``learning_rate``, with the session, epoch, step and time it
        belongs to. The stream has no deadline. Closing the iterator cancels the call, so wrap it
        in ``contextlib.closing`` when a loop may stop early. The call starts at the first
        ``next()``.

        Parameters
        ----------
        session_ids : sequence of str
            Sessions to follow. Default: empty, which follows every live session.

        Returns
        -------
        iterator of lasagne_engine.v1.trainer_pb2.MetricPoint

        Raises
        ------
        NotFoundError
            While iterating, if one of the sessions does not exist.
        UnavailableError
            While iterating, if the trainer cannot be reached or shuts down.
        EngineError
            While iterating, for any other failure of the call.
        RuntimeError
            If the engine is closed.
        """
        request = trainer_pb2.WatchMetricsRequest(session_ids=list(session_ids))
        return _stream(self._metrics_stub(session_ids).WatchMetrics, request)

    def wait_session(self, session_id: str, *, timeout_s: float | None = None) -> trainer_pb2.Session:
        """Wait until a session reaches a final state and return it.

        The final states are COMPLETED, STOPPED, EARLY_STOPPED, FAILED and INTERRUPTED (see
        :data:`FINAL_STATES`). A FAILED session is returned, not raised, and its ``error`` field
        contains the reason.

        Parameters
        ----------
        session_id : str
            Id of the session.
        timeout_s : float, optional
            Maximum time to wait in seconds. Default: no limit.

        Returns
        -------
        lasagne_engine.v1.trainer_pb2.Session
            The session in its final state, as :meth:`get_session` returns it.

        Raises
        ------
        DeadlineExceededError
            If the session is still live after ``timeout_s``.
        NotFoundError
            If no session has this id.
        UnavailableError
            If the trainer cannot be reached.
        EngineError
            For any other failure of a call.
        """
        stub = self._session_stub(session_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        while True:
            remaining_s = None if deadline is None else deadline - time.monotonic()
            if remaining_s is not None and remaining_s <= 0:
                raise _wait_timeout(session_id, timeout_s)
            try:
                with contextlib.closing(_watch(stub, session_id, timeout_s=remaining_s)) as events:
                    for event in events:
                        if _event_state(event) in FINAL_STATES:
                            return self.get_session(session_id)
            except DeadlineExceededError as error:
                raise _wait_timeout(session_id, timeout_s) from error

            # The stream ended without a final state, as when the trainer shuts down, so look
            # the session up and watch again if it is still live.
            session = self.get_session(session_id)
            if session.state in FINAL_STATES:
                return session
            logger.warning(
                "The watch stream of session %r ended in state %s; watching again in %.1f s",
                session_id,
                state_name(session.state),
                _REWATCH_PAUSE_S,
            )
            time.sleep(_REWATCH_PAUSE_S)

    # Several trainers

    def _start_on_best_trainer(self, request: trainer_pb2.StartSessionRequest) -> trainer_pb2.Session:
        """Start the session on the trainer that :mod:`~lasagne_engine.client.placement` ranks first,
        or on the next when a trainer rejects it for its memory or cannot take it now."""
        capacities, unreachable, without_device = [], [], []
        for address in self.trainer_addresses:
            try:
                devices = self._call(self._stub("trainer", address).GetDevices, trainer_pb2.GetDevicesRequest())
            except UnavailableError as error:
                logger.warning("Trainer %s cannot be reached (%s); placing the session elsewhere", address, error)
                unreachable.append(f"{address} could not be reached ({error})")
                continue
            summary = placement.capacity(address, devices, request.device)
            if summary is None:
                without_device.append(address)
                continue
            capacities.append(summary)

        rejections = []
        for address in placement.placement_order(capacities):
            try:
                session = self._call(self._stub("trainer", address).StartSession, request)
            except (ResourceExhaustedError, UnavailableError, FailedPreconditionError) as error:
                logger.info("Trainer %s did not take the session (%s); trying the next", address, error)
                rejections.append((address, error))
                continue
            self._remember_trainer(session.id, address)
            return session

        if rejections:
            reasons = "; ".join([*unreachable, *(f"{address}: {error}" for address, error in rejections)])
            # The error that every trainer gave, or UNAVAILABLE when they differed.
            kinds = {type(error) for _, error in rejections}
            error_type = kinds.pop() if len(kinds) == 1 else UnavailableError
            raise error_type(f"No trainer took the session. {reasons}") from rejections[-1][1]
        if without_device and not unreachable:
            raise NotFoundError(
                f"No trainer has a device {request.device!r} ({', '.join(without_device)}); list each trainer's "
                "devices with 'lasagne-engine devices'."
            )
        raise UnavailableError(f"No trainer can take the session: {'; '.join(unreachable)}.")

    def _list_on_all_trainers(self, request: trainer_pb2.ListSessionsRequest) -> list[trainer_pb2.Session]:
        sessions = []
        for address in self.trainer_addresses:
            listed = self._call(self._stub("trainer", address).ListSessions, request).sessions
            for session in listed:
                self._remember_trainer(session.id, address)
            sessions.extend(listed)
        return sorted(sessions, key=lambda session: (session.created_at.ToNanoseconds(), session.id))

    def _remember_trainer(self, session_id: str, address: str) -> None:
        with self._lock:
            self._session_trainers[session_id] = address

    def _session_stub(self, session_id: str) -> Any:
        """Return the stub of the trainer that has ``session_id``; with several, ask each until one has it."""
        if len(self.trainer_addresses) == 1:
            return self._stub("trainer")
        with self._lock:
            known = self._session_trainers.get(session_id)
        if known is not None:
            return self._stub("trainer", known)

        unreachable = []
        for address in self.trainer_addresses:
            stub = self._stub("trainer", address)
            try:
                self._call(stub.GetSession, trainer_pb2.GetSessionRequest(id=session_id))
            except NotFoundError:
                continue
            except UnavailableError as error:
                unreachable.append(f"{address} ({error})")
                continue
            self._remember_trainer(session_id, address)
            return stub
        if unreachable:
            raise UnavailableError(
                f"Session {session_id!r} is on none of the trainers that responded, and these could not be "
                f"reached: {', '.join(unreachable)}. Retry when they are back."
            )
        raise NotFoundError(
            f"No session {session_id!r} on any of the trainers {', '.join(self.trainer_addresses)}; "
            "list sessions with 'lasagne-engine sessions'."
        )

    def _metrics_stub(self, session_ids: Sequence[str]) -> Any:
        """Return the stub of the one trainer that has every session in ``session_ids``.

        Raises
        ------
        InvalidArgumentError
            With several trainers, if ``session_ids`` is empty or spans more than one trainer.
        """
        if len(self.trainer_addresses) == 1:
            return self._stub("trainer")
        if not session_ids:
            raise InvalidArgumentError(
                "With several trainers, name the sessions whose metrics to watch; each trainer streams "
                "only its own sessions."
            )
        stubs = {id(stub): stub for stub in (self._session_stub(session_id) for session_id in session_ids)}
        if len(stubs) > 1:
            raise InvalidArgumentError(
                f"Sessions {', '.join(session_ids)} run on different trainers; watch the metrics of each "
                "trainer's sessions in a separate call."
            )
        return next(iter(stubs.values()))

    # Plumbing

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("This Engine is closed; create a new Engine to make more calls.")

    def _stub(self, service: str, address: str | None = None) -> Any:
        """Return the stub of ``service`` at its address, or at ``address`` for another trainer."""
        key = service if address is None or address == getattr(self.addresses, service) else f"{service}@{address}"
        with self._lock:
            self._check_open()
            stub = self._stubs.get(key)
            if stub is None:
                channel = rpc.client_channel(address or getattr(self.addresses, service), self.limits,
                                             security=self.security)
                self._channels[key] = channel
                retrying = grpc.intercept_channel(channel, RetryingInterceptor(self.retry_policy))
                self._call_channels[key] = retrying
                stub = self._stubs[key] = _STUB_CLASSES[service](retrying)
        return stub

    def _bulk(self, service: str, method: str) -> Callable[..., Any]:
        """Return the multi-callable of a bulk method, which moves chunk frames without protobuf's copies."""
        self._stub(service)
        with self._lock:
            self._check_open()
            callable_ = self._bulk_methods.get(method)
            if callable_ is None:
                make, path, serializer, deserializer = _BULK_METHODS[method]
                callable_ = getattr(self._call_channels[service], make)(
                    path, request_serializer=serializer, response_deserializer=deserializer, _registered_method=True
                )
                self._bulk_methods[method] = callable_
        return callable_

    def _call(self, method: Callable[..., Any], request: Any, *, timeout_s: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout_s if timeout_s is not None else self.timeout_s)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def _call_with_stream(self, method: Callable[..., Any], frames: "_RequestStream") -> Any:
        try:
            return method(iter(frames), timeout=self.timeout_s)
        except grpc.RpcError as error:
            # gRPC catches an exception raised by the request iterator, logs it and ends the call
            # with UNKNOWN, so the original exception is raised here instead.
            if frames.error is not None:
                raise frames.error from None
            raise from_rpc_error(error) from error


def _client_security(
    *,
    token: str | None,
    tls_ca: str | os.PathLike | None,
    tls_cert: str | os.PathLike | None,
    tls_key: str | os.PathLike | None,
    config_path: str | os.PathLike | None,
) -> ClientSecurity:
    """Combine the arguments given to Engine with the defaults from the environment and config file."""
    defaults = ClientSecurity.from_env(pathlib.Path(config_path) if config_path is not None else None)
    if tls_cert is not None or tls_key is not None:
        client_pair = (tls_cert, tls_key)
    else:
        client_pair = (defaults.tls_cert, defaults.tls_key)
    return ClientSecurity(
        token=token if token is not None else defaults.token,
        tls_ca=pathlib.Path(tls_ca) if tls_ca is not None else defaults.tls_ca,
        tls_cert=pathlib.Path(client_pair[0]) if client_pair[0] is not None else None,
        tls_key=pathlib.Path(client_pair[1]) if client_pair[1] is not None else None,
    )


def _prepare_arrays(
    arrays: Mapping[str, np.ndarray], *, roles: Mapping[str, str] | None
) -> list[tuple[str, np.ndarray]]:
    """Check array names, dtypes and roles before a stream starts.

    An error raised inside the request stream would reach the caller only as the stored exception
    of :class:`_RequestStream`, after the server has seen a partial upload.
    """
    prepared = []
    try:
        for name, array in arrays.items():
            validate_name(name, kind="array")
            array = np.asarray(array)
            canonical_dtype(array.dtype.str, array_name=name)
            prepared.append((name, array))
    except InvalidArgument as error:
        raise InvalidArgumentError(str(error)) from error

    unknown = sorted(set(roles or {}) - set(arrays))
    if unknown:
        raise InvalidArgumentError(
            f"roles contains {', '.join(map(repr, unknown))}, which are not among the arrays being saved "
            f"({', '.join(map(repr, arrays)) or 'none'}); give roles only for those arrays."
        )
    return prepared


class _RequestStream:
    """Request iterator that keeps the exception it raised, which gRPC would otherwise hide."""

    def __init__(self, frames: Iterator[Any]):
        self._frames = frames
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self._frames
        except Exception as error:
            self.error = error
            raise


def _upload_frames(
    request_type: type,
    info: Any,
    arrays: Iterable[tuple[str, np.ndarray]],
    *,
    chunk_bytes: int,
    roles: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """Yield the info frame, then each array's header and chunks, converting one array at a time, then the end frame.

    Chunks come as encoded frames (:func:`lasagne_engine.framing.encode_chunk`), each one copy of a
    slice of the array, for :func:`lasagne_engine.framing.frame_serializer` to send as they are.
    """
    tag = framing.chunk_tag(request_type.DESCRIPTOR.fields_by_name["chunk"].number)
    yield request_type(info=info)
    array_count = 0
    for name, array in arrays:
        array_count += 1
        contiguous = as_contiguous(array)
        header = header_for(name, contiguous, role=(roles or {}).get(name, ""))
        # NOTE: as_contiguous (numpy.ascontiguousarray) turns a 0-d array into shape (1,), so the
        # header takes its shape from the array as given.
        del header.shape[:]
        header.shape.extend(array.shape)
        yield request_type(header=header)
        for view in _chunk_views(contiguous, chunk_bytes):
            yield framing.encode_chunk(tag, view)
    # The services store the upload only once this frame arrives.
    yield request_type(end=arrays_pb2.UploadEnd(array_count=array_count))


def _chunk_views(array: np.ndarray, chunk_bytes: int) -> Iterator[memoryview]:
    """Yield views of a C-contiguous array's bytes in pieces of at most ``chunk_bytes``, without copying."""
    flat = array.reshape(-1).view(np.uint8)
    for offset in range(0, flat.size, chunk_bytes):
        yield flat[offset : offset + chunk_bytes].data


def _to_struct(values: Mapping[str, Any], argument: str) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    try:
        struct.update(values)
    except (ValueError, TypeError, AttributeError) as error:
        raise InvalidArgumentError(
            f"{argument} must contain only JSON-like values (str, int, float, bool, None, and lists and "
            f"dicts of them): {error}. Convert numpy scalars with .item()."
        ) from error
    return struct


class _ArrayDownload:
    """One array being assembled from a download stream that may be resumed."""

    def __init__(self, *, source: str, out: np.ndarray | None):
        self.source = source
        self._out = out
        self._header: arrays_pb2.ArrayHeader | None = None
        self._buffer: ArrayBuffer | None = None

    @property
    def received(self) -> int:
        """Bytes received so far, which is the offset a resumed stream starts at."""
        return 0 if self._buffer is None else self._buffer.receiver.received

    def consume(self, frames: Iterable[arrays_pb2.ArrayFrame]) -> None:
        """Write the chunks of one stream, which starts with the header, into the array."""
        frames = iter(frames)
        first = next(frames, None)
        if first is None or _chunk_of(first) is not None or first.WhichOneof("frame") != "header":
            raise DataLossError(f"The download stream of {self.source} did not start with an array header.")

        header = first.header
        if self._header is None:
            self._header = header
            self._buffer = _new_buffer(header, source=self.source, out=self._out)
        elif header != self._header:
            raise DataLossError(
                f"Array {header.name!r} of {self.source} changed while its download resumed "
                f"(sha256 {self._header.sha256} before, {header.sha256} now); "
                "download a versioned reference such as 'name@3'."
            )

        for frame in frames:
            chunk = _chunk_of(frame)
            if chunk is None:
                raise DataLossError(
                    f"The download stream of array {header.name!r} of {self.source} sent a second header."
                )
            _add_chunk(self._buffer, chunk, source=self.source)

    def finish(self) -> np.ndarray:
        assert self._buffer is not None and self._header is not None
        return _finish_buffer(self._buffer, self._header, source=self.source)


class _ParameterSetLoad:
    """The arrays of a parameter set being assembled from a load stream that may be resumed.

    Each array goes into a buffer allocated at its header. A resumed stream starts with the header
    of the array that was in progress, which must equal the one received before, and continues
    its bytes into the same buffer, so the buffer's digest covers every byte of the array.
    """

    def __init__(self, *, source: str):
        self.source = source
        self._arrays: dict[str, np.ndarray] = {}
        self._header: arrays_pb2.ArrayHeader | None = None
        self._buffer: ArrayBuffer | None = None

    @property
    def resume_point(self) -> tuple[str, int]:
        """The ``start_array`` and ``start_offset`` a resumed stream starts at; ``("", 0)`` before any header."""
        if self._header is None:
            return "", 0
        return self._header.name, self._buffer.receiver.received

    def consume(self, frames: Iterable[arrays_pb2.ArrayFrame]) -> None:
        """Write the arrays of one stream, started at :attr:`resume_point`, into their buffers."""
        frames = iter(frames)
        if self._header is not None:
            self._check_resumed_header(next(frames, None))

        for frame in frames:
            chunk = _chunk_of(frame)
            kind = "chunk" if chunk is not None else frame.WhichOneof("frame")
            if kind == "header":
                self._finish_array()
                header = frame.header
                if header.name in self._arrays:
                    raise DataLossError(f"The stream of {self.source} sent array {header.name!r} twice.")
                self._header = header
                self._buffer = _new_buffer(header, source=self.source)
            elif kind == "chunk" and self._buffer is not None:
                _add_chunk(self._buffer, chunk, source=self.source)
            else:
                raise DataLossError(
                    f"The stream of {self.source} sent a chunk or an empty frame before any array header."
                )

    def finish(self) -> dict[str, np.ndarray]:
        """Verify the last array and return every array by name, in the order they arrived."""
        self._finish_array()
        return self._arrays

    def _check_resumed_header(self, first: arrays_pb2.ArrayFrame | memoryview | None) -> None:
        if first is None:
            raise DataLossError(
                f"The resumed stream of {self.source} ended without the header of array {self._header.name!r}."
            )
        if _chunk_of(first) is not None or first.WhichOneof("frame") != "header":
            raise DataLossError(
                f"The resumed stream of {self.source} did not start with the header of array {self._header.name!r}."
            )
        if first.header != self._header:
            raise DataLossError(
                f"The resumed stream of {self.source} sent array {first.header.name!r} with sha256 "
                f"{first.header.sha256} where array {self._header.name!r} with sha256 {self._header.sha256} "
                "was in progress; load the parameter set again."
            )

    def _finish_array(self) -> None:
        if self._header is not None and self._header.name not in self._arrays:
            self._arrays[self._header.name] = _finish_buffer(self._buffer, self._header, source=self.source)


def _chunk_of(frame: arrays_pb2.ArrayFrame | memoryview) -> memoryview | bytes | None:
    """Return the bytes of a chunk frame, which the bulk deserializer delivers as a memoryview, or None."""
    if isinstance(frame, memoryview):
        return frame
    if frame.WhichOneof("frame") == "chunk":
        return frame.chunk
    return None


def _new_buffer(header: arrays_pb2.ArrayHeader, *, source: str, out: np.ndarray | None = None) -> ArrayBuffer:
    if not header.sha256:
        raise DataLossError(
            f"The header of array {header.name!r} of {source} carries no sha256, so its bytes cannot be verified."
        )
    # The buffer gets a copy without the digest. It then returns the digest it computes instead of
    # raising the services' IntegrityError, and _finish_buffer raises the client's one.
    unverified = arrays_pb2.ArrayHeader()
    unverified.CopyFrom(header)
    unverified.sha256 = ""
    try:
        return ArrayBuffer(unverified, out=out)
    except InvalidArgument as error:
        raise DataLossError(f"The server sent an invalid header for {source}: {error}") from error


def _add_chunk(buffer: ArrayBuffer, chunk: bytes | memoryview, *, source: str) -> None:
    try:
        buffer.receiver.add(chunk)
    except InvalidArgument as error:
        raise DataLossError(f"{error} The stream came from {source}.") from error


def _finish_buffer(buffer: ArrayBuffer, header: arrays_pb2.ArrayHeader, *, source: str) -> np.ndarray:
    try:
        digest = buffer.receiver.finish()
    except InvalidArgument as error:
        raise DataLossError(f"{error} The stream came from {source}.") from error
    if digest != header.sha256:
        raise IntegrityError(header.name, header.sha256, digest, source=source)
    return buffer.array


def _watch(stub: Any, session_id: str, *, timeout_s: float | None) -> Iterator[trainer_pb2.SessionEvent]:
    call = stub.WatchSession(trainer_pb2.WatchSessionRequest(id=session_id), timeout=timeout_s)
    try:
        yield from call
    except grpc.RpcError as error:
        raise from_rpc_error(error) from error
    finally:
        call.cancel()


def _stream(method: Callable[..., Any], request: Any) -> Iterator[Any]:
    """Yield the responses of a server-streaming call that has no deadline, and cancel the call when closed."""
    call = method(request, timeout=None)
    try:
        yield from call
    except grpc.RpcError as error:
        raise from_rpc_error(error) from error
    finally:
        call.cancel()


def _event_state(event: trainer_pb2.SessionEvent) -> int | None:
    kind = event.WhichOneof("event")
    if kind == "snapshot":
        return event.snapshot.state
    if kind == "state":
        return event.state
    return None


def _wait_timeout(session_id: str, timeout_s: float | None) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"Session {session_id!r} did not reach a final state within {timeout_s} s; "
        "call wait_session again to keep waiting, or stop_session to end it."
    )

