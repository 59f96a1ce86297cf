"""The side-by-side table of ``lasagne-engine sessions --compare``: settings and results per session."""

import math
import time
from collections.abc import Mapping, Sequence

from google.protobuf import json_format

from lasagne_engine.client.engine import state_name
from lasagne_engine.v1 import trainer_pb2

__all__ = ["DIFFERS_MARK", "comparison_rows"]

# Metrics that are better when larger, as the trainer treats them when it picks the best epoch.
# Every other metric is best at its smallest value.
MAXIMIZED_METRICS = ("val_accuracy",)
DIFFERS_MARK = "*"


def _number(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else str(value)


def _value(value) -> str:
    if isinstance(value, float):
        return _number(value)
    return str(value)


def _seconds(session: trainer_pb2.Session, now: float) -> float | None:
    """Return the wall time from the session's start to its end, or to ``now`` while it runs."""
    if not session.HasField("started_at"):
        return None
    started = session.started_at.ToNanoseconds() / 1e9
    finished = session.finished_at.ToNanoseconds() / 1e9 if session.HasField("finished_at") else now
    return max(0.0, finished - started)


def _wall_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, remainder = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{remainder:04.1f}" if hours else f"{minutes}:{remainder:04.1f}"


def _best(session: trainer_pb2.Session, metric: str) -> str:
    """Return the best value of a per-epoch metric with the epoch it came from, such as ``0.9721 (epoch 7)``."""
    values = []
    for epoch in session.epochs:
        if metric == "val_loss":
            values.append((epoch.val_loss, epoch.epoch))
        elif metric == "train_loss":
            values.append((epoch.train_loss, epoch.epoch))
        elif metric in epoch.metrics:
            values.append((epoch.metrics[metric], epoch.epoch))
    values = [(value, epoch) for value, epoch in values if math.isfinite(value)]
    if not values:
        return "-"
    value, epoch = (max if metric in MAXIMIZED_METRICS else min)(values, key=lambda pair: pair[0])
    return f"{_number(value)} (epoch {epoch})"


def comparison_rows(
    sessions: Sequence[trainer_pb2.Session],
    model_defaults: Mapping[str, Mapping[str, object]],
    *,
    now: float | None = None,
) -> list[list[str]]:
    """Build the rows of the comparison table: a field name, then one value per session.

    Parameters
    ----------
    sessions : sequence of Session
        The sessions, one column each.
    model_defaults : mapping
        Registered default hyperparameters by ``"name@version"`` of each session's model; a
        session's own model hyperparameters are merged over them, as the trainer does.
    now : float, optional
        Unix time that live sessions' wall time runs to. Default: the current time.

    Returns
    -------
    list of list of str
        The first cell of a row whose values differ between sessions starts with ``*``.
    """
    now = time.time() if now is None else now
    model_hyperparameters = []
    for session in sessions:
        merged = dict(model_defaults.get(f"{session.model}@{session.model_version}", {}))
        merged.update(json_format.MessageToDict(session.hyperparameters.model))
        model_hyperparameters.append(merged)
    model_keys = sorted({key for merged in model_hyperparameters for key in merged})
    metric_names = sorted({name for session in sessions for epoch in session.epochs for name in epoch.metrics} - {"val_loss"})

    def hyperparameter(session, name):
        return _value(getattr(session.hyperparameters, name))

    rows: list[tuple[str, list[str]]] = [
        ("state", [state_name(s.state) for s in sessions]),
        ("model", [f"{s.model}@{s.model_version}" for s in sessions]),
        ("dataset", [f"{s.dataset}@{s.dataset_version}" for s in sessions]),
        ("device", [s.device or "-" for s in sessions]),
        ("optimizer", [hyperparameter(s, "optimizer") for s in sessions]),
        ("learning rate", [hyperparameter(s, "learning_rate") for s in sessions]),
        ("learning rate changes", [str(sum(1 for change in s.history if change.name == "learning_rate")) for s in sessions]),
        ("batch size", [hyperparameter(s, "batch_size") for s in sessions]),
        ("seed", [hyperparameter(s, "seed") for s in sessions]),
        ("monitor", [s.hyperparameters.monitor or "val_loss" for s in sessions]),
        ("early stopping patience", [hyperparameter(s, "early_stopping_patience") for s in sessions]),
    ]
    for key in model_keys:
        rows.append((f"model: {key}", [_value(merged.get(key, "-")) for merged in model_hyperparameters]))
    rows += [
        ("epochs", [f"{s.epoch}/{s.hyperparameters.epochs}" for s in sessions]),
        ("steps", [str(s.step) for s in sessions]),
        ("best val_loss", [_best(s, "val_loss") for s in sessions]),
    ]
    for name in metric_names:
        rows.append((f"best {name}", [_best(s, name) for s in sessions]))
    rows += [
        ("last train loss", [_number(s.epochs[-1].train_loss) if s.epochs else "-" for s in sessions]),
        ("best parameter set", [s.best_parameter_set_id or "-" for s in sessions]),
        ("examples/s (mean)", [
            f"{sum(e.examples_per_second for e in s.epochs) / len(s.epochs):,.0f}" if s.epochs else "-" for s in sessions
        ]),
        ("compile time (s)", [f"{s.compile_seconds:.1f}" if s.compile_seconds else "-" for s in sessions]),
        ("wall time", [_wall_time(_seconds(s, now)) for s in sessions]),
    ]
    return [
        [(DIFFERS_MARK if len(set(values)) > 1 else " ") + " " + field, *values]
        for field, values in rows
    ]
