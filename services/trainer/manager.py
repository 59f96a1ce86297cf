"""Session lifecycle: validation, launch, reports from session processes, watchers, recovery.

Lock order: ``SessionManager._lock`` guards every live session's record and subscriber list.
Events are published to subscriber queues while holding it, and nothing that blocks runs under it.
"""

import hmac
import logging
import pathlib
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from lasagne_engine import errors
from lasagne_engine.timeutil import to_timestamp
from lasagne_engine.trainer.devices import backend_for
from lasagne_engine.trainer.launcher import LaunchRequest, LocalLauncher, LocalProcess, describe_exit
from lasagne_engine.trainer.store import FINAL_STATES, LIVE_STATES, SessionStore
from lasagne_engine.trainer.training import OPTIMIZERS
from lasagne_engine.trainer.worker import DEFAULT_ARRAY_NAMES
from lasagne_engine.v1 import trainer_pb2

logger = logging.getLogger(__name__)

DEFAULT_HYPERPARAMETERS = {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 32, "epochs": 10}
MONITORS = ("val_loss", "val_accuracy", "val_mse", "train_loss")
MAX_EPOCHS = 1_000_000
MAX_BATCH_SIZE = 1 << 24
WATCH_POLL_S = 1.0


@dataclass
class LiveSession:
    """The manager's record, specification and command queue for a session with a process."""

    record: trainer_pb2.Session
    spec: trainer_pb2.SessionSpec
    token: str
    commands: queue.Queue = field(default_factory=queue.Queue)
    process: LocalProcess | None = None
    attached: bool = False
    stop_requested: bool = False


def _client_error_to_domain(error: Exception) -> errors.EngineError:
    """Turn an SDK error from a call to the registry or data service into a domain error."""
    code = getattr(error, "code", None)
    for error_type in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.AlreadyExists,
        errors.FailedPrecondition,
        errors.ResourceExhausted,
        errors.Unavailable,
    ):
        if code == error_type.code:
            return error_type(str(error))
    return errors.Unavailable(f"A call to another service failed: {error}")


