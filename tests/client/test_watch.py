"""Live views of sessions: the progress view, watch_sessions, watch_metrics and the watch command."""

import contextlib
import io
import threading
import time

import grpc
import pytest

from lasagne_engine.client import NotFoundError, cli
from lasagne_engine.client.progress import ProgressView, SessionProgress, format_duration
from lasagne_engine.client.watch import watch_sessions
from lasagne_engine.v1 import trainer_pb2, trainer_pb2_grpc

STEPS_PER_EPOCH = 40


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def session(session_id="s-1", state=trainer_pb2.RUNNING, **fields) -> trainer_pb2.Session:
    fields.setdefault("steps_per_epoch", STEPS_PER_EPOCH)
    return trainer_pb2.Session(
        id=session_id, state=state, hyperparameters=trainer_pb2.Hyperparameters(epochs=5, batch_size=32), **fields
    )


def snapshot(session_id="s-1", state=trainer_pb2.RUNNING, **fields) -> trainer_pb2.SessionEvent:
    return trainer_pb2.SessionEvent(snapshot=session(session_id, state, **fields))


def progress(epoch, step_in_epoch, *, train_loss=0.5, examples_per_second=3200.0) -> trainer_pb2.SessionEvent:
    return trainer_pb2.SessionEvent(
        progress=trainer_pb2.StepProgress(
            epoch=epoch,
            step=(epoch - 1) * STEPS_PER_EPOCH + step_in_epoch,
            step_in_epoch=step_in_epoch,
            train_loss=train_loss,
            examples_per_second=examples_per_second,
        )
    )


def epoch_end(epoch) -> trainer_pb2.SessionEvent:
    return trainer_pb2.SessionEvent(
        epoch_end=trainer_pb2.EpochMetrics(
            epoch=epoch, step=epoch * STEPS_PER_EPOCH, train_loss=0.25, val_loss=0.3, metrics={"val_accuracy": 0.9}
        )
    )


def state(value) -> trainer_pb2.SessionEvent:
    return trainer_pb2.SessionEvent(state=value)


class TestFormatDuration:
    @pytest.mark.parametrize(
        ("seconds", "text"),
        [(0, "0s"), (42.4, "42s"), (59.6, "1m00s"), (185, "3m05s"), (7620, "2h07m"), (-3, "0s")],
    )
    def test_format(self, seconds, text):
        assert format_duration(seconds) == text


@pytest.fixture
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


