"""Factories that build a gRPC server with the data service."""

import pathlib

from lasagne_engine.blobstore import BlobStore
from lasagne_engine.config import StreamLimits
from lasagne_engine.data_service.servicer import SERVICE_NAME, DataServiceServicer
from lasagne_engine.data_service.store import DatasetStore
from lasagne_engine.rpc import Server

__all__ = ["add_data_service", "create_server"]


def add_data_service(
    server: Server, *, root: pathlib.Path, blob_store: BlobStore | None = None
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

    Returns
    -------
    DataServiceServicer
        The registered servicer; its ``store`` attribute is the dataset store.
    """
    store = DatasetStore(root, blob_store=blob_store)
    servicer = DataServiceServicer(store, limits=server.limits)
    servicer.add_to_server(server.grpc_server)
    server.add_service_name(SERVICE_NAME)
    return servicer


def create_server(
    address: str,
    *,
    root: pathlib.Path,
    blob_store: BlobStore | None = None,
    limits: StreamLimits | None = None,
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

    Returns
    -------
    lasagne_engine.rpc.Server
        The server. Call ``start()`` to serve and ``stop()`` to shut down.
    """
    server = Server(address, limits=limits)
    try:
        add_data_service(server, root=root, blob_store=blob_store)
    except BaseException:
        # Release the bound port, which the caller never receives.
        server.stop(grace_s=None)
        raise
    return server
