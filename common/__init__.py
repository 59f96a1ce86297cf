"""LasagneEngine: a model registry, a data service and a trainer for PyTensor networks.

``from lasagne_engine import Engine`` gives the client SDK; the services live in
``lasagne_engine.model_registry``, ``lasagne_engine.data_service`` and ``lasagne_engine.trainer``.
"""

__version__ = "0.1.0"

__all__ = ["Engine", "__version__"]


def __getattr__(name: str):
    # Imported on first use so that the services, which import this package for its helpers,
    # do not load the client SDK.
    if name == "Engine":
        from lasagne_engine.client import Engine

        return Engine
    raise AttributeError(f"module 'lasagne_engine' has no attribute {name!r}")
