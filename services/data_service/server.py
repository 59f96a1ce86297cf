"""Factories that build a gRPC server with the data service."""

import pathlib

from lasagne_engine.blobstore import BlobStore
from lasagne_engine.blobstore.garbage import add_delete_retries, delete_retry_interval_s
from lasagne_engine.config import StreamLimits
from lasagne_engine.data_service.servicer import SERVICE_NAME, DataServiceServicer
from lasagne_engine.data_service.store import DatasetStore
from lasagne_engine.rpc import Server

__all__ = ["add_data_service", "create_server"]


def add_data_service(
    server: Server, *, root: pathlib.Path, blob_store: BlobStore | None = None, delete_retry_s: float | None = None
) -> DataServiceServicer:
    """Register the data service on ``server`` and report it in the server's health service.

    Parameters
    ----------
    server : lasagne_engine.rpc.Server
        A server that has not started yet.
    root : pathlib.Path
        Folder of the dataset metadata; created if missing.
    blob_store : BlobStore, optional
        Where array bytes go. Default a local folder, ``root / "blobs"``.
    delete_retry_s : float, optional
        Seconds between the server's retries of failed blob deletions; 0 turns them off.
        Default ``$LASAGNE_ENGINE_DELETE_RETRY_S``, else 300.

    Returns
    -------
    DataServiceServicer
        The registered servicer; its ``store`` attribute is the dataset store.

    Raises
    ------
    ValueError
        If ``delete_retry_s`` or ``$LASAGNE_ENGINE_DELETE_RETRY_S`` is negative or not a finite number.
    """
    delete_retry_s = delete_retry_interval_s(delete_retry_s)
    store = DatasetStore(root, blob_store=blob_store)
    servicer = DataServiceServicer(store, limits=server.limits)
    servicer.add_to_server(server.grpc_server)
    server.add_service_name(SERVICE_NAME)
    add_delete_retries(server, store.retry_pending_deletions, delete_retry_s, service="data service")
    return servicer


def create_server(
    address: str,
    *,
    root: pathlib.Path,
    blob_store: BlobStore | None = None,
    limits: StreamLimits | None = None,
    delete_retry_s: float | None = None,
) -> Server:
    """Build a data service server bound to ``address``, without starting it.

    Parameters
    ----------
    address : str
        ``host:port`` to listen on. Port 0 picks a free port, which the server's ``port``
        attribute returns.
    root : pathlib.Path
        Folder of the dataset metadata; created if missing.
    blob_store : BlobStore, optional
        Where array bytes go. Default a local folder, ``root / "blobs"``.
    limits : StreamLimits, optional
        Chunk and message sizes. Default read from the environment.
    delete_retry_s : float, optional
        As for :func:`add_data_service`.

    Returns
    -------
    lasagne_engine.rpc.Server
        The server. Call ``start()`` to serve and ``stop()`` to shut down.
    """
    server = Server(address, limits=limits)
    try:
        add_data_service(server, root=root, blob_store=blob_store, delete_retry_s=delete_retry_s)
    except BaseException:
        # Release the bound port, which the caller never receives.
        server.stop(grace_s=None)
        raise
    return server
