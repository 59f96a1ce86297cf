"""The main job: train a two-layer perceptron on the handwritten digits through all three services."""

import pathlib
import subprocess
import sys
from typing import TextIO

import numpy as np

from lasagne_engine.arrays import sha256_of
from lasagne_engine.client.engine import Engine, state_name
from lasagne_engine.client.errors import NotFoundError
from lasagne_engine.client.progress import SessionProgress
from lasagne_engine.v1 import trainer_pb2

DATASET_NAME = "digits"
MODEL_NAME = "digits-mlp"
VALIDATION_FRACTION = 0.2
SPLIT_SEED = 0
MODEL_SOURCE = pathlib.Path(__file__).parent / "examples" / "digits_mlp.py"


def digits_split() -> dict[str, np.ndarray]:
    """Return scikit-learn's 1,797 digits as X_train, y_train, X_val, y_val with a fixed 80/20 split.

    Pixels are scaled from 0..16 to 0..1 as float32; labels are int64.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    n_val = int(round(len(labels) * VALIDATION_FRACTION))
    val, train = order[:n_val], order[n_val:]
    return {"X_train": features[train], "y_train": labels[train], "X_val": features[val], "y_val": labels[val]}


def _latest_same_dataset(engine: Engine, arrays: dict[str, np.ndarray]):
    """Return the latest version of the demo dataset if it contains exactly ``arrays``, else None."""
    try:
        latest = engine.describe_dataset(DATASET_NAME)
    except NotFoundError:
        return None
    stored = {header.name: header.sha256 for header in latest.arrays}
    return latest if stored == {name: sha256_of(array) for name, array in arrays.items()} else None


def run_demo(engine: Engine, *, epochs: int = 20, hidden_units: int = 128, stream: TextIO = sys.stdout) -> str:
    """Upload the digits, register the model, train it with a live progress bar; return the best parameter set id.

    Raises
    ------
    RuntimeError
        If the session does not complete.
    """
    arrays = digits_split()
    dataset = _latest_same_dataset(engine, arrays)
    uploaded = dataset is None
    if uploaded:
        dataset = engine.upload_dataset(DATASET_NAME, arrays, description="scikit-learn digits, 80/20 split, seed 0")
    print(f"dataset {dataset.name}@{dataset.version} ({'uploaded' if uploaded else 'unchanged'}): "
          f"{len(arrays['X_train'])} training and {len(arrays['X_val'])} validation images", file=stream)
    model = engine.register_model(
        MODEL_NAME,
        MODEL_SOURCE.read_text(),
        description="two-layer perceptron for 8x8 digits",
        default_hyperparameters={"hidden_units": hidden_units},
    )
    print(f"model {model.name}@{model.version} ({'registered' if model.created else 'unchanged'})", file=stream)
    session = engine.start_session(
        f"{model.name}@{model.version}",
        f"{dataset.name}@{dataset.version}",
        optimizer="adam",
        learning_rate=1e-3,
        batch_size=32,
        epochs=epochs,
        seed=0,
        monitor="val_accuracy",
        description="lasagne-engine demo",
    )
    print(f"session {session.id} on {session.device}", file=stream)
    progress = SessionProgress(stream, refresh=lambda: engine.get_session(session.id))
    for event in engine.watch_session(session.id):
        progress.update(event)
    final = engine.get_session(session.id)
    if final.state != trainer_pb2.COMPLETED:
        raise RuntimeError(f"Session {final.id} ended {state_name(final.state)}: {final.error}")
    print(f"compiled in {final.compile_seconds:.1f} s; best parameter set {final.best_parameter_set_id}", file=stream)
    return final.best_parameter_set_id


def evaluate_in_fresh_process(parameter_set_id: str, dataset_ref: str) -> float:
    """Evaluate with ``lasagne-engine evaluate`` in a new process; return the accuracy it prints.

    A new process proves the parameter set alone, as stored in the registry, reproduces the model.
    """
    command = [sys.executable, "-m", "lasagne_engine.client.cli", "evaluate", parameter_set_id, dataset_ref, "--accuracy-only"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"Evaluation failed with exit code {result.returncode}:\n{result.stderr.strip()}")
    return float(result.stdout.strip().splitlines()[-1])
