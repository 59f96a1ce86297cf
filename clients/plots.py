"""Pictures of sessions and parameter sets, drawn with matplotlib (the ``plot`` extra).

:func:`plot_sessions` draws the loss and validation metric curves of sessions side by side, and
:func:`plot_parameter_histograms` draws a histogram of each weight array of a parameter set, or
of the difference between two sets. Both write a file whose format follows its extension.
"""

import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from lasagne_engine.v1 import trainer_pb2

__all__ = [
    "MissingMatplotlib",
    "parameter_histogram_figure",
    "plot_parameter_histograms",
    "plot_sessions",
    "session_figure",
    "weight_array_names",
]

PANEL_WIDTH_IN = 5.0
PANEL_HEIGHT_IN = 3.6
HISTOGRAM_WIDTH_IN = 6.0
HISTOGRAM_COLUMNS = 4
# Roles of the arrays drawn by plot-params; an empty role is a set saved without roles.
WEIGHT_ROLES = ("trainable", "")


class MissingMatplotlib(RuntimeError):
    """matplotlib is not installed."""


def _figure(columns: int, rows: int, *, panel_width_in: float = PANEL_WIDTH_IN):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MissingMatplotlib(
            "Plotting needs matplotlib, which is not installed; install it with "
            "pip install 'lasagne-engine[plot]'."
        ) from error
    figure = Figure(figsize=(panel_width_in * columns, PANEL_HEIGHT_IN * rows), layout="constrained")
    return figure, figure.subplots(rows, columns, squeeze=False)


def _session_label(session: trainer_pb2.Session) -> str:
    label = f"{session.id} ({session.model}@{session.model_version})"
    return f"{label} {session.description}" if session.description else label


def _best_epoch(session: trainer_pb2.Session) -> trainer_pb2.EpochMetrics | None:
    for epoch in session.epochs:
        if session.best_parameter_set_id and epoch.parameter_set_id == session.best_parameter_set_id:
            return epoch
    return None


def _monitored_point(
    epoch: trainer_pb2.EpochMetrics, monitor: str, metric_names: list[str]
) -> tuple[int, float] | None:
    """Return the panel and value of the monitored metric at ``epoch``, or None if it is not drawn."""
    if monitor == "val_loss":
        return 0, epoch.val_loss
    if monitor == "train_loss":
        return 0, epoch.train_loss
    if monitor in metric_names and monitor in epoch.metrics:
        return 1 + metric_names.index(monitor), epoch.metrics[monitor]
    return None


def plot_sessions(sessions: Sequence[trainer_pb2.Session], out: pathlib.Path) -> list[str]:
    """Write :func:`session_figure` of ``sessions`` to ``out``; return the quantities drawn.

    Raises
    ------
    ValueError
        If no session has finished an epoch.
    MissingMatplotlib
        If matplotlib is not installed.
    OSError
        If ``out`` cannot be written.
    """
    figure = session_figure(sessions)
    figure.savefig(out)
    return [panel.get_ylabel() for panel in figure.axes if panel.get_visible()]


def session_figure(sessions: Sequence[trainer_pb2.Session]):
    """Draw the training and validation loss and each validation metric of sessions, per epoch.

    One panel per quantity, side by side: the losses first (training solid, validation dashed),
    then every validation metric any of the sessions reports. Each session has one colour in
    every panel, and a star marks the epoch of its ``best`` parameter set on the panel of its
    monitored metric.

    Returns
    -------
    matplotlib.figure.Figure
        One row of panels, whose y-axis labels name the quantities: ``loss``, then the metrics.

    Raises
    ------
    ValueError
        If no session has finished an epoch.
    MissingMatplotlib
        If matplotlib is not installed.
    """
    drawn = [session for session in sessions if session.epochs]
    if not drawn:
        names = ", ".join(session.id for session in sessions)
        raise ValueError(f"No finished epoch to plot in session {names}; plot again after the first epoch ends.")
    metric_names = sorted({name for session in drawn for epoch in session.epochs for name in epoch.metrics} - {"val_loss"})
    panels = ["loss", *metric_names]

    figure, axes = _figure(len(panels), 1)
    cycle = [f"C{index % 10}" for index in range(len(drawn))]
    for session, colour in zip(drawn, cycle):
        epochs = [epoch.epoch for epoch in session.epochs]
        label = _session_label(session)
        loss_axes = axes[0][0]
        loss_axes.plot(epochs, [e.train_loss for e in session.epochs], color=colour, marker=".", label=f"{label} train")
        loss_axes.plot(epochs, [e.val_loss for e in session.epochs], color=colour, marker=".", linestyle="--",
                       label=f"{label} validation")
        for position, name in enumerate(metric_names, start=1):
            points = [(e.epoch, e.metrics[name]) for e in session.epochs if name in e.metrics]
            if points:
                axes[0][position].plot(*zip(*points), color=colour, marker=".", label=label)

        best = _best_epoch(session)
        monitor = session.hyperparameters.monitor or "val_loss"
        if best is not None:
            star = _monitored_point(best, monitor, metric_names)
            if star is not None:
                position, value = star
                axes[0][position].plot([best.epoch], [value], color=colour, marker="*", markersize=14, linestyle="none")

    for position, name in enumerate(panels):
        panel = axes[0][position]
        panel.set_title("loss (train solid, validation dashed)" if name == "loss" else name)
        panel.set_xlabel("epoch")
        panel.set_ylabel(name)
        panel.grid(True, alpha=0.3)
        panel.xaxis.get_major_locator().set_params(integer=True)
        panel.legend(fontsize="small")
    figure.suptitle("Sessions " + ", ".join(session.id for session in drawn) + " (star: best parameter set)")
    return figure


