"""The data service: named, versioned, immutable datasets of numpy arrays, served over gRPC.

``create_server`` builds a server with this service alone; ``add_data_service`` adds it to a
server shared with other services. ``DatasetStore`` is the storage without the gRPC edge.
"""

from lasagne_engine.data_service.server import add_data_service, create_server
from lasagne_engine.data_service.servicer import DataServiceServicer
from lasagne_engine.data_service.store import DatasetStore

__all__ = ["DataServiceServicer", "DatasetStore", "add_data_service", "create_server"]
