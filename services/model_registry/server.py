"""Factories that put the model registry on a gRPC server."""

import logging
import pathlib
import sys

from lasagne_engine.blobstore import BlobStore
from lasagne_engine.blobstore.garbage import add_delete_retries, delete_retry_interval_s
from lasagne_engine.config import StreamLimits
from lasagne_engine.model_registry.checker import DefinitionChecker
from lasagne_engine.model_registry.servicer import ModelRegistryServicer
from lasagne_engine.model_registry.store import RegistryStore
from lasagne_engine.rpc import Server

logger = logging.getLogger(__name__)

SERVICE_NAME = "lasagne_engine.v1.ModelRegistry"


def add_model_registry(
    server: Server,
    *,
    root: pathlib.Path,
    blob_store: BlobStore | None = None,
    compile_cache: pathlib.Path | None = None,
    python_executable: str = sys.executable,
    delete_retry_s: float | None = None,
) -> ModelRegistryServicer:
    """Open the registry at ``root`` and serve it on ``server``.

    Parameters
    ----------
    server : lasagne_engine.rpc.Server
        A server not yet started. The registry's name is added to its health service.
    root : pathlib.Path
        Folder of the registry's metadata database, and of its blobs unless ``blob_store`` is given.
    blob_store : BlobStore, optional
        Where sources and arrays are stored. Default ``LocalBlobStore(root / "blobs")``.
    compile_cache : pathlib.Path, optional
        PyTensor's compile cache for the definition checks; pass the one the sessions use so that
        checks warm it. Default ``root / "compile-cache"``.
    python_executable : str
        Interpreter that runs the definition checks. Default ``sys.executable``.
    delete_retry_s : float, optional
        Seconds between the server's retries of failed blob deletions; 0 turns them off.
        Default ``$LASAGNE_ENGINE_DELETE_RETRY_S``, else 300.

    Returns
    -------
    ModelRegistryServicer
        The registered servicer; call its ``close()`` after the server has stopped.

    Raises
    ------
    ValueError
        If ``delete_retry_s`` or ``$LASAGNE_ENGINE_DELETE_RETRY_S`` is negative or not a finite number.
    """
    root = pathlib.Path(root)
    checker = DefinitionChecker(
        compile_cache=compile_cache if compile_cache is not None else root / "compile-cache",
        python_executable=python_executable,
    )
    delete_retry_s = delete_retry_interval_s(delete_retry_s)
    registry_store = RegistryStore(root, check_definition=checker, blob_store=blob_store)
    servicer = ModelRegistryServicer(registry_store, server.limits)

    servicer.add_to_server(server.grpc_server)
    server.add_service_name(SERVICE_NAME)
    add_delete_retries(server, registry_store.retry_pending_deletions, delete_retry_s, service="model registry")
    logger.info("Added the model registry at %s to the server on %s", root, server.address)
    return servicer


def create_server(
    address: str,
    *,
    root: pathlib.Path,
    blob_store: BlobStore | None = None,
    compile_cache: pathlib.Path | None = None,
    limits: StreamLimits | None = None,
    delete_retry_s: float | None = None,
) -> Server:
    """Build a server for the model registry alone, bound to ``address`` but not started.

    Parameters
    ----------
    address : str
        ``host:port`` to listen on; port 0 picks a free port, which ``Server.port`` returns.
    root, blob_store, compile_cache, delete_retry_s
        As for :func:`add_model_registry`.
    limits : StreamLimits, optional
        Message and chunk sizes. Default from the environment.

    Returns
    -------
    lasagne_engine.rpc.Server
        The server; call ``start()`` to serve.
    """
    server = Server(address, limits=limits)
    add_model_registry(
        server, root=root, blob_store=blob_store, compile_cache=compile_cache, delete_retry_s=delete_retry_s
    )
    return server
