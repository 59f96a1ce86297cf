import os
import signal
import time

import grpc
import numpy as np
import pytest

from lasagne_engine.client import FailedPreconditionError, InvalidArgumentError, NotFoundError
from lasagne_engine.client.demo import MODEL_SOURCE, digits_split
from lasagne_engine.v1 import trainer_pb2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(stack):
    dataset = stack.engine.upload_dataset("digits", digits_split())
    model = stack.engine.register_model("mlp", MODEL_SOURCE.read_text(), default_hyperparameters={"hidden_units": 32})
    return f"{model.name}@{model.version}", f"{dataset.name}@{dataset.version}"


def wait_for_state(engine, session_id: str, states, timeout_s: float = 300.0) -> trainer_pb2.Session:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        session = engine.get_session(session_id)
        if session.state in states:
            return session
        time.sleep(0.1)
    raise AssertionError(f"session {session_id} stayed {trainer_pb2.SessionState.Name(session.state)}")


def test_session_trains_and_tags_best(stack, digits):
    model, dataset = digits
    session = stack.engine.start_session(model, dataset, epochs=3, batch_size=64, learning_rate=0.01, monitor="val_accuracy")

    final = stack.engine.wait_session(session.id, timeout_s=300)

    assert final.state == trainer_pb2.COMPLETED, final.error
    assert [epoch.epoch for epoch in final.epochs] == [1, 2, 3]
    assert final.steps_per_epoch == len(digits_split()["X_train"]) // 64
    assert final.epochs[-1].step == 3 * final.steps_per_epoch
    saved = stack.engine.list_parameter_sets(session_id=session.id)
    assert len(saved) == 3
    best = stack.engine.list_parameter_sets(session_id=session.id, tag="best")
    assert [parameter_set.id for parameter_set in best] == [final.best_parameter_set_id]
    accuracies = [epoch.metrics["val_accuracy"] for epoch in final.epochs]
    assert best[0].metrics["val_accuracy"] == max(accuracies)
    roles = {header.role for header in best[0].arrays}
    assert roles == {"trainable", "optimizer"}


def test_watch_streams_progress_and_epochs(stack, digits):
    model, dataset = digits
    session = stack.engine.start_session(model, dataset, epochs=2, batch_size=32)

    events = list(stack.engine.watch_session(session.id))

    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[0] == "snapshot"
    assert kinds.count("epoch_end") == 2
    assert "progress" in kinds
    states = [event.state for event in events if event.WhichOneof("event") == "state"]
    assert states[-1] == trainer_pb2.COMPLETED
    assert trainer_pb2.RUNNING in states


def test_stop_saves_final_parameter_set(stack, digits):
    model, dataset = digits
    session = stack.engine.start_session(model, dataset, epochs=100_000, batch_size=8)
    wait_for_state(stack.engine, session.id, {trainer_pb2.RUNNING})

    stack.engine.stop_session(session.id)
    final = stack.engine.wait_session(session.id, timeout_s=120)

    assert final.state == trainer_pb2.STOPPED
    tagged_final = stack.engine.list_parameter_sets(session_id=session.id, tag="final")
    assert len(tagged_final) == 1
    last_epoch_step = final.epochs[-1].step if final.epochs else 0
    assert tagged_final[0].step >= max(last_epoch_step, 1)
    with pytest.raises(FailedPreconditionError, match="already stopped"):
        stack.engine.stop_session(session.id)


def test_killed_process_marks_session_failed(stack, digits):
    model, dataset = digits
    session = stack.engine.start_session(model, dataset, epochs=100_000, batch_size=8)
    running = wait_for_state(stack.engine, session.id, {trainer_pb2.RUNNING})

    os.kill(running.pid, signal.SIGKILL)
    final = stack.engine.wait_session(session.id, timeout_s=60)

    assert final.state == trainer_pb2.FAILED
    assert "signal SIGKILL" in final.error
    assert stack.engine.health()["trainer"]


# The digits perceptron, made to crash its session process with a segmentation fault when
# built with crash=1. Registration builds it with the defaults, which do not crash.
CRASHING_MODEL = MODEL_SOURCE.read_text() + """

_build_digits_perceptron = build


def build(hyperparameters):
    if hyperparameters.get("crash"):
        import ctypes
        import sys

        print("crashing model: reading address 0", file=sys.stderr, flush=True)
        ctypes.string_at(0)
    return _build_digits_perceptron(hyperparameters)
"""


