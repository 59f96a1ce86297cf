"""The session process: attaches to its trainer over gRPC, trains, and reports as it goes.

Started by a launcher as ``python -m lasagne_engine.trainer.worker --session-id ID --trainer
ADDRESS`` with the secret ``LASAGNE_ENGINE_WORKER_TOKEN`` in its environment. Everything else
(model, dataset, hyperparameters, service addresses) arrives from the trainer in reply to the
hello, so the same process can run on another host as long as it reaches the services.
"""

import argparse
import logging
import os
import queue
import sys
import threading
import traceback
import warnings

import numpy as np
from google.protobuf import json_format

from lasagne_engine import rpc
from lasagne_engine.security import ClientSecurity
from lasagne_engine.compute import JAX_TRUNCATION_WARNING
from lasagne_engine.datacache import DatasetCache, default_cache_root
from lasagne_engine.errors import EngineError
from lasagne_engine.modeldef import build_model, error_tail
from lasagne_engine.trainer.training import NonFiniteLoss, SessionRun, TrainingData, check_shapes
from lasagne_engine.v1 import trainer_pb2, trainer_pb2_grpc

logger = logging.getLogger(__name__)

TOKEN_VARIABLE = "LASAGNE_ENGINE_WORKER_TOKEN"
DEFAULT_ARRAY_NAMES = {
    "train_inputs": "X_train",
    "train_targets": "y_train",
    "val_inputs": "X_val",
    "val_targets": "y_val",
}
# Metrics where a larger value is better; every other monitored metric is minimized.
MAXIMIZED_METRICS = ("val_accuracy",)
_END_OF_REPORTS = None