class TestProgressView:
    def test_log_lines_without_terminal(self):
        output = io.StringIO()
        view = ProgressView(output)

        for event in (snapshot("s-1", trainer_pb2.COMPILING), state(trainer_pb2.RUNNING), progress(1, 20),
                      epoch_end(1), state(trainer_pb2.COMPLETED)):
            view.update("s-1", event)

        lines = output.getvalue().splitlines()
        assert lines[0] == "s-1  compiling"
        assert lines[1] == "s-1  running"
        assert lines[2].startswith("s-1  epoch   1/5 [#####")
        assert lines[2].endswith("] train loss 0.2500 | val loss 0.3000 acc 0.9000")
        assert lines[3] == "s-1  completed"
        assert len(lines) == 4

    def test_live_line_on_terminal(self, wide_terminal):
        output = Terminal()
        clock = FakeClock()
        view = ProgressView(output, clock=clock)
        view.update("s-1", snapshot())

        view.update("s-1", progress(2, 10))
        clock.now += 10.0
        view.update("s-1", progress(2, 30))

        last_line = output.getvalue().split("\033[J")[-1]
        # 1.75 of 5 epochs fill 8.4 of 24 characters. 20 steps in 10 s leave 130 of 200 steps at 2 per second.
        assert last_line == (
            f"s-1  epoch   2/5 [{'#' * 8}{'-' * 16}] step 30/40  train loss 0.5000  3,200 examples/s  1m05s left\n"
        )

    def test_time_left_from_throughput(self, wide_terminal):
        output = Terminal()
        view = ProgressView(output, clock=FakeClock())
        view.update("s-1", snapshot())

        view.update("s-1", progress(1, 40, examples_per_second=320.0))

        # A single report: 320 examples/s at batch 32 is 10 steps/s, with 160 steps to go.
        assert output.getvalue().endswith("16s left\n")

    def test_lines_redrawn_in_place(self, wide_terminal):
        output = Terminal()
        view = ProgressView(output, clock=FakeClock())
        view.add(["s-1", "s-2"])
        view.update("s-1", snapshot("s-1"))
        view.update("s-2", snapshot("s-2", trainer_pb2.PENDING))

        view.update("s-2", state(trainer_pb2.LOADING))

        last_frame = output.getvalue().rsplit("\033[2F", 1)[1]
        assert last_frame == (
            "\033[J"
            "s-2  loading\n"
            f"s-1  epoch   1/5 [{'-' * 24}] step  0/40\n"
            "s-2  loading\n"
        )

    def test_live_lines_cut_to_width(self, monkeypatch):
        monkeypatch.setenv("COLUMNS", "30")
        output = Terminal()
        view = ProgressView(output, clock=FakeClock())

        view.update("s-1", snapshot())

        assert output.getvalue() == "\033[J" + "s-1  epoch   1/5 [-----------" + "\n"

    def test_final_state_has_no_time_left(self, wide_terminal):
        output = Terminal()
        view = ProgressView(output, clock=FakeClock())
        view.update("s-1", snapshot())
        view.update("s-1", progress(5, 40))

        view.update("s-1", state(trainer_pb2.COMPLETED))

        assert output.getvalue().endswith("s-1  completed  epoch   5/5 [" + "#" * 24 + "] step 40/40  train loss 0.5000\n")

    def test_refresh_on_state_change(self):
        output = io.StringIO()
        requested = []

        def refresh(session_id):
            requested.append(session_id)
            return session(session_id, trainer_pb2.RUNNING)

        view = ProgressView(output, refresh=refresh)
        view.update("s-1", snapshot("s-1", trainer_pb2.COMPILING, steps_per_epoch=0))

        view.update("s-1", state(trainer_pb2.RUNNING))

        assert requested == ["s-1"]
        assert view.session("s-1").steps_per_epoch == STEPS_PER_EPOCH

    def test_single_session_format(self):
        output = io.StringIO()
        progress_view = SessionProgress(output)

        for event in (snapshot(), epoch_end(1), state(trainer_pb2.COMPLETED)):
            progress_view.update(event)

        lines = output.getvalue().splitlines()
        assert lines[0] == "session s-1: running"
        assert lines[1].startswith("epoch   1/5 [")
        assert lines[2] == "session s-1: completed"


class FakeTrainer(trainer_pb2_grpc.TrainerServicer):
    """Streams scripted events per session, and metric points until cancelled."""

    def __init__(self, scripts, *, final_states=None):
        self.scripts = scripts
        self.final_states = final_states or {}
        self.metric_requests = []
        self.metrics_cancelled = threading.Event()

    def WatchSession(self, request, context):
        if request.id not in self.scripts:
            context.abort(grpc.StatusCode.NOT_FOUND, f"No session {request.id!r}.")
        for event in self.scripts[request.id]:
            time.sleep(0.01)
            yield event

    def GetSession(self, request, context):
        if request.id not in self.scripts:
            context.abort(grpc.StatusCode.NOT_FOUND, f"No session {request.id!r}.")
        state = self.final_states.get(request.id, trainer_pb2.COMPLETED)
        return session(request.id, state, error="boom" if state == trainer_pb2.FAILED else "")

    def ListSessions(self, request, context):
        live = [session_id for session_id, final in self.final_states.items() if final == trainer_pb2.RUNNING]
        return trainer_pb2.ListSessionsResponse(sessions=[session(session_id) for session_id in live])

    def WatchMetrics(self, request, context):
        self.metric_requests.append(list(request.session_ids))
        context.add_callback(self.metrics_cancelled.set)
        for step in range(1, 4):
            time.sleep(0.2)
            yield trainer_pb2.MetricPoint(session_id="s-1", name="train_loss", value=1.0 / step, epoch=1, step=step)
        self.metrics_cancelled.wait(timeout=30)