def test_segfault_fails_with_output_tail(stack, digits):
    _, dataset = digits
    stack.engine.register_model("crashing", CRASHING_MODEL)
    session = stack.engine.start_session("crashing", dataset, epochs=1, model_hyperparameters={"crash": 1})

    final = stack.engine.wait_session(session.id, timeout_s=120)

    assert final.state == trainer_pb2.FAILED
    assert "signal SIGSEGV" in final.error
    assert "crashing model: reading address 0" in final.error
    assert stack.engine.health()["trainer"]


def test_shape_mismatch_names_both_shapes(stack, digits):
    model, _ = digits
    rng = np.random.default_rng(0)
    narrow = {
        "X_train": rng.random((100, 32), dtype=np.float32),
        "y_train": rng.integers(0, 10, 100),
        "X_val": rng.random((20, 32), dtype=np.float32),
        "y_val": rng.integers(0, 10, 20),
    }
    dataset = stack.engine.upload_dataset("narrow", narrow)
    session = stack.engine.start_session(model, f"narrow@{dataset.version}", epochs=1)

    final = stack.engine.wait_session(session.id, timeout_s=120)

    assert final.state == trainer_pb2.FAILED
    assert "(32,)" in final.error
    assert "(64,)" in final.error


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"optimizer": "adamm"}, "Unknown optimizer 'adamm'"),
        ({"learning_rate": -1.0}, "learning_rate -1.0"),
        ({"batch_size": -4}, "batch_size -4"),
        ({"epochs": -1}, "epochs -1"),
        ({"monitor": "val_f1"}, "Unknown monitor 'val_f1'"),
        ({"learning_rate": 0}, "learning_rate 0"),
        ({"batch_size": 0}, "batch_size 0"),
        ({"epochs": 0}, "epochs 0"),
    ],
    ids=["optimizer", "learning-rate", "batch-size", "epochs", "monitor", "zero-learning-rate", "zero-batch-size",
         "zero-epochs"],
)
def test_start_rejects_bad_hyperparameters(stack, digits, options, message):
    model, dataset = digits

    with pytest.raises(InvalidArgumentError, match=message) as raised:
        stack.engine.start_session(model, dataset, **options)

    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("model", "dataset", "options", "message"),
    [
        ("no-such-model", "digits", {}, "no-such-model"),
        ("mlp", "no-such-data", {}, "no-such-data"),
        ("mlp@99", "digits", {}, "mlp@99"),
        ("mlp", "digits", {"train_inputs": "X_missing"}, "no array 'X_missing'"),
        ("mlp", "digits", {"init_parameter_set": "ps-000000000000"}, "ps-000000000000"),
    ],
    ids=["model", "dataset", "model-version", "array", "init-parameter-set"],
)
def test_start_reports_unknown_references(stack, digits, model, dataset, options, message):
    with pytest.raises(NotFoundError, match=message) as raised:
        stack.engine.start_session(model, dataset, **options)

    assert raised.value.code == grpc.StatusCode.NOT_FOUND


def test_unknown_session_is_not_found(stack):
    with pytest.raises(NotFoundError, match="No session 's-nothing'"):
        stack.engine.get_session("s-nothing")
    with pytest.raises(NotFoundError):
        stack.engine.stop_session("s-nothing")


def test_sessions_share_one_host_copy_of_a_dataset(stack, digits):
    model, dataset = digits
    cache = stack.home / "cache" / "datasets"
    first = stack.engine.wait_session(stack.engine.start_session(model, dataset, epochs=1).id, timeout_s=300)
    # A fill renames a new file into place, so an array downloaded again would have a new inode.
    cached = {path: path.stat().st_ino for path in cache.rglob("*.npy")}
    shas = {header.sha256 for header in stack.engine.describe_dataset(dataset).arrays}

    second = stack.engine.wait_session(stack.engine.start_session(model, dataset, epochs=1).id, timeout_s=300)

    assert first.state == second.state == trainer_pb2.COMPLETED
    assert cached
    assert all(any(sha in path.name for path in cached) for sha in shas)
    assert {path: path.stat().st_ino for path in cache.rglob("*.npy")} == cached
