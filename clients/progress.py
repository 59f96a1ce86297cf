"""A one-line live view of a training session, drawn from its events."""

import sys
import time
from typing import TextIO

from lasagne_engine.client.engine import state_name
from lasagne_engine.v1 import trainer_pb2

BAR_WIDTH = 24


def _bar(fraction: float) -> str:
    filled = int(round(max(0.0, min(1.0, fraction)) * BAR_WIDTH))
    return "#" * filled + "-" * (BAR_WIDTH - filled)


class SessionProgress:
    """Renders session events: a bar redrawn in place on a terminal, one line per epoch elsewhere."""

    def __init__(self, stream: TextIO = sys.stdout, *, refresh=None):
        self.stream = stream
        # Called on each state change to fetch the session again, for fields such as steps_per_epoch
        # that the process reports only once it has compiled.
        self._refresh = refresh
        self.interactive = stream.isatty()
        self.session: trainer_pb2.Session | None = None
        self.last_epoch: trainer_pb2.EpochMetrics | None = None
        self.started = time.monotonic()

    def _line(self, text: str, *, final: bool) -> None:
        if self.interactive:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _epoch_text(self, epoch: int, step_in_epoch: int, train_loss: float) -> str:
        session = self.session
        epochs = session.hyperparameters.epochs if session else 0
        steps = session.steps_per_epoch if session and session.steps_per_epoch else 0
        within_epoch = step_in_epoch / steps if steps else 0.0
        fraction = ((epoch - 1) + within_epoch) / epochs if epochs else 0.0
        text = f"epoch {epoch:>3}/{epochs} [{_bar(fraction)}] train loss {train_loss:.4f}"
        if self.last_epoch is not None:
            text += f" | val loss {self.last_epoch.val_loss:.4f}"
            accuracy = self.last_epoch.metrics.get("val_accuracy")
            if accuracy is not None:
                text += f" acc {accuracy:.4f}"
        return text

    def update(self, event: trainer_pb2.SessionEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "snapshot":
            self.session = event.snapshot
            self._line(f"session {event.snapshot.id}: {state_name(event.snapshot.state)}", final=not self.interactive)
        elif kind == "state":
            if self._refresh is not None:
                self.session = self._refresh()
            elif self.session is not None:
                self.session.state = event.state
            self._line(f"session {self.session.id if self.session else ''}: {state_name(event.state)}", final=True)
        elif kind == "progress":
            progress = event.progress
            self._line(self._epoch_text(progress.epoch, progress.step_in_epoch, progress.train_loss), final=False)
        elif kind == "epoch_end":
            self.last_epoch = event.epoch_end
            steps = self.session.steps_per_epoch if self.session and self.session.steps_per_epoch else 0
            self._line(self._epoch_text(event.epoch_end.epoch, steps, event.epoch_end.train_loss), final=True)