def weight_array_names(roles: Mapping[str, str]) -> list[str]:
    """Return the names of the arrays ``plot-params`` draws: trainable ones, or those with no role."""
    return [name for name, role in roles.items() if role in WEIGHT_ROLES]


def _l2_norm(values: np.ndarray) -> float:
    return math.sqrt(float(np.sum(values * values)))


def _describe(values: np.ndarray) -> str:
    return f"mean {values.mean():.3g}, std {values.std():.3g}, L2 {_l2_norm(values):.3g}, n {values.size:,}"


def plot_parameter_histograms(
    arrays: Mapping[str, np.ndarray],
    out: pathlib.Path,
    *,
    title: str,
    baseline: Mapping[str, np.ndarray] | None = None,
    bins: int = 60,
) -> list[str]:
    """Write :func:`parameter_histogram_figure` to ``out``; return the names of the arrays drawn.

    Raises
    ------
    ValueError
        As :func:`parameter_histogram_figure`.
    MissingMatplotlib
        If matplotlib is not installed.
    OSError
        If ``out`` cannot be written.
    """
    figure = parameter_histogram_figure(arrays, title=title, baseline=baseline, bins=bins)
    figure.savefig(out)
    return list(arrays)


def parameter_histogram_figure(
    arrays: Mapping[str, np.ndarray],
    *,
    title: str,
    baseline: Mapping[str, np.ndarray] | None = None,
    bins: int = 60,
):
    """Draw a histogram of the elements of each array, or of its change from ``baseline``.

    With ``baseline``, each panel shows ``arrays[name] - baseline[name]`` and notes the L2 norm
    of the change relative to the baseline's.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per array, in the order of ``arrays``, four to a row.

    Raises
    ------
    ValueError
        If ``arrays`` is empty, ``bins`` is below 1, or ``baseline`` lacks an array or has one of
        another shape.
    MissingMatplotlib
        If matplotlib is not installed.
    """
    if not arrays:
        raise ValueError("There are no weight arrays to draw.")
    if bins < 1:
        raise ValueError(f"bins={bins} must be at least 1.")
    names = list(arrays)
    if baseline is not None:
        missing = [name for name in names if name not in baseline]
        if missing:
            raise ValueError(
                f"The first parameter set has no array {', '.join(map(repr, missing))}, so the difference "
                "cannot be drawn; compare parameter sets of the same model."
            )
        for name in names:
            if np.shape(arrays[name]) != np.shape(baseline[name]):
                raise ValueError(
                    f"Array {name!r} has shape {np.shape(baseline[name])} in the first parameter set and "
                    f"{np.shape(arrays[name])} in the second, so the difference cannot be drawn."
                )

    columns = min(HISTOGRAM_COLUMNS, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = _figure(columns, rows, panel_width_in=HISTOGRAM_WIDTH_IN)
    for index, name in enumerate(names):
        panel = axes[index // columns][index % columns]
        values = np.asarray(arrays[name], dtype=np.float64).ravel()
        shape = "x".join(map(str, np.shape(arrays[name]))) or "scalar"
        if baseline is None:
            panel.hist(values, bins=bins, color="C0")
            panel.set_title(f"{name} ({shape})\n{_describe(values)}", fontsize="medium")
            panel.set_xlabel("value")
        else:
            before = np.asarray(baseline[name], dtype=np.float64).ravel()
            change = values - before
            panel.hist(change, bins=bins, color="C1")
            before_norm = _l2_norm(before)
            relative = f"{_l2_norm(change) / before_norm:.3g}" if before_norm > 0 else "n/a"
            panel.set_title(
                f"{name} ({shape}), second - first\n{_describe(change)}\nL2 of change / L2 of first: {relative}",
                fontsize="medium",
            )
            panel.set_xlabel("change")
        panel.set_ylabel("elements")
        panel.grid(True, alpha=0.3)
    for index in range(len(names), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    figure.suptitle(title)
    return figure
