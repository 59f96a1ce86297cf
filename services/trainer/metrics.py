"""The trainer's Prometheus exporter: every session's progress, its parameters and the devices.

Session processes send their numbers to the trainer over the ``AttachWorker`` stream, and the
session manager hands each report to :class:`TrainerMetrics`. It keeps the latest values in memory
and builds the metric families from them on each scrape. A session that ends, by itself or because its
process died, keeps its series for ``retention_s`` seconds so the last scrapes see its final state,
and then its series disappear. docs/metrics.md lists every metric.
"""

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from lasagne_engine.v1 import trainer_pb2

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_RETENTION_S", "STEP_DURATION_BUCKETS_S", "TrainerMetrics"]

PREFIX = "lasagne_engine"
SESSION_LABELS = ("session", "model", "device")
PARAMETER_LABELS = (*SESSION_LABELS, "layer", "param")
DEFAULT_RETENTION_S = 300.0
# Step times range from well under a millisecond (small networks on a CPU) to seconds (large networks).
STEP_DURATION_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
# Every state a session can be in, exported as one 0-or-1 series each.
STATE_NAMES = tuple(
    name.lower() for name, value in trainer_pb2.SessionState.items() if value != trainer_pb2.SESSION_STATE_UNSPECIFIED
)
FINAL_STATES = frozenset(
    {trainer_pb2.COMPLETED, trainer_pb2.STOPPED, trainer_pb2.EARLY_STOPPED, trainer_pb2.FAILED, trainer_pb2.INTERRUPTED}
)
# Gauges of each session with a fixed name, by the field of _SessionSeries they read.
SESSION_GAUGES = {
    "planned_epochs": ("session_planned_epochs", "Epochs the session is set to train."),
    "epoch": ("session_epoch", "Epoch the session is in, counted from 1; 0 before the first."),
    "steps_per_epoch": ("session_steps_per_epoch", "Training steps in one epoch."),
    "train_loss": ("session_train_loss", "Training loss of the latest reported step."),
    "epoch_train_loss": ("session_epoch_train_loss", "Mean training loss over the latest finished epoch."),
    "val_loss": ("session_val_loss", "Validation loss after the latest finished epoch."),
    "examples_per_second": ("session_examples_per_second", "Training examples per second in the current epoch."),
    "learning_rate": ("session_learning_rate", "Learning rate of the latest step."),
    "epoch_seconds": ("session_epoch_duration_seconds", "Wall time of the latest finished epoch, validation included."),
    "compile_seconds": ("session_compile_duration_seconds", "Time the session took to compile its functions."),
    "statistics_step": ("parameter_statistics_step", "Step at which the latest per-parameter statistics were taken."),
}
PARAMETER_GAUGES = {
    "l2_norm": ("parameter_l2_norm", "L2 norm of a parameter array."),
    "mean": ("parameter_mean", "Mean of a parameter array's elements."),
    "std": ("parameter_standard_deviation", "Standard deviation of a parameter array's elements."),
    "gradient_l2_norm": ("parameter_gradient_l2_norm", "L2 norm of the loss gradient with respect to a parameter."),
    "update_ratio": (
        "parameter_update_ratio",
        "L2 norm of a parameter's latest update divided by the parameter's L2 norm.",
    ),
}
_METRIC_NAME_INVALID = re.compile(r"[^a-zA-Z0-9_]")


@dataclasses.dataclass
class _SessionSeries:
    """The latest values of one session, as the last reports left them."""

    labels: tuple[str, str, str]
    state: int = trainer_pb2.PENDING
    planned_epochs: int = 0
    epoch: int = 0
    step: int = 0
    steps_per_epoch: int | None = None
    train_loss: float | None = None
    epoch_train_loss: float | None = None
    val_loss: float | None = None
    validation_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    examples_per_second: float | None = None
    learning_rate: float | None = None
    epoch_seconds: float | None = None
    compile_seconds: float | None = None
    statistics_step: int | None = None
    parameters: dict[str, trainer_pb2.ParameterStatistic] = dataclasses.field(default_factory=dict)
    # clock() when the session reached a final state; None while it is live.
    ended_at: float | None = None