class SessionManager:
    """Starts, tracks and stops the sessions of one trainer.

    Parameters
    ----------
    root : pathlib.Path
        The trainer's folder: its SQLite database and one working folder per session.
    registry_address, data_address : str
        Where session processes and the manager reach the other services.
    trainer_address : str
        Where session processes attach back to this trainer.
    launcher : LocalLauncher
        Starts session processes.
    devices : list of str
        Devices to place sessions on, such as ``["gpu:0", "gpu:1"]`` or ``["cpu:0"]``.
    backend : str
        ``auto``, ``default`` or ``jax``; see :func:`backend_for`. Default ``auto``.
    """

    def __init__(
        self,
        root: pathlib.Path,
        *,
        registry_address: str,
        data_address: str,
        trainer_address: str,
        launcher: LocalLauncher,
        devices: list[str],
        backend: str = "auto",
    ):
        from lasagne_engine.client import Engine

        self.root = root
        self.registry_address = registry_address
        self.data_address = data_address
        self.trainer_address = trainer_address
        self.launcher = launcher
        self.devices = list(devices)
        self.backend = backend
        backend_for(self.devices[0], backend)  # rejects an unknown backend setting now, not at the first session
        self._engine = Engine(registry_address=registry_address, data_address=data_address)
        self._store = SessionStore(root / "sessions.sqlite3")
        self._lock = threading.Lock()
        self._records: dict[str, trainer_pb2.Session] = {}
        self._live: dict[str, LiveSession] = {}
        self._subscribers: dict[str, list[queue.Queue]] = {}
        self._closed = False
        self._recover()

    def _recover(self) -> None:
        for record in self._store.all():
            if record.state in LIVE_STATES:
                previous = trainer_pb2.SessionState.Name(record.state).lower()
                record.state = trainer_pb2.INTERRUPTED
                record.error = f"The trainer stopped while the session was {previous}."
                record.finished_at.CopyFrom(to_timestamp(time.time()))
                self._store.put(record)
                logger.warning("Session %s was %s when the trainer stopped; marked interrupted", record.id, previous)
            self._records[record.id] = record

    # Starting ------------------------------------------------------------------------------

    def _hyperparameters(self, given: trainer_pb2.Hyperparameters) -> trainer_pb2.Hyperparameters:
        resolved = trainer_pb2.Hyperparameters()
        resolved.CopyFrom(given)
        resolved.optimizer = given.optimizer or DEFAULT_HYPERPARAMETERS["optimizer"]
        resolved.learning_rate = given.learning_rate or DEFAULT_HYPERPARAMETERS["learning_rate"]
        resolved.batch_size = given.batch_size or DEFAULT_HYPERPARAMETERS["batch_size"]
        resolved.epochs = given.epochs or DEFAULT_HYPERPARAMETERS["epochs"]
        resolved.monitor = given.monitor or "val_loss"
        if resolved.optimizer not in OPTIMIZERS:
            raise errors.InvalidArgument(
                f"Unknown optimizer {resolved.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}."
            )
        if not resolved.learning_rate > 0 or resolved.learning_rate == float("inf"):
            raise errors.InvalidArgument(f"learning_rate {resolved.learning_rate!r} must be a positive finite number.")
        if not 1 <= resolved.batch_size <= MAX_BATCH_SIZE:
            raise errors.InvalidArgument(f"batch_size {resolved.batch_size} must lie in 1..{MAX_BATCH_SIZE}.")
        if not 1 <= resolved.epochs <= MAX_EPOCHS:
            raise errors.InvalidArgument(f"epochs {resolved.epochs} must lie in 1..{MAX_EPOCHS}.")
        if resolved.monitor not in MONITORS:
            raise errors.InvalidArgument(f"Unknown monitor {resolved.monitor!r}; choose one of {', '.join(MONITORS)}.")
        return resolved

    def _pick_device(self) -> str:
        # NOTE: sessions share devices here, the least loaded first; nothing queues yet and no
        # memory budget is checked.
        load = {device: 0 for device in self.devices}
        for live in self._live.values():
            load[live.record.device] = load.get(live.record.device, 0) + 1
        return min(self.devices, key=lambda device: (load[device], self.devices.index(device)))

    def start(self, request: trainer_pb2.StartSessionRequest) -> trainer_pb2.Session:
        """Validate the request, record a PENDING session and launch its process.

        Raises
        ------
        InvalidArgument
            For a bad hyperparameter or reference.
        NotFound
            If the model, dataset, one of its arrays or the initial parameter set does not exist.
        """
        if self._closed:
            raise errors.Unavailable("The trainer is shutting down; start the session on another trainer.")
        if not request.model:
            raise errors.InvalidArgument("No model given; name a registered model as 'name' or 'name@version'.")
        if not request.dataset:
            raise errors.InvalidArgument("No dataset given; name an uploaded dataset as 'name' or 'name@version'.")
        hyperparameters = self._hyperparameters(request.hyperparameters)
        try:
            model = self._engine.get_model(request.model)
            dataset = self._engine.describe_dataset(request.dataset)
            if request.init_parameter_set:
                self._engine.get_parameter_set(request.init_parameter_set)
        except Exception as error:
            if hasattr(error, "code"):
                raise _client_error_to_domain(error) from error
            raise
        array_names = {header.name for header in dataset.arrays}
        for key, default in DEFAULT_ARRAY_NAMES.items():
            name = getattr(request, key) or default
            if name not in array_names:
                raise errors.NotFound(
                    f"Dataset '{dataset.name}@{dataset.version}' has no array {name!r} for {key}; it has "
                    f"{', '.join(sorted(array_names))}. Name the arrays with --{key.replace('_', '-')}."
                )

        session_id = f"s-{uuid.uuid4().hex[:12]}"
        record = trainer_pb2.Session(
            id=session_id,
            model=model.name,
            model_version=model.version,
            dataset=dataset.name,
            dataset_version=dataset.version,
            hyperparameters=hyperparameters,
            state=trainer_pb2.PENDING,
            created_at=to_timestamp(time.time()),
            description=request.description,
        )
        with self._lock:
            device = self._pick_device()
            record.device = device
            record.backend = backend_for(device, self.backend)
            spec = trainer_pb2.SessionSpec(
                session_id=session_id,
                model=model.name,
                model_version=model.version,
                dataset=dataset.name,
                dataset_version=dataset.version,
                hyperparameters=hyperparameters,
                train_inputs=request.train_inputs,
                train_targets=request.train_targets,
                val_inputs=request.val_inputs,
                val_targets=request.val_targets,
                init_parameter_set=request.init_parameter_set,
                registry_address=self.registry_address,
                data_address=self.data_address,
                device=device,
                backend=record.backend,
            )
            live = LiveSession(record=record, spec=spec, token=secrets.token_hex(16))
            self._records[session_id] = record
            self._live[session_id] = live
            self._store.put(record)
        logger.info("Session %s created: model %s@%d, dataset %s@%d, device %s",
                    session_id, model.name, model.version, dataset.name, dataset.version, device)

        launch = LaunchRequest(
            session_id=session_id,
            token=live.token,
            trainer_address=self.trainer_address,
            device=record.device,
            backend=record.backend,
            working_dir=self.root / "sessions" / session_id,
        )
        try:
            process = self.launcher.launch(launch, lambda code, tail: self._process_exited(session_id, code, tail))
        except OSError as error:
            logger.error("Session %s could not be started: %s", session_id, error)
            self._finish(session_id, trainer_pb2.FAILED, f"The session process could not be started: {error}")
            raise errors.Unavailable(f"Could not start the process of session {session_id}: {error}") from error
        with self._lock:
            live.process = process
            record.pid = process.pid
            return self._copy(record)

    # Reports from session processes --------------------------------------------------------

    def attach(self, hello: trainer_pb2.WorkerHello) -> LiveSession:
        """Accept a session process's hello; return its live session.

        Raises
        ------
        NotFound
            If no live session has the id.
        PermissionDenied
            If the token is not the one the session was launched with.
        """
        with self._lock:
            live = self._live.get(hello.session_id)
            if live is None:
                raise errors.NotFound(f"No live session {hello.session_id!r} to attach to.")
            if not hmac.compare_digest(live.token, hello.token):
                raise errors.PermissionDenied(f"Wrong token for session {hello.session_id!r}.")
            if live.attached:
                raise errors.FailedPrecondition(f"Session {hello.session_id!r} already has a process attached.")
            live.attached = True
            if live.stop_requested:
                live.commands.put(trainer_pb2.WorkerCommand(stop=True))
        logger.info("Session %s attached from process %d", hello.session_id, hello.pid)
        return live

    def detach(self, session_id: str) -> None:
        with self._lock:
            live = self._live.get(session_id)
            if live is not None:
                live.attached = False
                live.commands.put(None)

    def report(self, session_id: str, report: trainer_pb2.WorkerReport) -> None:
        """Apply one report from a session process to its record and publish it to watchers."""
        kind = report.WhichOneof("report")
        with self._lock:
            record = self._records[session_id]
            if record.state in FINAL_STATES:
                return
            if kind == "state":
                change = report.state
                record.state = change.state
                if change.error:
                    record.error = change.error
                if change.compile_seconds:
                    record.compile_seconds = change.compile_seconds
                if change.steps_per_epoch:
                    record.steps_per_epoch = change.steps_per_epoch
                if change.backend:
                    record.backend = change.backend
                if change.state == trainer_pb2.RUNNING and not record.HasField("started_at"):
                    record.started_at.CopyFrom(to_timestamp(time.time()))
                if change.state in FINAL_STATES:
                    record.finished_at.CopyFrom(to_timestamp(time.time()))
                self._store.put(record)
                self._publish(session_id, trainer_pb2.SessionEvent(state=change.state))
                logger.info("Session %s is %s", session_id, trainer_pb2.SessionState.Name(change.state).lower())
            elif kind == "progress":
                record.epoch = report.progress.epoch
                record.step = report.progress.step
                self._publish(session_id, trainer_pb2.SessionEvent(progress=report.progress))
            elif kind == "epoch_end":
                metrics = report.epoch_end
                record.epochs.append(metrics)
                record.epoch = metrics.epoch
                record.step = metrics.step
                record.last_parameter_set_id = metrics.parameter_set_id
                self._store.put(record)
                self._publish(session_id, trainer_pb2.SessionEvent(epoch_end=metrics))
                logger.info("Session %s finished epoch %d: train loss %.4f, validation loss %.4f",
                            session_id, metrics.epoch, metrics.train_loss, metrics.val_loss)
            elif kind == "best_parameter_set_id":
                record.best_parameter_set_id = report.best_parameter_set_id
                self._store.put(record)

    def _process_exited(self, session_id: str, returncode: int, stderr_tail: str) -> None:
        with self._lock:
            record = self._records[session_id]
            live = self._live.pop(session_id, None)
            if live is not None:
                live.commands.put(None)
            if record.state in FINAL_STATES:
                logger.info("Session %s process ended with %s", session_id, describe_exit(returncode))
                return
        if self._closed:
            self._finish(session_id, trainer_pb2.INTERRUPTED, "The trainer stopped while the session was running.")
            return
        tail = "\n".join(stderr_tail.strip().splitlines()[-20:])
        message = f"The session process ended with {describe_exit(returncode)} before the session finished."
        if tail:
            message += f" Last lines of its output:\n{tail}"
        logger.error("Session %s failed: process ended with %s", session_id, describe_exit(returncode))
        self._finish(session_id, trainer_pb2.FAILED, message)

    def _finish(self, session_id: str, state: int, error: str = "") -> None:
        with self._lock:
            record = self._records[session_id]
            record.state = state
            if error:
                record.error = error
            record.finished_at.CopyFrom(to_timestamp(time.time()))
            self._live.pop(session_id, None)
            self._store.put(record)
            self._publish(session_id, trainer_pb2.SessionEvent(state=state))

    # Queries and control -------------------------------------------------------------------

    @staticmethod
    def _copy(record: trainer_pb2.Session) -> trainer_pb2.Session:
        copy = trainer_pb2.Session()
        copy.CopyFrom(record)
        return copy

    def _get_record(self, session_id: str) -> trainer_pb2.Session:
        record = self._records.get(session_id)
        if record is None:
            raise errors.NotFound(f"No session {session_id!r}; list sessions with 'lasagne-engine sessions'.")
        return record

    def get(self, session_id: str) -> trainer_pb2.Session:
        with self._lock:
            return self._copy(self._get_record(session_id))

    def list(self, states: list[int]) -> list[trainer_pb2.Session]:
        with self._lock:
            records = [self._copy(record) for record in self._records.values() if not states or record.state in states]
        return sorted(records, key=lambda record: (record.created_at.ToNanoseconds(), record.id))

    def stop(self, session_id: str) -> trainer_pb2.Session:
        """Ask a live session to save a final parameter set and stop.

        Raises
        ------
        NotFound
            If there is no such session.
        FailedPrecondition
            If the session has already finished.
        """
        with self._lock:
            record = self._get_record(session_id)
            live = self._live.get(session_id)
            if record.state in FINAL_STATES or live is None:
                raise errors.FailedPrecondition(
                    f"Session {session_id!r} is already {trainer_pb2.SessionState.Name(record.state).lower()}; "
                    "only a live session can be stopped."
                )
            live.stop_requested = True
            if live.attached:
                live.commands.put(trainer_pb2.WorkerCommand(stop=True))
            logger.info("Stop requested for session %s", session_id)
            return self._copy(record)

    def _publish(self, session_id: str, event: trainer_pb2.SessionEvent) -> None:
        for subscriber in self._subscribers.get(session_id, []):
            subscriber.put(event)

    def watch(self, session_id: str, is_active=lambda: True) -> Iterator[trainer_pb2.SessionEvent]:
        """Yield a snapshot of the session, then its events until it reaches a final state."""
        events: queue.Queue = queue.Queue()
        with self._lock:
            record = self._get_record(session_id)
            snapshot = self._copy(record)
            self._subscribers.setdefault(session_id, []).append(events)
        try:
            yield trainer_pb2.SessionEvent(snapshot=snapshot)
            if snapshot.state in FINAL_STATES:
                return
            while is_active():
                try:
                    event = events.get(timeout=WATCH_POLL_S)
                except queue.Empty:
                    continue
                yield event
                if event.WhichOneof("event") == "state" and event.state in FINAL_STATES:
                    return
        finally:
            with self._lock:
                self._subscribers[session_id].remove(events)

    def close(self, timeout_s: float = 10.0) -> None:
        """Terminate every session process and mark its session interrupted."""
        self._closed = True
        with self._lock:
            live_sessions = list(self._live.items())
        for session_id, live in live_sessions:
            if live.process is not None:
                logger.info("Terminating session %s (process %d)", session_id, live.process.pid)
                live.process.terminate()
        deadline = time.monotonic() + timeout_s
        for session_id, live in live_sessions:
            if live.process is not None:
                live.process.join(max(0.0, deadline - time.monotonic()))
                live.process.kill()
            with self._lock:
                record = self._records[session_id]
                final = record.state in FINAL_STATES
            if not final:
                self._finish(session_id, trainer_pb2.INTERRUPTED, "The trainer stopped while the session was running.")
        self._engine.close()
        self._store.close()