def monitor_improved(monitor: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if monitor in MAXIMIZED_METRICS else value < best


class EndTraining(Exception):
    """Raised between steps when a command ends the session: stop, or release with a state."""

    def __init__(self, state: int):
        super().__init__(trainer_pb2.SessionState.Name(state))
        self.state = state


class Worker:
    """Runs one session described by a :class:`SessionSpec`, reporting through ``report``.

    Commands from the trainer arrive in ``commands`` and are applied between steps, so a step
    is never interrupted halfway.
    """

    def __init__(self, spec: trainer_pb2.SessionSpec, report, commands: queue.Queue | queue.SimpleQueue):
        from lasagne_engine.client import Engine

        self.spec = spec
        self.report = report
        self.commands = commands
        self.engine = Engine(registry_address=spec.registry_address, data_address=spec.data_address)
        self.model_ref = f"{spec.model}@{spec.model_version}"
        self.last_parameter_set_id = spec.init_parameter_set
        self.run_state: SessionRun | None = None
        self.monitor = spec.hyperparameters.monitor or "val_loss"
        # (parameter set id, monitored value or None, step) of every set this session saved.
        self.saved: list[tuple[str, float | None, int]] = []
        self.best_parameter_set_id = ""

    def _state(self, state: int, **fields) -> None:
        logger.info("Session %s is now %s", self.spec.session_id, trainer_pb2.SessionState.Name(state))
        self.report(trainer_pb2.WorkerReport(state=trainer_pb2.WorkerStateChange(state=state, **fields)))

    def run(self) -> int:
        try:
            return self._run()
        except NonFiniteLoss as error:
            message = f"{error} Training stopped; the last good parameter set is {self.last_parameter_set_id or 'none'}."
            logger.error("Session %s failed: %s", self.spec.session_id, message)
            self._state(trainer_pb2.FAILED, error=message)
            return 1
        except EngineError as error:
            logger.error("Session %s failed: %s", self.spec.session_id, error)
            self._state(trainer_pb2.FAILED, error=str(error))
            return 1
        except Exception as error:  # noqa: BLE001 - reported to the trainer before the process exits
            # Client SDK errors carry the service's message; anything else gets its traceback tail.
            details = str(error) if type(error).__module__.startswith("lasagne_engine") else error_tail(traceback.format_exc())
            logger.exception("Session %s failed", self.spec.session_id)
            self._state(trainer_pb2.FAILED, error=f"{type(error).__name__}: {details}")
            return 1
        finally:
            self.engine.close()

    # Commands between steps --------------------------------------------------------------------

    def _apply(self, command: trainer_pb2.WorkerCommand) -> str | None:
        """Apply one command; return "stop", "pause", "resume" or None."""
        kind = command.WhichOneof("command")
        if kind == "stop":
            raise EndTraining(trainer_pb2.STOPPED)
        if kind == "release":
            raise EndTraining(command.release)
        if kind == "checkpoint":
            self._checkpoint(command.checkpoint.request_id)
        elif kind == "set_hyperparameters":
            self._set_hyperparameters(command.set_hyperparameters)
        return kind

    def _checkpoint(self, request_id: int) -> None:
        try:
            parameter_set = self._save(epoch=self._epochs_done(), metrics={}, tags=["checkpoint", "latest"])
        except Exception as error:  # noqa: BLE001 - the trainer reports the failure to the caller
            logger.exception("Session %s failed to save a checkpoint", self.spec.session_id)
            self.report(trainer_pb2.WorkerReport(checkpoint_saved=trainer_pb2.CheckpointSaved(request_id=request_id, error=str(error))))
            return
        self.report(trainer_pb2.WorkerReport(
            checkpoint_saved=trainer_pb2.CheckpointSaved(request_id=request_id, parameter_set_id=parameter_set.id)
        ))

    def _set_hyperparameters(self, command: trainer_pb2.SetHyperparametersCommand) -> None:
        run = self.run_state
        try:
            run.set_learning_rate(command.learning_rate)
        except EngineError as error:
            self.report(trainer_pb2.WorkerReport(hyperparameters_applied=trainer_pb2.HyperparametersApplied(
                request_id=command.request_id, error=str(error))))
            return
        logger.info("Session %s: learning rate set to %g at step %d", self.spec.session_id, command.learning_rate, run.step)
        self.report(trainer_pb2.WorkerReport(hyperparameters_applied=trainer_pb2.HyperparametersApplied(
            request_id=command.request_id, step=run.step, learning_rate=command.learning_rate)))

    def before_step(self) -> bool:
        """Apply the commands that arrived since the last step; block while paused.

        Raises
        ------
        EndTraining
            When a stop or release command arrived.
        """
        while True:
            # Checked before every step: empty() costs far less than a get_nowait() that raises.
            if self.commands.empty():
                return False
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return False
            if self._apply(command) == "pause":
                self._state(trainer_pb2.PAUSED)
                while self._apply(self.commands.get()) != "resume":
                    pass
                self._state(trainer_pb2.RUNNING)

    # Training ----------------------------------------------------------------------------------

    def _epochs_done(self) -> int:
        run = self.run_state
        return run.step // run.steps_per_epoch if run.steps_per_epoch else 0

    def _load_previous(self) -> None:
        """Load the monitored values of the parameter sets saved before a resume, for retention and best."""
        for parameter_set_id in self.spec.saved_parameter_set_ids:
            try:
                parameter_set = self.engine.get_parameter_set(parameter_set_id)
            except Exception as error:  # noqa: BLE001 - a set deleted meanwhile is simply not kept
                logger.warning("Session %s: earlier parameter set %s is gone (%s)", self.spec.session_id, parameter_set_id, error)
                continue
            self.saved.append((parameter_set.id, parameter_set.metrics.get(self.monitor), parameter_set.step))

    def _run(self) -> int:
        spec = self.spec
        hyperparameters = spec.hyperparameters
        names = {key: getattr(spec, key) or default for key, default in DEFAULT_ARRAY_NAMES.items()}

        self._state(trainer_pb2.LOADING)
        model_version = self.engine.get_model(self.model_ref)
        build_hyperparameters = json_format.MessageToDict(model_version.default_hyperparameters)
        build_hyperparameters.update(json_format.MessageToDict(hyperparameters.model))
        arrays = load_arrays(self.engine, f"{spec.dataset}@{spec.dataset_version}", list(names.values()))
        data = TrainingData(**{key: arrays[name] for key, name in names.items()})
        built = build_model(model_version.source, build_hyperparameters, name=spec.model)
        check_shapes(built, data, names=names)
        del arrays

        self._state(trainer_pb2.COMPILING, backend=spec.backend)
        run = SessionRun(
            built,
            data,
            optimizer=hyperparameters.optimizer,
            learning_rate=hyperparameters.learning_rate,
            batch_size=hyperparameters.batch_size,
            seed=hyperparameters.seed,
            mode="JAX" if spec.backend == "jax" else None,
            statistics_every_steps=max(0, hyperparameters.statistics_every_steps),
        )
        self.run_state = run
        del data
        compile_seconds = run.compile()
        logger.info("Session %s compiled in %.1f s on backend %s", spec.session_id, compile_seconds, spec.backend)
        if spec.init_parameter_set:
            initial = self.engine.load_parameter_set(spec.init_parameter_set)
            missing = run.load_arrays(initial, source=f"parameter set {spec.init_parameter_set!r}")
            if missing:
                logger.info("Session %s: parameter set %s has no values for %s; they keep their initial values",
                            spec.session_id, spec.init_parameter_set, ", ".join(missing))
        run.step = spec.first_step
        self._load_previous()

        self._state(
            trainer_pb2.RUNNING,
            compile_seconds=compile_seconds,
            steps_per_epoch=run.steps_per_epoch,
            backend=spec.backend,
        )
        try:
            final_state = self._train(run)
        except EndTraining as ending:
            return self._end(run, ending.state)
        self._state(final_state)
        return 0

    def _train(self, run: SessionRun) -> int:
        """Run the remaining epochs; return COMPLETED or EARLY_STOPPED."""
        hyperparameters = self.spec.hyperparameters
        patience = hyperparameters.early_stopping_patience
        best_value = None
        for parameter_set_id, value, _ in self.saved:
            if value is not None and monitor_improved(self.monitor, value, best_value):
                best_value, self.best_parameter_set_id = value, parameter_set_id
        epochs_without_improvement = 0
        first_epoch = run.step // run.steps_per_epoch + 1
        for epoch in range(first_epoch, hyperparameters.epochs + 1):
            start_batch = run.step - (epoch - 1) * run.steps_per_epoch
            result = run.run_epoch(
                epoch,
                start_batch=start_batch,
                before_step=self.before_step,
                on_step=self._report_step,
                on_statistics=self._report_statistics,
            )
            metrics = {"train_loss": result.train_loss, "val_loss": result.val_loss, **result.metrics}
            parameter_set = self._save(epoch=epoch, metrics=metrics, tags=["latest"])
            value = metrics.get(self.monitor)
            if value is not None and monitor_improved(self.monitor, value, best_value):
                best_value = value
                epochs_without_improvement = 0
                self.engine.tag_parameter_set(parameter_set.id, add=["best"], exclusive_in_session=True)
                self.best_parameter_set_id = parameter_set.id
                self.report(trainer_pb2.WorkerReport(best_parameter_set_id=parameter_set.id))
            else:
                epochs_without_improvement += 1
            self.report(
                trainer_pb2.WorkerReport(
                    epoch_end=trainer_pb2.EpochMetrics(
                        epoch=epoch,
                        step=result.step,
                        train_loss=result.train_loss,
                        val_loss=result.val_loss,
                        metrics=result.metrics,
                        parameter_set_id=parameter_set.id,
                        epoch_seconds=result.epoch_seconds,
                        examples_per_second=result.examples_per_second,
                    )
                )
            )
            self._apply_retention()
            if patience and epochs_without_improvement >= patience:
                logger.info("Session %s: no improvement of %s for %d epochs; stopping early",
                            self.spec.session_id, self.monitor, patience)
                return trainer_pb2.EARLY_STOPPED
            self.before_step()
        return trainer_pb2.COMPLETED

    def _end(self, run: SessionRun, state: int) -> int:
        """Save the steps taken since the last stored parameter set, then report ``state``."""
        last_saved_step = self.saved[-1][2] if self.saved else None
        tags = ["final", "latest"] if state == trainer_pb2.STOPPED else ["latest"]
        if last_saved_step != run.step:
            parameter_set = self._save(epoch=self._epochs_done(), metrics={}, tags=tags)
            # Request id 0 marks a set that no command requested, so the trainer only records its id.
            self.report(trainer_pb2.WorkerReport(
                checkpoint_saved=trainer_pb2.CheckpointSaved(request_id=0, parameter_set_id=parameter_set.id)
            ))
        elif state == trainer_pb2.STOPPED:
            self.engine.tag_parameter_set(self.last_parameter_set_id, add=["final"], exclusive_in_session=True)
        self._state(state)
        return 0

    def _apply_retention(self) -> None:
        hyperparameters = self.spec.hyperparameters
        keep_best, keep_latest = hyperparameters.keep_best, hyperparameters.keep_latest
        if not keep_best and not keep_latest:
            return
        keep = {parameter_set_id for parameter_set_id, _, _ in self.saved[-max(keep_latest, 1):]}
        scored = [(value, parameter_set_id) for parameter_set_id, value, _ in self.saved if value is not None]
        # Sorted on the value alone: the sort is stable, so among equal values the earliest set
        # ranks first, as it does for the "best" tag, which moves only on a strict improvement.
        scored.sort(key=lambda item: item[0], reverse=self.monitor in MAXIMIZED_METRICS)
        keep.update(parameter_set_id for _, parameter_set_id in scored[: max(keep_best, 1)])
        # The tagged best set always stays, so the tag never points at a deleted set. So does the
        # set the session started from, which the registry keeps from deletion while it runs.
        keep.add(self.best_parameter_set_id)
        keep.add(self.spec.init_parameter_set)
        for parameter_set_id, value, step in list(self.saved):
            if parameter_set_id in keep:
                continue
            try:
                self.engine.delete_parameter_set(parameter_set_id)
            except Exception as error:  # noqa: BLE001 - retention retries at the next epoch
                logger.warning("Session %s could not delete parameter set %s: %s", self.spec.session_id, parameter_set_id, error)
                continue
            self.saved.remove((parameter_set_id, value, step))
            self.report(trainer_pb2.WorkerReport(deleted_parameter_set_id=parameter_set_id))

    def _report_step(self, report, step_seconds: list[float]) -> None:
        self.report(
            trainer_pb2.WorkerReport(
                progress=trainer_pb2.StepProgress(
                    epoch=report.epoch,
                    step=report.step,
                    step_in_epoch=report.step_in_epoch,
                    train_loss=report.train_loss,
                    examples_per_second=report.examples_per_second,
                    learning_rate=report.learning_rate,
                    step_seconds=step_seconds,
                )
            )
        )

    def _report_statistics(self, step: int, rows: list[dict]) -> None:
        self.report(trainer_pb2.WorkerReport(parameter_statistics=trainer_pb2.ParameterStatistics(
            step=step, parameters=[trainer_pb2.ParameterStatistic(**row) for row in rows])))

    def _save(self, *, epoch: int, metrics: dict, tags: list[str]):
        """Save the session's parameters to the registry and tag them.

        Raises
        ------
        NonFiniteLoss
            If a parameter contains NaN or an infinity, so that no such set is ever stored as good.
        """
        run = self.run_state
        arrays, roles = run.parameter_arrays()
        broken = [name for name, array in arrays.items() if array.dtype.kind == "f" and not np.isfinite(array).all()]
        if broken:
            raise NonFiniteLoss(
                f"Parameters {', '.join(broken)} became non-finite by epoch {epoch}, step {run.step}; nothing was saved."
            )
        parameter_set = self.engine.save_parameter_set(
            self.model_ref,
            arrays,
            roles=roles,
            session_id=self.spec.session_id,
            epoch=epoch,
            step=run.step,
            metrics=metrics,
            parent_id=self.last_parameter_set_id,
        )
        self.engine.tag_parameter_set(parameter_set.id, add=tags, exclusive_in_session=True)
        logger.info("Session %s saved parameter set %s at epoch %d, step %d", self.spec.session_id, parameter_set.id, epoch, run.step)
        self.last_parameter_set_id = parameter_set.id
        self.saved.append((parameter_set.id, metrics.get(self.monitor), run.step))
        return parameter_set


def load_arrays(engine, dataset_ref: str, names: list[str]) -> dict:
    """Load the session's arrays through the host's dataset cache, which downloads each array once per host."""
    return DatasetCache(default_cache_root()).load(engine, dataset_ref, names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one training session for a LasagneEngine trainer.")
    parser.add_argument("--session-id", required=True, help="id of the session to run")
    parser.add_argument("--trainer", required=True, help="host:port of the trainer to attach to")
    arguments = parser.parse_args(argv)
    rpc.configure_logging()
    warnings.filterwarnings("ignore", message=JAX_TRUNCATION_WARNING, category=UserWarning)
    token = os.environ.pop(TOKEN_VARIABLE, "")

    reports: queue.Queue = queue.Queue()
    reports.put(
        trainer_pb2.WorkerReport(
            hello=trainer_pb2.WorkerHello(session_id=arguments.session_id, token=token, pid=os.getpid())
        )
    )
    channel = rpc.client_channel(arguments.trainer, security=ClientSecurity.from_env())
    stub = trainer_pb2_grpc.TrainerStub(channel)
    commands = stub.AttachWorker(iter(reports.get, _END_OF_REPORTS))
    try:
        first = next(commands)
    except Exception as error:  # noqa: BLE001 - nothing to report to when the trainer is gone
        logger.error("Session %s could not attach to the trainer at %s: %s", arguments.session_id, arguments.trainer, error)
        return 3
    if first.WhichOneof("command") != "start":
        logger.error("Session %s: the trainer sent %s before start", arguments.session_id, first.WhichOneof("command"))
        return 3

    received: queue.SimpleQueue = queue.SimpleQueue()

    def follow_commands() -> None:
        try:
            for command in commands:
                logger.info("Session %s received command %s", arguments.session_id, command.WhichOneof("command"))
                received.put(command)
        except Exception as error:  # noqa: BLE001 - the trainer went away: save and end as interrupted
            logger.warning("Session %s lost its trainer connection (%s); checkpointing and exiting",
                           arguments.session_id, error)
            received.put(trainer_pb2.WorkerCommand(release=trainer_pb2.INTERRUPTED))

    follower = threading.Thread(target=follow_commands, name="worker-commands", daemon=True)
    follower.start()
    exit_code = Worker(first.start, reports.put, received).run()
    reports.put(_END_OF_REPORTS)
    follower.join(timeout=10)
    channel.close()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