@dataclasses.dataclass(frozen=True)
class _DeviceSeries:
    memory_budget_bytes: int
    memory_used_bytes: int
    sessions: int


def session_labels(session: trainer_pb2.Session) -> tuple[str, str, str]:
    """Return the ``session``, ``model`` and ``device`` label values of a session."""
    return session.id, session.model, session.device


def validation_metric_name(metric: str) -> str:
    """Return the Prometheus name of a validation metric, for example ``lasagne_engine_session_val_accuracy``."""
    return f"{PREFIX}_session_{_METRIC_NAME_INVALID.sub('_', metric)}"


class TrainerMetrics(Collector):
    """Exports the sessions and devices of one trainer to Prometheus.

    The session manager calls the ``session_*`` and ``devices_updated`` methods as reports arrive;
    each scrape builds the metric families from the latest values. Every method is thread-safe and
    none blocks on I/O, so the manager may call them while holding its own lock.

    Parameters
    ----------
    registry : CollectorRegistry, optional
        Where to register. Default: a new registry with the process, platform and garbage
        collector metrics of this process, so that several trainers in one process (as in the
        tests) never collide.
    retention_s : float
        Seconds a session's series stay after it ends. Default 300.
    clock : callable
        Monotonic time in seconds. Default :func:`time.monotonic`.

    Attributes
    ----------
    registry : CollectorRegistry
        The registry that the HTTP endpoint serves.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        retention_s: float = DEFAULT_RETENTION_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not retention_s >= 0:
            raise ValueError(f"retention_s={retention_s!r} must be a number of seconds, 0 or more.")
        if registry is None:
            registry = CollectorRegistry()
            prometheus_client.ProcessCollector(registry=registry)
            prometheus_client.PlatformCollector(registry=registry)
            prometheus_client.GCCollector(registry=registry)
        self.registry = registry
        self.retention_s = retention_s
        self._clock = clock

        self._lock = threading.Lock()
        self._sessions: dict[str, _SessionSeries] = {}
        self._devices: dict[str, _DeviceSeries] = {}
        # Every final state starts at 0, so increase() sees the first session that ends in it.
        self._ended_total: dict[str, int] = {trainer_pb2.SessionState.Name(state).lower(): 0 for state in FINAL_STATES}
        # Not registered on its own: collect() yields it after expiring sessions, so a scrape never
        # shows a histogram of a session whose other series are gone.
        self._step_duration = prometheus_client.Histogram(
            f"{PREFIX}_session_step_duration_seconds",
            "Wall time of one training step, from the call to the compiled function to its result.",
            labelnames=SESSION_LABELS,
            buckets=STEP_DURATION_BUCKETS_S,
            registry=None,
        )
        self._http_server = None
        self._http_thread: threading.Thread | None = None

        registry.register(self)

    # Updates from the session manager -----------------------------------------------------------

    def session_updated(self, session: trainer_pb2.Session) -> None:
        """Take a session's state, epoch, step and settings from its record.

        A final state also starts the retention time, as :meth:`session_ended` does, and a live
        state after a final one (a resumed session) stops it.
        """
        with self._lock:
            series = self._series(session)
            series.state = session.state
            series.planned_epochs = session.hyperparameters.epochs
            series.epoch = max(series.epoch, session.epoch)
            series.step = max(series.step, session.step)
            if session.steps_per_epoch:
                series.steps_per_epoch = session.steps_per_epoch
            if session.compile_seconds:
                series.compile_seconds = session.compile_seconds
            if series.learning_rate is None and session.hyperparameters.learning_rate:
                series.learning_rate = session.hyperparameters.learning_rate
            if session.state in FINAL_STATES:
                self._mark_ended(session.id, series)
            else:
                series.ended_at = None

    def session_report(self, session: trainer_pb2.Session, report: trainer_pb2.WorkerReport) -> None:
        """Apply a progress, epoch-end or parameter statistics report; ignore every other kind."""
        kind = report.WhichOneof("report")
        step_seconds: Sequence[float] = ()
        with self._lock:
            series = self._series(session)
            if kind == "progress":
                progress = report.progress
                series.epoch = progress.epoch
                series.step = progress.step
                series.train_loss = progress.train_loss
                series.examples_per_second = progress.examples_per_second
                if progress.learning_rate:
                    series.learning_rate = progress.learning_rate
                step_seconds = progress.step_seconds
            elif kind == "epoch_end":
                metrics = report.epoch_end
                series.epoch = metrics.epoch
                series.step = metrics.step
                series.epoch_train_loss = metrics.train_loss
                series.val_loss = metrics.val_loss
                series.validation_metrics.update(metrics.metrics)
                series.epoch_seconds = metrics.epoch_seconds
                if metrics.examples_per_second:
                    series.examples_per_second = metrics.examples_per_second
            elif kind == "parameter_statistics":
                statistics = report.parameter_statistics
                series.statistics_step = statistics.step
                series.parameters = {parameter.name: parameter for parameter in statistics.parameters}
            labels = series.labels

        if step_seconds:
            child = self._step_duration.labels(*labels)
            for seconds in step_seconds:
                child.observe(seconds)

    def session_ended(self, session: trainer_pb2.Session) -> None:
        """Record a session's final state; its series disappear ``retention_s`` seconds later."""
        with self._lock:
            series = self._series(session)
            series.state = session.state
            series.epoch = max(series.epoch, session.epoch)
            series.step = max(series.step, session.step)
            self._mark_ended(session.id, series)

    def devices_updated(self, devices: Sequence[trainer_pb2.Device]) -> None:
        """Replace the devices' memory budgets, memory in use and session counts."""
        with self._lock:
            self._devices = {
                device.name: _DeviceSeries(
                    memory_budget_bytes=device.memory_budget_bytes,
                    memory_used_bytes=device.memory_used_bytes,
                    sessions=len(device.session_ids),
                )
                for device in devices
            }

    def expire(self) -> None:
        """Drop the series of sessions that ended ``retention_s`` seconds ago or earlier."""
        now = self._clock()
        with self._lock:
            expired = [
                session_id
                for session_id, series in self._sessions.items()
                if series.ended_at is not None and now - series.ended_at >= self.retention_s
            ]
            for session_id in expired:
                del self._sessions[session_id]

        for session_id in expired:
            self._step_duration.remove_by_labels({"session": session_id})
            logger.debug("Removed the metrics of session %s", session_id)

    # The HTTP endpoint ------------------------------------------------------------------------

    def start_http_server(self, port: int, address: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` of :attr:`registry` over HTTP on a daemon thread; return the bound port.

        Port 0 takes a free port.

        Raises
        ------
        RuntimeError
            If this exporter already serves HTTP.
        OSError
            If the address cannot be bound, for example because another process listens there.
        """
        if self._http_server is not None:
            raise RuntimeError(
                f"The metrics endpoint already listens on port {self._http_server.server_port}; "
                "call close() before starting another."
            )
        server, thread = prometheus_client.start_http_server(port, addr=address, registry=self.registry)
        self._http_server, self._http_thread = server, thread
        bound_port = server.server_port
        logger.info("Serving Prometheus metrics on http://%s:%d/metrics", address, bound_port)
        return bound_port

    def close(self) -> None:
        """Stop the HTTP endpoint, if one runs."""
        server, thread = self._http_server, self._http_thread
        self._http_server = self._http_thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    # prometheus_client.registry.Collector ------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        # The validation metric families depend on the reports, so there is no fixed list to check
        # for duplicates at registration.
        return []

    def collect(self) -> Iterable[Metric]:
        self.expire()
        with self._lock:
            sessions = [dataclasses.replace(series, validation_metrics=dict(series.validation_metrics),
                                            parameters=dict(series.parameters))
                        for series in self._sessions.values()]
            devices = dict(self._devices)
            ended_total = dict(self._ended_total)

        yield from _trainer_families(sessions, ended_total)
        yield from _session_families(sessions)
        yield from self._step_duration.collect()
        yield from _parameter_families(sessions)
        yield from _device_families(devices)

    # Helpers, called with the lock held ----------------------------------------------------------

    def _series(self, session: trainer_pb2.Session) -> _SessionSeries:
        labels = session_labels(session)
        series = self._sessions.get(session.id)
        if series is None:
            series = self._sessions[session.id] = _SessionSeries(labels=labels, state=session.state)
        elif series.labels != labels:
            # A resumed session can move to another device, and its histogram must not keep the old labels.
            self._step_duration.remove(*series.labels)
            series.labels = labels
        return series

    def _mark_ended(self, session_id: str, series: _SessionSeries) -> None:
        if series.ended_at is not None:
            return
        series.ended_at = self._clock()
        # A session that no longer trains has no throughput. Everything else stays until it expires.
        series.examples_per_second = None
        state = trainer_pb2.SessionState.Name(series.state).lower() if series.state in FINAL_STATES else "unknown"
        self._ended_total[state] = self._ended_total.get(state, 0) + 1
        logger.debug("Session %s ended in state %s; its metrics expire in %.0f s", session_id, state, self.retention_s)


def _trainer_families(sessions: list[_SessionSeries], ended_total: dict[str, int]) -> Iterable[Metric]:
    live = GaugeMetricFamily(f"{PREFIX}_trainer_live_sessions", "Sessions of this trainer that have not ended.")
    live.add_metric([], sum(1 for series in sessions if series.ended_at is None))
    yield live

    ended = CounterMetricFamily(
        f"{PREFIX}_trainer_sessions_ended",
        "Sessions that reached a final state since the trainer started, by that state.",
        labels=["state"],
    )
    for state, count in sorted(ended_total.items()):
        ended.add_metric([state], count)
    yield ended


def _session_families(sessions: list[_SessionSeries]) -> Iterable[Metric]:
    state = GaugeMetricFamily(
        f"{PREFIX}_session_state",
        "1 for the state the session is in and 0 for every other state.",
        labels=[*SESSION_LABELS, "state"],
    )
    steps = CounterMetricFamily(f"{PREFIX}_session_steps", "Training steps taken by the session.", labels=SESSION_LABELS)
    for series in sessions:
        current = trainer_pb2.SessionState.Name(series.state).lower() if series.state else ""
        for name in STATE_NAMES:
            state.add_metric([*series.labels, name], 1.0 if name == current else 0.0)
        steps.add_metric(list(series.labels), series.step)
    yield state
    yield steps

    for field_name, (name, documentation) in SESSION_GAUGES.items():
        family = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=SESSION_LABELS)
        for series in sessions:
            value = getattr(series, field_name)
            if value is not None:
                family.add_metric(list(series.labels), value)
        yield family

    fixed_names = {f"{PREFIX}_{name}" for name, _ in SESSION_GAUGES.values()}
    by_metric: dict[str, GaugeMetricFamily] = {}
    for series in sessions:
        for metric, value in sorted(series.validation_metrics.items()):
            name = validation_metric_name(metric)
            if name in fixed_names:
                continue
            family = by_metric.get(name)
            if family is None:
                family = by_metric[name] = GaugeMetricFamily(
                    name, f"Validation metric {metric} after the latest finished epoch.", labels=SESSION_LABELS
                )
            family.add_metric(list(series.labels), value)
    yield from by_metric.values()


def _parameter_families(sessions: list[_SessionSeries]) -> Iterable[Metric]:
    for field_name, (name, documentation) in PARAMETER_GAUGES.items():
        family = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=PARAMETER_LABELS)
        for series in sessions:
            for parameter in series.parameters.values():
                family.add_metric([*series.labels, parameter.layer, parameter.name], getattr(parameter, field_name))
        yield family


def _device_families(devices: dict[str, _DeviceSeries]) -> Iterable[Metric]:
    budget = GaugeMetricFamily(
        f"{PREFIX}_device_memory_budget_bytes", "Memory the trainer may place sessions in on a device.", labels=["device"]
    )
    used = GaugeMetricFamily(
        f"{PREFIX}_device_memory_used_bytes", "Memory in use on a device, as the trainer's device list reports it.",
        labels=["device"],
    )
    sessions = GaugeMetricFamily(f"{PREFIX}_device_sessions", "Sessions placed on a device.", labels=["device"])
    for name, device in sorted(devices.items()):
        budget.add_metric([name], device.memory_budget_bytes)
        used.add_metric([name], device.memory_used_bytes)
        sessions.add_metric([name], device.sessions)
    yield budget
    yield used
    yield sessions
