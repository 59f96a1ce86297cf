"""The model registry: versioned model definitions and the parameter sets trained from them."""

from lasagne_engine.model_registry.server import add_model_registry, create_server
from lasagne_engine.model_registry.servicer import ModelRegistryServicer

__all__ = ["ModelRegistryServicer", "add_model_registry", "create_server"]