SCRIPTS = {
    "s-1": [snapshot("s-1"), progress(1, 20), epoch_end(1), state(trainer_pb2.COMPLETED)],
    "s-2": [snapshot("s-2", trainer_pb2.LOADING), state(trainer_pb2.RUNNING), state(trainer_pb2.FAILED)],
}


@pytest.fixture
def start_trainer(serve, connect):
    def start(trainer, **engine_options):
        return connect(serve((trainer_pb2_grpc.add_TrainerServicer_to_server, trainer)), **engine_options)

    return start


class TestWatchSessions:
    def test_all_streams_followed(self, start_trainer):
        engine = start_trainer(FakeTrainer(SCRIPTS))
        output = io.StringIO()
        view = ProgressView(output)

        errors = watch_sessions(engine, ["s-1", "s-2"], view)

        assert errors == {}
        lines = output.getvalue().splitlines()
        assert [line for line in lines if line.startswith("s-1")][-1] == "s-1  completed"
        assert [line for line in lines if line.startswith("s-2")] == ["s-2  loading", "s-2  running", "s-2  failed"]

    def test_stream_error_returned(self, start_trainer):
        engine = start_trainer(FakeTrainer(SCRIPTS))

        errors = watch_sessions(engine, ["s-1", "s-9"], ProgressView(io.StringIO()))

        assert list(errors) == ["s-9"]
        assert isinstance(errors["s-9"], NotFoundError)


class TestWatchMetrics:
    def test_points_streamed_without_deadline(self, start_trainer):
        trainer = FakeTrainer(SCRIPTS)
        # The three points take 0.6 s, longer than the engine's 0.1 s timeout for other calls.
        engine = start_trainer(trainer, timeout_s=0.1)

        with contextlib.closing(engine.watch_metrics(["s-1"])) as points:
            received = [next(points) for _ in range(3)]

        assert [(point.name, point.step) for point in received] == [("train_loss", 1), ("train_loss", 2), ("train_loss", 3)]
        assert trainer.metric_requests == [["s-1"]]
        assert trainer.metrics_cancelled.wait(timeout=5)

    def test_all_sessions_by_default(self, start_trainer):
        trainer = FakeTrainer(SCRIPTS)
        engine = start_trainer(trainer)

        with contextlib.closing(engine.watch_metrics()) as points:
            next(points)

        assert trainer.metric_requests == [[]]


@pytest.fixture
def trainer_address(serve, monkeypatch):
    def start(trainer):
        address = serve((trainer_pb2_grpc.add_TrainerServicer_to_server, trainer))
        for service in ("REGISTRY", "DATA", "TRAINER"):
            monkeypatch.setenv(f"LASAGNE_ENGINE_{service}_ADDRESS", address)
        return address

    return start


class TestWatchCommand:
    def test_failed_session_exit_code(self, trainer_address, capsys):
        trainer_address(FakeTrainer(SCRIPTS, final_states={"s-2": trainer_pb2.FAILED}))

        assert cli.main(["watch", "s-1", "s-2"]) == 1

        captured = capsys.readouterr()
        assert "s-1  completed" in captured.out.splitlines()
        assert "s-2  failed" in captured.out.splitlines()
        assert captured.err.strip() == "session s-2 failed: boom"

    def test_completed_sessions_exit_zero(self, trainer_address):
        trainer_address(FakeTrainer({"s-1": SCRIPTS["s-1"]}))

        assert cli.main(["watch", "s-1"]) == 0

    def test_unknown_session(self, trainer_address, capsys):
        trainer_address(FakeTrainer(SCRIPTS))

        assert cli.main(["watch", "s-1", "s-9"]) == 2

        assert capsys.readouterr().err.strip() == "error: No session 's-9'."

    def test_live_sessions_by_default(self, trainer_address, capsys):
        trainer_address(FakeTrainer({"s-1": SCRIPTS["s-1"]}, final_states={"s-1": trainer_pb2.RUNNING}))

        assert cli.main(["watch"]) == 0

        assert "s-1  completed" in capsys.readouterr().out.splitlines()

    def test_no_live_sessions(self, trainer_address, capsys):
        trainer_address(FakeTrainer({}))

        assert cli.main(["watch"]) == 0

        assert capsys.readouterr().out.startswith("No live sessions to watch")
