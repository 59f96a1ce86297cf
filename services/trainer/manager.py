"""Session lifecycle: validation, launch, reports from session processes, watchers, recovery.

Lock order: ``SessionManager._lock`` guards every live session's record and subscriber list.
Events are published to subscriber queues while holding it, and nothing that blocks runs under it.
"""

import hmac
import itertools
import logging
import math
import pathlib
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from lasagne_engine import errors
from lasagne_engine.arrays import canonical_dtype
from lasagne_engine.timeutil import to_timestamp
from lasagne_engine.trainer.devices import DeviceInfo, backend_for, estimate_session_bytes
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
# How long CheckpointSession and UpdateHyperparameters wait for the session process to confirm.
CONTROL_TIMEOUT_S = 120.0
# Session states in which a process is attached and taking steps or waiting between them.
CONTROLLABLE_STATES = frozenset({trainer_pb2.RUNNING, trainer_pb2.PAUSED})
RESUMABLE_STATES = frozenset({trainer_pb2.SUSPENDED, trainer_pb2.INTERRUPTED})
# How long ResumeSession waits for a suspended session's process to exit.
SUSPEND_EXIT_TIMEOUT_S = 30.0
# How long a restarted trainer lets a session process of its previous run checkpoint and exit
# before it kills the process. Such a process checkpoints as soon as it loses its trainer.
ORPHAN_EXIT_TIMEOUT_S = 30.0
# How long ResumeSession waits for that recovery, which ends in ORPHAN_EXIT_TIMEOUT_S plus a few
# registry calls.
RECOVERY_TIMEOUT_S = ORPHAN_EXIT_TIMEOUT_S + 60.0


@dataclass
class PendingReply:
    """A command waiting for the session process to confirm it."""

    done: threading.Event = field(default_factory=threading.Event)
    reply: trainer_pb2.WorkerReport | None = None


