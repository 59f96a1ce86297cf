"""Model definitions: Python source that builds a pytensor-ml network from hyperparameters.

A definition is a module with a function ``build(hyperparameters)`` returning the input variable
and the output variable of the network, batch axis first. A module-level ``LOSS`` selects the
training loss: ``"cross_entropy"`` (the default; the output contains logits and the targets are
integer class labels) or ``"squared_error"`` (the output is compared to float targets). Example::

    from pytensor_ml.activations import ReLU
    from pytensor_ml.layers import Input, Linear, Sequential

    def build(hyperparameters):
        hidden = int(hyperparameters.get("hidden_units", 128))
        X = Input("X", shape=(None, 64))
        network = Sequential(Linear("fc1", n_in=64, n_out=hidden), ReLU(), Linear("fc2", n_in=hidden, n_out=10))
        return X, network(X)

Run as ``python -m lasagne_engine.modeldef``, this module reads ``{"source": ..., "hyperparameters":
...}`` as JSON on standard input, builds the definition and prints its signature as JSON. The
registry checks definitions that way, in a process of their own, because building runs user code.
"""

import hashlib
import json
import sys
import traceback
import types
from dataclasses import dataclass
from typing import Any

from lasagne_engine.errors import FailedPrecondition

LOSSES = ("cross_entropy", "squared_error")
ERROR_TAIL_LINES = 12


class ModelDefinitionError(FailedPrecondition):
    """The definition failed to import or build; the message ends with the error's last lines."""


def source_sha256(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def error_tail(text: str, lines: int = ERROR_TAIL_LINES) -> str:
    """Return the last ``lines`` non-empty lines of ``text``."""
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


@dataclass
class BuiltModel:
    """A built network: its input and output variables, loss kind and shared variables."""

    input: Any
    output: Any
    loss: str
    trainable: list
    state: list

    def signature(self) -> dict:
        """Describe the network as the registry stores it (see ``ModelSignature`` in the protos)."""
        from lasagne_engine.arrays import dtype_text

        parameters = [
            {"name": variable.name, "dtype": dtype_text(variable.get_value(borrow=True).dtype),
             "shape": list(variable.get_value(borrow=True).shape)}
            for variable in [*self.trainable, *self.state]
        ]
        return {
            "input_shape": [-1 if size is None else int(size) for size in self.input.type.shape[1:]],
            "input_dtype": str(self.input.type.dtype),
            "output_shape": [-1 if size is None else int(size) for size in self.output.type.shape[1:]],
            "loss": self.loss,
            "parameters": parameters,
            "parameter_bytes": int(sum(variable.get_value(borrow=True).nbytes for variable in [*self.trainable, *self.state])),
        }


def load_module(source: str, name: str) -> types.ModuleType:
    """Execute the definition's source as a fresh module named ``lasagne_engine_models.<name>``.

    Raises
    ------
    ModelDefinitionError
        If the source fails to compile or run, or defines no ``build`` function.
    """
    module = types.ModuleType(f"lasagne_engine_models.{name}")
    module.__file__ = f"<model {name}>"
    try:
        code = compile(source, module.__file__, "exec")
        exec(code, module.__dict__)  # noqa: S102 - running the definition is the point; see the README's trust model
    except Exception as error:  # noqa: BLE001 - any failure of user code is reported the same way
        raise ModelDefinitionError(
            f"Model definition {name!r} failed to import:\n{error_tail(traceback.format_exc())}"
        ) from error
    if not callable(getattr(module, "build", None)):
        raise ModelDefinitionError(
            f"Model definition {name!r} defines no function build(hyperparameters); "
            "add one that returns the network's input and output variables."
        )
    return module


def build_model(source: str, hyperparameters: dict, *, name: str = "model") -> BuiltModel:
    """Import the definition and build its network with ``hyperparameters``.

    Raises
    ------
    ModelDefinitionError
        If importing or building fails, or ``build`` returns something other than two variables.
    """
    from pytensor.graph.basic import Variable
    from pytensor_ml.pytensorf import collect_non_trainable_params, collect_trainable_params

    module = load_module(source, name)
    loss = getattr(module, "LOSS", "cross_entropy")
    if loss not in LOSSES:
        raise ModelDefinitionError(f"Model definition {name!r} sets LOSS = {loss!r}; use one of {', '.join(LOSSES)}.")
    try:
        result = module.build(dict(hyperparameters))
    except Exception as error:  # noqa: BLE001 - any failure of user code is reported the same way
        raise ModelDefinitionError(
            f"Model definition {name!r} failed to build with hyperparameters {hyperparameters!r}:\n"
            f"{error_tail(traceback.format_exc())}"
        ) from error
    if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(item, Variable) for item in result)):
        raise ModelDefinitionError(
            f"Model definition {name!r}: build() returned {type(result).__name__}; "
            "return a tuple (input variable, output variable)."
        )
    network_input, output = result
    if network_input.type.ndim < 2 or output.type.ndim < 2:
        raise ModelDefinitionError(
            f"Model definition {name!r}: input and output need a batch axis first; got input with "
            f"{network_input.type.ndim} and output with {output.type.ndim} dimensions."
        )
    trainable = collect_trainable_params(output)
    state = collect_non_trainable_params(output)
    if not trainable:
        raise ModelDefinitionError(f"Model definition {name!r} builds a network with no trainable parameters.")
    names = [variable.name for variable in [*trainable, *state]]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ModelDefinitionError(
            f"Model definition {name!r} has several parameters named {duplicates}; give each layer its own name."
        )
    return BuiltModel(network_input, output, loss, trainable, state)


def main() -> int:
    request = json.load(sys.stdin)
    try:
        built = build_model(request["source"], request.get("hyperparameters") or {}, name=request.get("name", "model"))
    except ModelDefinitionError as error:
        print(str(error), file=sys.stderr)
        return 2
    json.dump(built.signature(), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
