"""Running the services: all three in one process, or one per process as a container would."""

from lasagne_engine.stack.serve import ROLES, build_servers, serve

__all__ = ["ROLES", "build_servers", "serve"]
