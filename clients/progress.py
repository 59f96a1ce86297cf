"""Live progress views of training sessions, drawn from their watch events.

On a terminal, :class:`ProgressView` keeps one line per session at the bottom of the screen and
redraws them in place, with epoch and step, losses, examples per second and time left. Epoch
summaries and state changes scroll above them. Elsewhere (a pipe, a log file) it writes only the
epoch summaries and state changes, one line each.
"""

import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from lasagne_engine.client.engine import FINAL_STATES, state_name
from lasagne_engine.v1 import trainer_pb2

__all__ = ["ProgressView", "SessionProgress", "format_duration"]

BAR_WIDTH = 24
# ANSI sequences: move the cursor to the start of the line N lines up, and clear from the cursor to
# the end of the screen.
_CURSOR_UP = "\033[{}F"
_CLEAR_BELOW = "\033[J"


def _bar(fraction: float) -> str:
    filled = int(round(max(0.0, min(1.0, fraction)) * BAR_WIDTH))
    return "#" * filled + "-" * (BAR_WIDTH - filled)


def format_duration(seconds: float) -> str:
    """Format a duration for a progress line: ``42s``, ``3m05s`` or ``2h07m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class _SessionLine:
    """State of one session in the view: its record, its latest progress and its latest epoch."""

    def __init__(self, session_id: str):
        self.session_id = session_id
        self.session: trainer_pb2.Session | None = None
        self.state = trainer_pb2.SESSION_STATE_UNSPECIFIED
        self.epoch = 0
        self.step = 0
        self.step_in_epoch = 0
        self.train_loss: float | None = None
        self.examples_per_second = 0.0
        self.last_epoch: trainer_pb2.EpochMetrics | None = None
        # The first and latest (time, step) seen while the session ran, for the rate behind "time left".
        self.first_seen: tuple[float, int] | None = None
        self.last_seen: tuple[float, int] | None = None

    @property
    def planned_epochs(self) -> int:
        return self.session.hyperparameters.epochs if self.session else 0

    @property
    def steps_per_epoch(self) -> int:
        return self.session.steps_per_epoch if self.session else 0

    def take_session(self, session: trainer_pb2.Session) -> None:
        self.session = session
        self.state = session.state
        self.epoch = max(self.epoch, session.epoch)
        self.step = max(self.step, session.step)
        if session.epochs:
            self.last_epoch = session.epochs[-1]

    def take_progress(self, progress: trainer_pb2.StepProgress, now: float) -> None:
        self.epoch = progress.epoch
        self.step = progress.step
        self.step_in_epoch = progress.step_in_epoch
        self.train_loss = progress.train_loss
        self.examples_per_second = progress.examples_per_second
        if self.first_seen is None:
            self.first_seen = (now, progress.step)
        self.last_seen = (now, progress.step)

    def take_epoch_end(self, metrics: trainer_pb2.EpochMetrics) -> None:
        self.last_epoch = metrics
        self.epoch = metrics.epoch
        self.step = metrics.step
        self.step_in_epoch = self.steps_per_epoch

    def seconds_left(self) -> float | None:
        """Estimate the seconds until the last planned step, from the steps per second seen so far."""
        total_steps = self.planned_epochs * self.steps_per_epoch
        if not total_steps or self.state in FINAL_STATES:
            return None
        steps_per_second = 0.0
        if self.first_seen and self.last_seen and self.last_seen[1] > self.first_seen[1]:
            # Wall-clock rate across epochs, so validation and checkpoints count too.
            (first_time, first_step), (last_time, last_step) = self.first_seen, self.last_seen
            if last_time > first_time:
                steps_per_second = (last_step - first_step) / (last_time - first_time)
        if not steps_per_second and self.session and self.session.hyperparameters.batch_size:
            steps_per_second = self.examples_per_second / self.session.hyperparameters.batch_size
        if steps_per_second <= 0:
            return None
        return max(0, total_steps - self.step) / steps_per_second

    def losses_text(self, train_loss: float | None) -> str:
        parts = []
        if train_loss is not None and math.isfinite(train_loss):
            parts.append(f"train loss {train_loss:.4f}")
        if self.last_epoch is not None:
            text = f"val loss {self.last_epoch.val_loss:.4f}"
            accuracy = self.last_epoch.metrics.get("val_accuracy")
            if accuracy is not None:
                text += f" acc {accuracy:.4f}"
            parts.append(text)
        return " | ".join(parts)

    def epoch_text(self, epoch: int, step_in_epoch: int) -> str:
        epochs, steps = self.planned_epochs, self.steps_per_epoch
        within_epoch = step_in_epoch / steps if steps else 0.0
        fraction = ((epoch - 1) + within_epoch) / epochs if epochs and epoch else 0.0
        return f"epoch {epoch:>3}/{epochs} [{_bar(fraction)}]"

    def live_text(self) -> str:
        """Return the line redrawn in place: state, epoch and step of total, losses, rate, time left."""
        parts = []
        if self.state != trainer_pb2.RUNNING:
            parts.append(state_name(self.state))
        if self.epoch or self.state == trainer_pb2.RUNNING:
            text = self.epoch_text(max(self.epoch, 1), self.step_in_epoch)
            if self.steps_per_epoch:
                width = len(str(self.steps_per_epoch))
                text += f" step {self.step_in_epoch:>{width}}/{self.steps_per_epoch}"
            parts.append(text)
        losses = self.losses_text(self.train_loss)
        if losses:
            parts.append(losses)
        if self.state == trainer_pb2.RUNNING and self.examples_per_second:
            parts.append(f"{self.examples_per_second:,.0f} examples/s")
        seconds_left = self.seconds_left() if self.state == trainer_pb2.RUNNING else None
        if seconds_left is not None:
            parts.append(f"{format_duration(seconds_left)} left")
        return "  ".join(parts)

    def epoch_summary(self, metrics: trainer_pb2.EpochMetrics) -> str:
        """Return the line that stays on screen for an epoch: the bar at its end, mean train loss and validation."""
        return f"{self.epoch_text(metrics.epoch, self.steps_per_epoch)} {self.losses_text(metrics.train_loss)}"


class ProgressView:
    """Renders the watch events of one or more sessions.

    Parameters
    ----------
    stream : text stream, optional
        Where to write. Default: ``sys.stdout`` at the time of the call.
    refresh : callable, optional
        Called with a session id on each state change to fetch the session again, for fields
        such as ``steps_per_epoch`` that the process reports only once it has compiled.
    show_session_ids : bool
        Start each line with the session id. Default True.
    clock : callable
        Monotonic time in seconds, for the time-left estimate. Default :func:`time.monotonic`.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        refresh: Callable[[str], trainer_pb2.Session] | None = None,
        show_session_ids: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stream = stream if stream is not None else sys.stdout
        self.interactive = self.stream.isatty()
        self._refresh = refresh
        self._show_session_ids = show_session_ids
        self._clock = clock
        self._lines: dict[str, _SessionLine] = {}
        # Lines of the live block currently on screen, below the cursor's row when it was drawn.
        self._drawn = 0

    def add(self, session_ids: Sequence[str]) -> None:
        """Reserve a line for each session, in this order, before its first event arrives."""
        for session_id in session_ids:
            self._lines.setdefault(session_id, _SessionLine(session_id))

    def session(self, session_id: str) -> trainer_pb2.Session | None:
        """Return the latest record of a watched session, or None before its snapshot."""
        line = self._lines.get(session_id)
        return line.session if line else None

    def update(self, session_id: str, event: trainer_pb2.SessionEvent) -> None:
        """Apply one event of a session's watch stream and redraw."""
        line = self._lines.setdefault(session_id, _SessionLine(session_id))
        kind = event.WhichOneof("event")
        history_line: str | None = None
        if kind == "snapshot":
            line.take_session(event.snapshot)
            if not self.interactive:
                history_line = self._state_line(session_id, event.snapshot.state)
        elif kind == "state":
            line.state = event.state
            if self._refresh is not None:
                line.take_session(self._refresh(session_id))
                line.state = event.state
            history_line = self._state_line(session_id, event.state)
        elif kind == "progress":
            line.take_progress(event.progress, self._clock())
        elif kind == "epoch_end":
            line.take_epoch_end(event.epoch_end)
            history_line = self._prefix(session_id) + line.epoch_summary(event.epoch_end)
        self._render(history_line)

    def redraw(self) -> None:
        """Draw the live lines again, for example to update the time left between events."""
        self._render(None)

    def _prefix(self, session_id: str) -> str:
        return f"{session_id}  " if self._show_session_ids else ""

    def _state_line(self, session_id: str, state: int) -> str:
        if self._show_session_ids:
            return f"{session_id}  {state_name(state)}"
        return f"session {session_id}: {state_name(state)}"

    def _render(self, history_line: str | None) -> None:
        """Write ``history_line`` as a line that stays, then, on a terminal, the live lines below it."""
        if not self.interactive:
            if history_line is not None:
                self.stream.write(history_line + "\n")
                self.stream.flush()
            return

        # A live line that wrapped would take two rows, and the cursor would no longer return to
        # the first live line, so each is cut to the terminal's width.
        width = max(1, shutil.get_terminal_size().columns - 1)
        output = []
        if self._drawn:
            output.append(_CURSOR_UP.format(self._drawn))
        # Clearing everything below, not line by line, also clears the second row of a line that stays.
        output.append(_CLEAR_BELOW)
        if history_line is not None:
            output.append(history_line + "\n")
        for line in self._lines.values():
            text = self._prefix(line.session_id) + line.live_text()
            output.append(text[:width] + "\n")
        self._drawn = len(self._lines)
        self.stream.write("".join(output))
        self.stream.flush()


class SessionProgress:
    """The progress view of one session, without a session id on its lines.

    Feeds :class:`ProgressView`; ``refresh`` takes no argument and returns the session.
    """

    def __init__(self, stream: TextIO | None = None, *, refresh: Callable[[], trainer_pb2.Session] | None = None):
        self._session_id = ""
        self.view = ProgressView(
            stream,
            refresh=(lambda _session_id: refresh()) if refresh is not None else None,
            show_session_ids=False,
        )

    def update(self, event: trainer_pb2.SessionEvent) -> None:
        if event.WhichOneof("event") == "snapshot":
            self._session_id = event.snapshot.id
        self.view.update(self._session_id, event)
