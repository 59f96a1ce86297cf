"""Evaluating a stored parameter set on a dataset, in the client's own process.

Rebuilds the network from its registered definition with the hyperparameters of the session that
trained it, loads the parameter set's arrays into its shared variables, and predicts.
"""

import os

import numpy as np
from google.protobuf import json_format

from lasagne_engine.config import Paths
from lasagne_engine.compute import compute_environment


def _configure_pytensor() -> None:
    # PyTensor reads its flags once, at import: set them first so this process shares the
    # trainer's compile cache and float32.
    if "pytensor" not in os.sys.modules:
        os.environ.update(compute_environment(Paths().compile_cache, backend="default"))


def evaluate_parameter_set(
    engine, parameter_set_id: str, dataset_ref: str, *, inputs: str = "X_val", targets: str = "y_val"
) -> dict[str, float]:
    """Return the loss and metrics that parameter set ``parameter_set_id`` gives on a dataset's arrays.

    Returns
    -------
    dict
        ``loss`` and, for a cross-entropy model, ``accuracy``; ``examples`` is the number evaluated.

    Raises
    ------
    lasagne_engine.client.NotFoundError
        If the parameter set, its model, the dataset or an array does not exist.
    """
    _configure_pytensor()
    from pytensor_ml.model import Model

    from lasagne_engine.modeldef import build_model
    from lasagne_engine.trainer.training import array_name

    parameter_set = engine.get_parameter_set(parameter_set_id)
    model_version = engine.get_model(f"{parameter_set.model}@{parameter_set.model_version}")
    hyperparameters = json_format.MessageToDict(model_version.default_hyperparameters)
    if parameter_set.session_id:
        session = engine.get_session(parameter_set.session_id)
        hyperparameters.update(json_format.MessageToDict(session.hyperparameters.model))
    built = build_model(model_version.source, hyperparameters, name=model_version.name)

    names = [array_name(variable.name) for variable in [*built.trainable, *built.state]]
    values = engine.load_parameter_set(parameter_set_id, names=names)
    for variable in [*built.trainable, *built.state]:
        variable.set_value(values[array_name(variable.name)].astype(variable.get_value(borrow=True).dtype))

    data = engine.load_dataset(dataset_ref, names=[inputs, targets])
    features = data[inputs].astype(built.input.type.dtype)
    labels = data[targets]
    outputs = Model(built.output).predict(features)
    if built.loss == "cross_entropy":
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = float(-log_probabilities[np.arange(len(labels)), labels].mean())
        accuracy = float((outputs.argmax(axis=1) == labels).mean())
        return {"loss": loss, "accuracy": accuracy, "examples": float(len(labels))}
    loss = float(((outputs.reshape(len(labels), -1) - labels.reshape(len(labels), -1)) ** 2).mean())
    return {"loss": loss, "examples": float(len(labels))}
