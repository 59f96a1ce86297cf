import contextlib
import threading
import time

import grpc
import pytest

from lasagne_engine.client import FINAL_STATES, DeadlineExceededError, NotFoundError, state_name
from lasagne_engine.v1 import trainer_pb2, trainer_pb2_grpc

RUNNING_SNAPSHOT = trainer_pb2.SessionEvent(snapshot=trainer_pb2.Session(id="s-1", state=trainer_pb2.RUNNING))
COMPLETED_EVENTS = [
    RUNNING_SNAPSHOT,
    trainer_pb2.SessionEvent(progress=trainer_pb2.StepProgress(epoch=1, step=10, train_loss=0.5)),
    trainer_pb2.SessionEvent(epoch_end=trainer_pb2.EpochMetrics(epoch=1, step=10, val_loss=0.4)),
    trainer_pb2.SessionEvent(state=trainer_pb2.COMPLETED),
]


class FakeTrainer(trainer_pb2_grpc.TrainerServicer):
    """Streams the given events, then ends the stream or, with ``hang``, waits until the call is cancelled."""

    def __init__(self, events, *, hang=False, pause_s=0.0, final_state=trainer_pb2.COMPLETED):
        self.events = events
        self.hang = hang
        self.pause_s = pause_s
        self.final_state = final_state
        self.cancelled = threading.Event()
        self.requests = []

    def WatchSession(self, request, context):
        if request.id != "s-1":
            context.abort(grpc.StatusCode.NOT_FOUND, f"No session {request.id!r}.")
        context.add_callback(self.cancelled.set)
        for event in self.events:
            time.sleep(self.pause_s)
            yield event
        if self.hang:
            self.cancelled.wait(timeout=30)

    def GetSession(self, request, context):
        return trainer_pb2.Session(id=request.id, state=self.final_state, best_parameter_set_id="ps-7")

    def StartSession(self, request, context):
        self.requests.append(request)
        return trainer_pb2.Session(id="s-1", state=trainer_pb2.PENDING, hyperparameters=request.hyperparameters)


@pytest.fixture
def start_trainer(serve, connect):
    def start(trainer, **engine_options):
        return connect(serve((trainer_pb2_grpc.add_TrainerServicer_to_server, trainer)), **engine_options)

    return start


def test_wait_session_returns_final_session(start_trainer):
    engine = start_trainer(FakeTrainer(COMPLETED_EVENTS))

    session = engine.wait_session("s-1", timeout_s=10)

    assert session.state == trainer_pb2.COMPLETED
    assert session.best_parameter_set_id == "ps-7"


def test_wait_session_times_out(start_trainer):
    engine = start_trainer(FakeTrainer([RUNNING_SNAPSHOT], hang=True))

    message = r"Session 's-1' did not reach a final state within 0.5 s"
    with pytest.raises(DeadlineExceededError, match=message) as raised:
        engine.wait_session("s-1", timeout_s=0.5)

    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_watch_session_has_no_deadline(start_trainer):
    # The stream lasts 0.8 s, longer than the engine's 0.1 s timeout for other calls.
    engine = start_trainer(FakeTrainer(COMPLETED_EVENTS, pause_s=0.2), timeout_s=0.1)

    events = list(engine.watch_session("s-1"))

    assert events == COMPLETED_EVENTS


def test_wait_session_after_stream_ends_early(start_trainer):
    # A stream that ends without a final state, as when the trainer shuts down.
    engine = start_trainer(FakeTrainer([RUNNING_SNAPSHOT], final_state=trainer_pb2.INTERRUPTED))

    session = engine.wait_session("s-1", timeout_s=10)

    assert session.state == trainer_pb2.INTERRUPTED


def test_watch_session_close_cancels_call(start_trainer):
    trainer = FakeTrainer([RUNNING_SNAPSHOT], hang=True)
    engine = start_trainer(trainer)

    with contextlib.closing(engine.watch_session("s-1")) as events:
        assert next(events) == RUNNING_SNAPSHOT

    assert trainer.cancelled.wait(timeout=5)


def test_watch_session_not_found(start_trainer):
    engine = start_trainer(FakeTrainer([]))

    with pytest.raises(NotFoundError, match="No session 's-9'."):
        next(engine.watch_session("s-9"))


def test_start_session_sends_hyperparameters(start_trainer):
    trainer = FakeTrainer([])
    engine = start_trainer(trainer)

    session = engine.start_session(
        "mlp@1",
        "digits@2",
        optimizer="sgd",
        learning_rate=0.1,
        batch_size=64,
        epochs=3,
        seed=7,
        model_hyperparameters={"hidden_units": 16},
        monitor="val_accuracy",
        init_parameter_set="ps-3",
        train_inputs="X",
    )

    assert session.state == trainer_pb2.PENDING
    request = trainer.requests[0]
    assert (request.model, request.dataset, request.init_parameter_set) == ("mlp@1", "digits@2", "ps-3")
    assert (request.train_inputs, request.train_targets) == ("X", "")
    hyperparameters = request.hyperparameters
    assert (hyperparameters.optimizer, hyperparameters.learning_rate) == ("sgd", 0.1)
    assert (hyperparameters.batch_size, hyperparameters.epochs, hyperparameters.seed) == (64, 3, 7)
    assert hyperparameters.monitor == "val_accuracy"
    assert dict(hyperparameters.model) == {"hidden_units": 16.0}


def test_state_name():
    assert state_name(trainer_pb2.RUNNING) == "running"
    assert state_name(trainer_pb2.EARLY_STOPPED) == "early_stopped"
    assert state_name(99) == "unknown(99)"


def test_final_states():
    assert {state_name(state) for state in FINAL_STATES} == {
        "completed",
        "stopped",
        "early_stopped",
        "failed",
        "interrupted",
    }