@dataclass
class LiveSession:
    """The manager's record, specification and command queue for a session that is queued or has a process."""

    record: trainer_pb2.Session
    spec: trainer_pb2.SessionSpec
    token: str
    estimated_bytes: int
    requested_device: str = ""
    commands: queue.Queue = field(default_factory=queue.Queue)
    process: LocalProcess | None = None
    attached: bool = False
    stop_requested: bool = False
    pending: dict[int, PendingReply] = field(default_factory=dict)


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
    """Starts, queues, controls and tracks the sessions of one trainer.

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
    devices : list of DeviceInfo
        Devices to place sessions on, one session per device at a time.
    backend : str
        ``auto``, ``default`` or ``jax``; see :func:`backend_for`. Default ``auto``.
    metrics : TrainerMetrics or None
        Receives every session update and report, for the Prometheus exporter.
    statistics_every_steps : int
        Default cadence of per-parameter statistics. Default 50.
    """

    def __init__(
        self,
        root: pathlib.Path,
        *,
        registry_address: str,
        data_address: str,
        trainer_address: str,
        launcher: LocalLauncher,
        devices: list[DeviceInfo],
        backend: str = "auto",
        metrics=None,
        statistics_every_steps: int = 50,
    ):
        from lasagne_engine.client import Engine

        if not devices:
            raise ValueError("The trainer needs at least one device.")
        self.root = root
        self.registry_address = registry_address
        self.data_address = data_address
        self.trainer_address = trainer_address
        self.launcher = launcher
        self.devices = {device.name: device for device in devices}
        self.backend = backend
        self.metrics = metrics
        self.statistics_every_steps = statistics_every_steps
        backend_for(devices[0].name, backend)  # rejects an unknown backend setting now, not at the first session
        self._engine = Engine(registry_address=registry_address, data_address=data_address)
        self._store = SessionStore(root / "sessions.sqlite3")
        self._lock = threading.Lock()
        self._records: dict[str, trainer_pb2.Session] = {}
        self._live: dict[str, LiveSession] = {}
        self._queue: list[str] = []
        self._occupant: dict[str, str] = {}
        self._subscribers: dict[str, list[queue.Queue]] = {}
        self._metric_subscribers: list[tuple[frozenset[str], queue.Queue]] = []
        self._request_ids = itertools.count(1)
        self._closed = False
        # Set once the sessions of the previous run are settled; nothing is placed before that.
        self._recovered = threading.Event()
        self._recover()
        self._devices_changed()

    def _recover(self) -> None:
        """Mark the sessions the previous run left live as interrupted, then settle them in the background."""
        interrupted = []
        for record in self._store.all():
            if record.state in LIVE_STATES:
                previous = trainer_pb2.SessionState.Name(record.state).lower()
                record.state = trainer_pb2.INTERRUPTED
                record.error = (
                    f"The trainer stopped while the session was {previous}. "
                    f"Resume it with 'lasagne-engine resume {record.id}'."
                )
                record.queue_position = 0
                record.finished_at.CopyFrom(to_timestamp(time.time()))
                self._store.put(record)
                logger.warning("Session %s was %s when the trainer stopped; marked interrupted", record.id, previous)
                interrupted.append((record.id, record.pid))
            self._records[record.id] = record
        if not interrupted:
            self._recovered.set()
            return
        threading.Thread(
            target=self._settle_interrupted, args=(interrupted,), name="trainer-recovery", daemon=True
        ).start()

    def _settle_interrupted(self, interrupted: list[tuple[str, int]]) -> None:
        """End the session processes the previous run left behind and record their last checkpoints.

        A process whose trainer died checkpoints and exits by itself, but one still loading or
        compiling would hold its device for a while, so each gets ``ORPHAN_EXIT_TIMEOUT_S`` and
        is then killed. Its checkpoint never reached the old trainer, so the registry's listing
        shows which parameter set is the session's latest. The holds of these sessions are released,
        since nothing runs on them until they are resumed.
        """
        try:
            for session_id, pid in interrupted:
                if pid > 0:
                    self.launcher.end_orphan(session_id, pid, ORPHAN_EXIT_TIMEOUT_S)
                self._record_latest_parameter_set(session_id)
                self._release_holds(session_id)
        except Exception:  # noqa: BLE001 - recovery must not keep the trainer from placing sessions
            logger.exception("Recovering the sessions of the previous trainer run failed")
        finally:
            self._recovered.set()
            logger.info("Recovered %d interrupted sessions", len(interrupted))
        self._schedule()

    def _record_latest_parameter_set(self, session_id: str) -> None:
        try:
            saved = self._engine.list_parameter_sets(session_id=session_id)
        except Exception as error:  # noqa: BLE001 - resuming then starts from the last set the record names
            logger.warning("Session %s: could not list its parameter sets to find its last checkpoint: %s",
                           session_id, error)
            return
        if not saved:
            return
        latest = max(saved, key=lambda parameter_set: parameter_set.step)
        with self._lock:
            record = self._records[session_id]
            if latest.id != record.last_parameter_set_id and latest.step >= record.step:
                logger.info("Session %s: its last checkpoint is parameter set %s at step %d",
                            session_id, latest.id, latest.step)
                record.last_parameter_set_id = latest.id
                record.step = latest.step
                self._store.put(record)

    # Starting ------------------------------------------------------------------------------

    def _hyperparameters(
        self, given: trainer_pb2.Hyperparameters, inherited: trainer_pb2.Hyperparameters | None = None
    ) -> trainer_pb2.Hyperparameters:
        """Resolve a request's hyperparameters: given fields, then ``inherited`` ones, then defaults.

        A field counts as given when it is set: present for the numeric fields that track
        presence, and non-empty or non-zero for the others.

        Raises
        ------
        InvalidArgument
            For an unknown optimizer or monitor, or a value out of range, an explicit 0 included.
        """
        resolved = trainer_pb2.Hyperparameters()
        if inherited is not None:
            resolved.CopyFrom(inherited)
        for field, value in given.ListFields():
            if field.message_type is not None:
                if value.ByteSize():  # an empty model Struct gives nothing
                    getattr(resolved, field.name).CopyFrom(value)
            else:
                setattr(resolved, field.name, value)
        for name, default in DEFAULT_HYPERPARAMETERS.items():
            if name == "optimizer":
                resolved.optimizer = resolved.optimizer or default
            elif not resolved.HasField(name):
                setattr(resolved, name, default)
        resolved.monitor = resolved.monitor or "val_loss"
        resolved.statistics_every_steps = resolved.statistics_every_steps or self.statistics_every_steps
        if resolved.optimizer not in OPTIMIZERS:
            raise errors.InvalidArgument(
                f"Unknown optimizer {resolved.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}."
            )
        _check_learning_rate(resolved.learning_rate)
        if not 1 <= resolved.batch_size <= MAX_BATCH_SIZE:
            raise errors.InvalidArgument(f"batch_size {resolved.batch_size} must lie in 1..{MAX_BATCH_SIZE}.")
        if not 1 <= resolved.epochs <= MAX_EPOCHS:
            raise errors.InvalidArgument(f"epochs {resolved.epochs} must lie in 1..{MAX_EPOCHS}.")
        if resolved.monitor not in MONITORS:
            raise errors.InvalidArgument(f"Unknown monitor {resolved.monitor!r}; choose one of {', '.join(MONITORS)}.")
        for name in ("early_stopping_patience", "keep_best", "keep_latest"):
            if getattr(resolved, name) < 0:
                raise errors.InvalidArgument(f"{name} {getattr(resolved, name)} must be 0 (off) or positive.")
        return resolved

    def _source_hyperparameters(self, parameter_set) -> trainer_pb2.Hyperparameters | None:
        """Return the hyperparameters the session that saved ``parameter_set`` last had, if this trainer ran it.

        A resumed session continues with them, live learning-rate changes included, for every
        field its request leaves unset.
        """
        with self._lock:
            source = self._records.get(parameter_set.session_id)
            if source is None:
                logger.info("Parameter set %s comes from session %s, which this trainer did not run; unset "
                            "hyperparameters take the defaults", parameter_set.id, parameter_set.session_id or "none")
                return None
            inherited = trainer_pb2.Hyperparameters()
            inherited.CopyFrom(source.hyperparameters)
            return inherited

    def _estimate(self, request, hyperparameters, model, dataset) -> int:
        names = {key: getattr(request, key) or default for key, default in DEFAULT_ARRAY_NAMES.items()}
        headers = {header.name: header for header in dataset.arrays}
        dataset_bytes = 0
        for key, name in names.items():
            header = headers[name]
            dtype = canonical_dtype(header.dtype)
            # Session processes hold float inputs as float32, whatever they were uploaded as.
            itemsize = 4 if dtype.kind == "f" and key.endswith("inputs") else dtype.itemsize
            dataset_bytes += math.prod(header.shape) * itemsize
        example_shape = list(headers[names["train_inputs"]].shape)[1:]
        output_shape = [size for size in model.signature.output_shape if size > 0]
        return estimate_session_bytes(
            dataset_bytes=dataset_bytes,
            parameter_bytes=model.signature.parameter_bytes,
            optimizer=hyperparameters.optimizer,
            batch_size=hyperparameters.batch_size,
            example_bytes=int(np.prod(example_shape, dtype=np.int64)) * 4,
            output_bytes=int(np.prod(output_shape, dtype=np.int64)) * 4,
        )

    def _check_fits(self, estimate: int, requested_device: str) -> None:
        if requested_device:
            device = self.devices.get(requested_device)
            if device is None:
                raise errors.NotFound(
                    f"No device {requested_device!r} on this trainer; it has {', '.join(self.devices)}. "
                    "List them with 'lasagne-engine devices'."
                )
            candidates = [device]
        else:
            candidates = list(self.devices.values())
        largest = max(candidates, key=lambda device: device.memory_budget_bytes)
        if estimate > largest.memory_budget_bytes:
            with self._lock:
                free = largest.memory_budget_bytes - self._used_bytes(largest.name)
            raise errors.ResourceExhausted(
                f"The session needs an estimated {estimate:,} bytes of device memory, but the largest "
                f"budget is {largest.memory_budget_bytes:,} bytes ({largest.name}, {free:,} bytes free now). "
                "Use a smaller batch size or dataset, or raise the budget."
            )

    def _resolve(self, call: Callable):
        try:
            return call()
        except Exception as error:
            if hasattr(error, "code") and not isinstance(error, errors.EngineError):
                raise _client_error_to_domain(error) from error
            raise

    def start(self, request: trainer_pb2.StartSessionRequest) -> trainer_pb2.Session:
        """Validate the request and queue a session; it starts as soon as a device is free.

        Raises
        ------
        InvalidArgument
            For a bad hyperparameter or reference.
        NotFound
            If the model, dataset, one of its arrays, a parameter set or the device does not exist.
        ResourceExhausted
            If the session's estimated memory fits no device's budget.
        """
        if self._closed:
            raise errors.Unavailable("The trainer is shutting down; start the session on another trainer.")
        if not request.model:
            raise errors.InvalidArgument("No model given; name a registered model as 'name' or 'name@version'.")
        if not request.dataset:
            raise errors.InvalidArgument("No dataset given; name an uploaded dataset as 'name' or 'name@version'.")
        if request.init_parameter_set and request.resume_from:
            raise errors.InvalidArgument("Give init_parameter_set or resume_from, not both.")
        model = self._resolve(lambda: self._engine.get_model(request.model))
        dataset = self._resolve(lambda: self._engine.describe_dataset(request.dataset))
        start_from = request.resume_from or request.init_parameter_set
        first_step = 0
        inherited = None
        if start_from:
            parameter_set = self._resolve(lambda: self._engine.get_parameter_set(start_from))
            if parameter_set.model != model.name:
                raise errors.FailedPrecondition(
                    f"Parameter set {start_from!r} belongs to model {parameter_set.model!r}, not {model.name!r}."
                )
            if request.resume_from:
                first_step = parameter_set.step
                inherited = self._source_hyperparameters(parameter_set)
        hyperparameters = self._hyperparameters(request.hyperparameters, inherited)
        array_names = {header.name for header in dataset.arrays}
        for key, default in DEFAULT_ARRAY_NAMES.items():
            name = getattr(request, key) or default
            if name not in array_names:
                raise errors.NotFound(
                    f"Dataset '{dataset.name}@{dataset.version}' has no array {name!r} for {key}; it has "
                    f"{', '.join(sorted(array_names))}. Name the arrays with --{key.replace('_', '-')}."
                )
        estimate = self._estimate(request, hyperparameters, model, dataset)
        self._check_fits(estimate, request.device)

        session_id = f"s-{uuid.uuid4().hex[:12]}"
        record = trainer_pb2.Session(
            id=session_id,
            model=model.name,
            model_version=model.version,
            dataset=dataset.name,
            dataset_version=dataset.version,
            hyperparameters=hyperparameters,
            state=trainer_pb2.QUEUED,
            created_at=to_timestamp(time.time()),
            description=request.description,
            resumed_from=request.resume_from,
            estimated_bytes=estimate,
            step=first_step,
            train_inputs=request.train_inputs,
            train_targets=request.train_targets,
            val_inputs=request.val_inputs,
            val_targets=request.val_targets,
        )
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
            init_parameter_set=start_from,
            registry_address=self.registry_address,
            data_address=self.data_address,
            first_step=first_step,
        )
        live = LiveSession(record=record, spec=spec, token=secrets.token_hex(16), estimated_bytes=estimate,
                           requested_device=request.device)
        if start_from:
            self._hold(start_from, session_id)
        with self._lock:
            self._records[session_id] = record
            self._live[session_id] = live
            self._queue.append(session_id)
            self._store.put(record)
        logger.info("Session %s queued: model %s@%d, dataset %s@%d, estimated %d bytes",
                    session_id, model.name, model.version, dataset.name, dataset.version, estimate)
        self._schedule()
        return self.get(session_id)

    def _hold(self, parameter_set_id: str, session_id: str) -> None:
        """Keep the registry from deleting a parameter set the session starts from while it runs.

        Raises
        ------
        NotFound
            If the parameter set was deleted meanwhile.
        Unavailable
            If the registry cannot be reached; the session does not start unprotected.
        """
        self._resolve(lambda: self._engine.hold_parameter_set(parameter_set_id, session_id))

    def _release_holds(self, session_id: str) -> None:
        try:
            self._engine.release_parameter_set("", session_id)
        except Exception as error:  # noqa: BLE001 - a hold left behind only blocks deleting that set
            logger.warning("Session %s could not release its parameter set holds: %s", session_id, error)

    # Placement -----------------------------------------------------------------------------

    def _used_bytes(self, device_name: str) -> int:
        occupant = self._occupant.get(device_name)
        return self._live[occupant].estimated_bytes if occupant in self._live else 0

    def _free_device_for(self, live: LiveSession) -> DeviceInfo | None:
        names = [live.requested_device] if live.requested_device else list(self.devices)
        for name in names:
            device = self.devices[name]
            if name not in self._occupant and live.estimated_bytes <= device.memory_budget_bytes:
                return device
        return None

    def _schedule(self) -> None:
        """Place queued sessions on free devices, in order of submission, and launch them.

        A session that names a busy device keeps its place without blocking later sessions that
        can run elsewhere.
        """
        if not self._recovered.is_set():
            return  # _settle_interrupted places the queue once the previous run's processes are gone
        to_launch: list[LiveSession] = []
        with self._lock:
            if self._closed:
                return
            for session_id in list(self._queue):
                live = self._live.get(session_id)
                if live is None or session_id in self._occupant.values():
                    # Gone, or placed already: a session id is never launched twice.
                    self._queue.remove(session_id)
                    continue
                device = self._free_device_for(live)
                if device is None:
                    continue
                self._queue.remove(session_id)
                self._occupant[device.name] = session_id
                record = live.record
                record.device = device.name
                record.backend = backend_for(device.name, self.backend)
                record.state = trainer_pb2.PENDING
                live.spec.device = device.name
                live.spec.backend = record.backend
                to_launch.append(live)
            self._number_queue()
            for live in to_launch:
                live.record.queue_position = 0
                self._store.put(live.record)
                self._publish(live.record.id, trainer_pb2.SessionEvent(state=live.record.state))
        for live in to_launch:
            self._launch(live)
        if to_launch:
            self._devices_changed()

    def _number_queue(self) -> None:
        """Give every queued session its place in the queue. Call under the lock."""
        for position, session_id in enumerate(self._queue, start=1):
            self._records[session_id].queue_position = position

    def _launch(self, live: LiveSession) -> None:
        record = live.record
        device = self.devices[record.device]
        launch = LaunchRequest(
            session_id=record.id,
            token=live.token,
            trainer_address=self.trainer_address,
            device=record.device,
            backend=record.backend,
            working_dir=self.root / "sessions" / record.id,
            cpu_core=device.cpu_core,
        )
        try:
            process = self.launcher.launch(launch, lambda code, tail: self._process_exited(record.id, code, tail))
        except OSError as error:
            logger.error("Session %s could not be started: %s", record.id, error)
            self._finish(record.id, trainer_pb2.FAILED, f"The session process could not be started: {error}")
            return
        with self._lock:
            live.process = process
            record.pid = process.pid
            self._store.put(record)
        self._notify_metrics("session_updated", record)

    def _release_device(self, session_id: str) -> None:
        for name, occupant in list(self._occupant.items()):
            if occupant == session_id:
                del self._occupant[name]

    def devices_status(self) -> trainer_pb2.GetDevicesResponse:
        """Describe each device: budget, estimated memory in use and the session on it."""
        with self._lock:
            devices = [
                trainer_pb2.Device(
                    name=device.name,
                    kind=device.kind,
                    memory_budget_bytes=device.memory_budget_bytes,
                    memory_used_bytes=self._used_bytes(device.name),
                    session_ids=[self._occupant[device.name]] if device.name in self._occupant else [],
                    backend=backend_for(device.name, self.backend),
                )
                for device in self.devices.values()
            ]
            return trainer_pb2.GetDevicesResponse(devices=devices, queued_session_ids=list(self._queue))

    def _devices_changed(self) -> None:
        if self.metrics is not None:
            try:
                self.metrics.devices_updated(list(self.devices_status().devices))
            except Exception:  # noqa: BLE001 - metrics must never break training
                logger.exception("The metrics exporter failed to take a device update")

    def _notify_metrics(self, method: str, *arguments) -> None:
        if self.metrics is None:
            return
        try:
            getattr(self.metrics, method)(*arguments)
        except Exception:  # noqa: BLE001 - metrics must never break training
            logger.exception("The metrics exporter failed in %s", method)

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
                logger.warning("Rejected a process attaching to session %s with a wrong token", hello.session_id)
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
        ended = False
        with self._lock:
            record = self._records[session_id]
            live = self._live.get(session_id)
            if record.state in FINAL_STATES:
                return
            if kind == "state":
                ended = self._apply_state(record, report.state)
            elif kind == "progress":
                record.epoch = report.progress.epoch
                record.step = report.progress.step
                self._publish(session_id, trainer_pb2.SessionEvent(progress=report.progress))
                self._publish_points(record, report.progress.epoch, report.progress.step, {
                    "train_loss": report.progress.train_loss,
                    "examples_per_second": report.progress.examples_per_second,
                    "learning_rate": report.progress.learning_rate,
                })
            elif kind == "epoch_end":
                metrics = report.epoch_end
                record.epochs.append(metrics)
                record.epoch = metrics.epoch
                record.step = metrics.step
                record.last_parameter_set_id = metrics.parameter_set_id
                self._store.put(record)
                self._publish(session_id, trainer_pb2.SessionEvent(epoch_end=metrics))
                self._publish_points(record, metrics.epoch, metrics.step, {
                    "epoch_train_loss": metrics.train_loss, "val_loss": metrics.val_loss, **dict(metrics.metrics),
                })
                logger.info("Session %s finished epoch %d: train loss %.4f, validation loss %.4f",
                            session_id, metrics.epoch, metrics.train_loss, metrics.val_loss)
            elif kind == "best_parameter_set_id":
                record.best_parameter_set_id = report.best_parameter_set_id
                self._store.put(record)
            elif kind == "checkpoint_saved":
                record.last_parameter_set_id = report.checkpoint_saved.parameter_set_id or record.last_parameter_set_id
                self._store.put(record)
                self._complete_pending(live, report.checkpoint_saved.request_id, report)
            elif kind == "hyperparameters_applied":
                applied = report.hyperparameters_applied
                if not applied.error:
                    record.history.append(trainer_pb2.HyperparameterChange(
                        changed_at=to_timestamp(time.time()), step=applied.step, name="learning_rate",
                        old_value=record.hyperparameters.learning_rate, new_value=applied.learning_rate,
                    ))
                    record.hyperparameters.learning_rate = applied.learning_rate
                    if live is not None:
                        live.spec.hyperparameters.learning_rate = applied.learning_rate
                    self._store.put(record)
                self._complete_pending(live, applied.request_id, report)
            elif kind == "deleted_parameter_set_id":
                logger.info("Session %s deleted parameter set %s under its retention settings",
                            session_id, report.deleted_parameter_set_id)
            snapshot = self._copy(record)
        if kind == "state":
            self._notify_metrics("session_updated", snapshot)
        elif kind in ("progress", "epoch_end", "parameter_statistics"):
            self._notify_metrics("session_report", snapshot, report)
        if ended:
            self._notify_metrics("session_ended", snapshot)
            if snapshot.state in FINAL_STATES:
                self._release_holds(session_id)

    def _apply_state(self, record: trainer_pb2.Session, change: trainer_pb2.WorkerStateChange) -> bool:
        """Apply a state change under the lock; return whether the session reached a final state."""
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
        final = change.state in FINAL_STATES or change.state == trainer_pb2.SUSPENDED
        if change.state in FINAL_STATES:
            record.finished_at.CopyFrom(to_timestamp(time.time()))
        self._store.put(record)
        self._publish(record.id, trainer_pb2.SessionEvent(state=change.state))
        logger.info("Session %s is %s", record.id, trainer_pb2.SessionState.Name(change.state).lower())
        return final

    @staticmethod
    def _complete_pending(live: LiveSession | None, request_id: int, report: trainer_pb2.WorkerReport) -> None:
        if live is None:
            return
        pending = live.pending.pop(request_id, None)
        if pending is not None:
            pending.reply = report
            pending.done.set()

    def _process_exited(self, session_id: str, returncode: int, stderr_tail: str) -> None:
        with self._lock:
            record = self._records[session_id]
            live = self._live.pop(session_id, None)
            self._release_device(session_id)
            if live is not None:
                live.commands.put(None)
                for pending in live.pending.values():
                    pending.done.set()
            state = record.state
        self._devices_changed()
        if state in FINAL_STATES or state == trainer_pb2.SUSPENDED:
            logger.info("Session %s process ended with %s", session_id, describe_exit(returncode))
            self._schedule()
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
        self._schedule()

    def _finish(self, session_id: str, state: int, error: str = "") -> None:
        with self._lock:
            record = self._records[session_id]
            record.state = state
            if error:
                record.error = error
            record.queue_position = 0
            record.finished_at.CopyFrom(to_timestamp(time.time()))
            self._live.pop(session_id, None)
            self._release_device(session_id)
            if session_id in self._queue:
                self._queue.remove(session_id)
                self._number_queue()
            self._store.put(record)
            self._publish(session_id, trainer_pb2.SessionEvent(state=state))
            snapshot = self._copy(record)
        self._notify_metrics("session_updated", snapshot)
        self._notify_metrics("session_ended", snapshot)
        self._devices_changed()
        self._release_holds(session_id)

    # Queries ---------------------------------------------------------------------------------

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

    # Control ---------------------------------------------------------------------------------

    def _live_session(self, session_id: str, action: str, states: frozenset | None = None) -> LiveSession:
        """Return the live session, or raise FAILED_PRECONDITION naming its state. Call under the lock."""
        record = self._get_record(session_id)
        live = self._live.get(session_id)
        state_text = trainer_pb2.SessionState.Name(record.state).lower()
        if live is None or record.state in FINAL_STATES:
            raise errors.FailedPrecondition(
                f"Session {session_id!r} is already {state_text}; only a live session can {action}."
            )
        if states is not None and record.state not in states:
            allowed = " or ".join(trainer_pb2.SessionState.Name(state).lower() for state in sorted(states))
            raise errors.FailedPrecondition(
                f"Session {session_id!r} is {state_text}; it can {action} only when {allowed}."
            )
        return live

    def stop(self, session_id: str) -> trainer_pb2.Session:
        """Ask a live session to save a final parameter set and stop; a queued one stops at once.

        A suspended or interrupted session also stops at once: it saved its last parameter set
        when it left its device, and that set gets the tag ``final``.

        Raises
        ------
        NotFound
            If there is no such session.
        FailedPrecondition
            If the session has already finished.
        Unavailable
            If a suspended session's process has not exited yet.
        """
        self._wait_for_exit(session_id)
        with self._lock:
            record = self._get_record(session_id)
            parked = record.state in RESUMABLE_STATES
            if parked:
                self._check_exited(session_id, "stop")
                final_parameter_set_id = record.last_parameter_set_id
            else:
                live = self._live_session(session_id, "be stopped")
                queued = live.record.state == trainer_pb2.QUEUED
                live.stop_requested = True
                if live.attached:
                    live.commands.put(trainer_pb2.WorkerCommand(stop=True))
            logger.info("Stop requested for session %s", session_id)
        if parked:
            self._finish(session_id, trainer_pb2.STOPPED)
            if final_parameter_set_id:
                self._tag_final(session_id, final_parameter_set_id)
        elif queued:
            self._finish(session_id, trainer_pb2.STOPPED)
        return self.get(session_id)

    def _tag_final(self, session_id: str, parameter_set_id: str) -> None:
        try:
            self._engine.tag_parameter_set(parameter_set_id, add=["final"], exclusive_in_session=True)
        except Exception as error:  # noqa: BLE001 - the session is stopped either way
            logger.warning("Session %s: could not tag its last parameter set %s final: %s",
                           session_id, parameter_set_id, error)

    def _wait_for_exit(self, session_id: str) -> None:
        """Wait up to ``SUSPEND_EXIT_TIMEOUT_S`` for a suspended session's process to exit.

        A suspended session has saved its checkpoint, but its device is free only once its
        process has exited.
        """
        with self._lock:
            record = self._get_record(session_id)
            live = self._live.get(session_id)
            exiting = live.process if record.state in RESUMABLE_STATES and live is not None else None
        if exiting is not None:
            exiting.join(SUSPEND_EXIT_TIMEOUT_S)

    def _check_exited(self, session_id: str, action: str) -> None:
        """Raise UNAVAILABLE if a suspended session's process is still exiting. Call under the lock."""
        record = self._records[session_id]
        if record.state in RESUMABLE_STATES and session_id in self._live:
            raise errors.Unavailable(
                f"Session {session_id!r} is {trainer_pb2.SessionState.Name(record.state).lower()} but its process "
                f"has not exited after {SUSPEND_EXIT_TIMEOUT_S:.0f} s; retry the {action} shortly."
            )

    def pause(self, session_id: str, *, release: bool) -> trainer_pb2.Session:
        """Pause a running session before its next step; with ``release``, checkpoint and free its device.

        Raises
        ------
        FailedPrecondition
            If the session is not running (or paused, for a release).
        """
        with self._lock:
            allowed = CONTROLLABLE_STATES if release else frozenset({trainer_pb2.RUNNING})
            live = self._live_session(session_id, "be paused", allowed)
            if not live.attached:
                raise errors.FailedPrecondition(f"Session {session_id!r} has no process attached yet; retry shortly.")
            command = (
                trainer_pb2.WorkerCommand(release=trainer_pb2.SUSPENDED) if release else trainer_pb2.WorkerCommand(pause=True)
            )
            live.commands.put(command)
            logger.info("%s requested for session %s", "Suspend" if release else "Pause", session_id)
            return self._copy(live.record)

    def resume(self, session_id: str) -> trainer_pb2.Session:
        """Resume a paused session in place, or requeue a suspended or interrupted one from its last parameter set.

        Raises
        ------
        FailedPrecondition
            If the session is neither paused, suspended nor interrupted.
        """
        if not self._recovered.wait(RECOVERY_TIMEOUT_S):
            raise errors.Unavailable("The trainer is still recovering the sessions of its previous run; retry shortly.")
        self._wait_for_exit(session_id)
        with self._lock:
            record = self._get_record(session_id)
            live = self._live.get(session_id)
            self._check_exited(session_id, "resume")
            if record.state == trainer_pb2.PAUSED and live is not None and live.attached:
                live.commands.put(trainer_pb2.WorkerCommand(resume=True))
                logger.info("Resume requested for session %s", session_id)
                return self._copy(record)
            if record.state not in RESUMABLE_STATES or live is not None:
                hint = ""
                if record.state in FINAL_STATES and record.last_parameter_set_id:
                    hint = (f" To train on from its last parameter set, start a new session with 'lasagne-engine train "
                            f"{record.model} {record.dataset} --resume-from {record.last_parameter_set_id}'.")
                raise errors.FailedPrecondition(
                    f"Session {session_id!r} is {trainer_pb2.SessionState.Name(record.state).lower()}; only a "
                    f"paused, suspended or interrupted session can be resumed.{hint}"
                )
            resume_from = record.last_parameter_set_id
        first_step = 0
        if resume_from:
            first_step = self._resolve(lambda: self._engine.get_parameter_set(resume_from)).step
        # Every set the session saved, checkpoints included, so that retention keeps counting them.
        saved = sorted(self._resolve(lambda: self._engine.list_parameter_sets(session_id=session_id)),
                       key=lambda parameter_set: parameter_set.step)
        if resume_from:
            self._hold(resume_from, session_id)
        with self._lock:
            record = self._get_record(session_id)
            if record.state not in RESUMABLE_STATES or session_id in self._live:
                # Another ResumeSession call got here first.
                raise errors.FailedPrecondition(
                    f"Session {session_id!r} is {trainer_pb2.SessionState.Name(record.state).lower()}; only a "
                    "paused, suspended or interrupted session can be resumed."
                )
            spec = trainer_pb2.SessionSpec(
                session_id=record.id,
                model=record.model,
                model_version=record.model_version,
                dataset=record.dataset,
                dataset_version=record.dataset_version,
                hyperparameters=record.hyperparameters,
                train_inputs=record.train_inputs,
                train_targets=record.train_targets,
                val_inputs=record.val_inputs,
                val_targets=record.val_targets,
                init_parameter_set=resume_from,
                registry_address=self.registry_address,
                data_address=self.data_address,
                first_step=first_step,
                saved_parameter_set_ids=[parameter_set.id for parameter_set in saved],
            )
            live = LiveSession(record=record, spec=spec, token=secrets.token_hex(16), estimated_bytes=record.estimated_bytes)
            record.state = trainer_pb2.QUEUED
            record.error = ""
            record.step = first_step
            record.ClearField("finished_at")
            self._live[session_id] = live
            self._queue.append(session_id)
            self._store.put(record)
            self._publish(session_id, trainer_pb2.SessionEvent(state=record.state))
        logger.info("Session %s requeued to resume from parameter set %s at step %d", session_id, resume_from or "none", first_step)
        self._schedule()
        return self.get(session_id)

    def _await(self, session_id: str, command_builder, action: str) -> trainer_pb2.WorkerReport:
        with self._lock:
            live = self._live_session(session_id, action, CONTROLLABLE_STATES)
            if not live.attached:
                raise errors.FailedPrecondition(f"Session {session_id!r} has no process attached yet; retry shortly.")
            request_id = next(self._request_ids)
            pending = PendingReply()
            live.pending[request_id] = pending
            live.commands.put(command_builder(request_id))
        if not pending.done.wait(CONTROL_TIMEOUT_S):
            with self._lock:
                live.pending.pop(request_id, None)
            raise errors.Unavailable(f"Session {session_id!r} did not confirm within {CONTROL_TIMEOUT_S:.0f} s.")
        if pending.reply is None:
            raise errors.FailedPrecondition(f"Session {session_id!r} ended before it could {action}.")
        return pending.reply

    def checkpoint(self, session_id: str) -> str:
        """Have a running or paused session save a parameter set now; return its id.

        Raises
        ------
        FailedPrecondition
            If the session is not running or paused, or the save failed.
        """
        reply = self._await(
            session_id,
            lambda request_id: trainer_pb2.WorkerCommand(checkpoint=trainer_pb2.CheckpointCommand(request_id=request_id)),
            "save a checkpoint",
        )
        if reply.checkpoint_saved.error:
            raise errors.FailedPrecondition(f"Session {session_id!r} failed to save a checkpoint: {reply.checkpoint_saved.error}")
        return reply.checkpoint_saved.parameter_set_id

    def update_hyperparameters(self, session_id: str, *, learning_rate: float | None) -> trainer_pb2.Session:
        """Change a live session's learning rate at its next step, without recompiling.

        A queued session takes the new value when it starts. The change is recorded in the
        session's history either way.

        Raises
        ------
        InvalidArgument
            If the learning rate is not a positive finite number.
        """
        if learning_rate is None:
            raise errors.InvalidArgument("No hyperparameter to change; give a learning rate.")
        _check_learning_rate(learning_rate)
        with self._lock:
            live = self._live_session(session_id, "change hyperparameters")
            if live.record.state not in CONTROLLABLE_STATES:
                record = live.record
                record.history.append(trainer_pb2.HyperparameterChange(
                    changed_at=to_timestamp(time.time()), step=record.step, name="learning_rate",
                    old_value=record.hyperparameters.learning_rate, new_value=learning_rate,
                ))
                record.hyperparameters.learning_rate = learning_rate
                live.spec.hyperparameters.learning_rate = learning_rate
                self._store.put(record)
                return self._copy(record)
        reply = self._await(
            session_id,
            lambda request_id: trainer_pb2.WorkerCommand(
                set_hyperparameters=trainer_pb2.SetHyperparametersCommand(request_id=request_id, learning_rate=learning_rate)
            ),
            "change hyperparameters",
        )
        if reply.hyperparameters_applied.error:
            raise errors.InvalidArgument(reply.hyperparameters_applied.error)
        return self.get(session_id)

    # Watching --------------------------------------------------------------------------------

    def _publish(self, session_id: str, event: trainer_pb2.SessionEvent) -> None:
        for subscriber in self._subscribers.get(session_id, []):
            subscriber.put(event)

    def _publish_points(self, record: trainer_pb2.Session, epoch: int, step: int, values: dict[str, float]) -> None:
        if not self._metric_subscribers:
            return
        now = to_timestamp(time.time())
        points = [
            trainer_pb2.MetricPoint(session_id=record.id, name=name, value=value, epoch=epoch, step=step, time=now)
            for name, value in values.items()
        ]
        for session_ids, subscriber in self._metric_subscribers:
            if not session_ids or record.id in session_ids:
                for point in points:
                    subscriber.put(point)

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

    def watch_metrics(self, session_ids: Sequence[str], is_active=lambda: True) -> Iterator[trainer_pb2.MetricPoint]:
        """Yield metric points of the given sessions (of all when empty) as they are reported.

        Raises
        ------
        NotFound
            If a named session does not exist.
        """
        points: queue.Queue = queue.Queue()
        wanted = frozenset(session_ids)
        with self._lock:
            for session_id in wanted:
                self._get_record(session_id)
            entry = (wanted, points)
            self._metric_subscribers.append(entry)
        try:
            while is_active():
                try:
                    yield points.get(timeout=WATCH_POLL_S)
                except queue.Empty:
                    with self._lock:
                        if wanted and all(self._records[s].state in FINAL_STATES for s in wanted):
                            return
        finally:
            with self._lock:
                self._metric_subscribers.remove(entry)

    # Shutdown --------------------------------------------------------------------------------

    def close(self, timeout_s: float = 30.0) -> None:
        """Have every session checkpoint and exit as interrupted, then terminate what remains."""
        with self._lock:
            self._closed = True
            queued = list(self._queue)
            live_sessions = [(session_id, live) for session_id, live in self._live.items() if session_id not in queued]
            for session_id in queued:
                self._records[session_id].state = trainer_pb2.INTERRUPTED
                self._records[session_id].error = "The trainer stopped while the session was queued."
                self._records[session_id].queue_position = 0
                self._store.put(self._records[session_id])
                self._live.pop(session_id, None)
            self._queue.clear()
        for session_id in queued:
            self._release_holds(session_id)
            for session_id, live in live_sessions:
                if live.attached:
                    logger.info("Asking session %s to checkpoint before the trainer stops", session_id)
                    live.commands.put(trainer_pb2.WorkerCommand(release=trainer_pb2.INTERRUPTED))
        deadline = time.monotonic() + timeout_s
        for session_id, live in live_sessions:
            if live.process is None:
                continue
            live.process.join(max(0.0, deadline - time.monotonic()))
            if live.process.running():
                logger.warning("Session %s did not exit within %.0f s; terminating it", session_id, timeout_s)
                live.process.terminate()
                live.process.join(5.0)
                live.process.kill()
        for session_id, _live in live_sessions:
            with self._lock:
                final = self._records[session_id].state in FINAL_STATES
            if not final:
                self._finish(session_id, trainer_pb2.INTERRUPTED, "The trainer stopped while the session was running.")
        if self.metrics is not None:
            self.metrics.close()
        self._engine.close()
        self._store.close()


def _check_learning_rate(value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise errors.InvalidArgument(f"learning_rate {value!r} must be a positive finite number.")
