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

from google.protobuf import json_format

from lasagne_engine import rpc
from lasagne_engine.compute import JAX_TRUNCATION_WARNING
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


class Worker:
    """Runs one session described by a :class:`SessionSpec`, reporting through ``report``."""

    def __init__(self, spec: trainer_pb2.SessionSpec, report, stop_requested: threading.Event):
        from lasagne_engine.client import Engine

        self.spec = spec
        self.report = report
        self.stop_requested = stop_requested
        self.engine = Engine(registry_address=spec.registry_address, data_address=spec.data_address)
        self.model_ref = f"{spec.model}@{spec.model_version}"
        self.last_parameter_set_id = spec.init_parameter_set
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

    def _run(self) -> int:
        spec = self.spec
        hyperparameters = spec.hyperparameters
        names = {key: getattr(spec, key) or default for key, default in DEFAULT_ARRAY_NAMES.items()}

        self._state(trainer_pb2.LOADING)
        model_version = self.engine.get_model(self.model_ref)
        build_hyperparameters = json_format.MessageToDict(model_version.default_hyperparameters)
        build_hyperparameters.update(json_format.MessageToDict(hyperparameters.model))
        arrays = self.engine.load_dataset(f"{spec.dataset}@{spec.dataset_version}", names=list(names.values()))
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
        )
        del data
        if spec.init_parameter_set:
            initial = self.engine.load_parameter_set(spec.init_parameter_set)
            missing = run.load_arrays(initial, source=f"parameter set {spec.init_parameter_set!r}")
            if missing:
                logger.info("Session %s: parameter set %s has no values for %s; they keep their initial values",
                            spec.session_id, spec.init_parameter_set, ", ".join(missing))
        compile_seconds = run.compile()
        logger.info("Session %s compiled in %.1f s on backend %s", spec.session_id, compile_seconds, spec.backend)

        self._state(
            trainer_pb2.RUNNING,
            compile_seconds=compile_seconds,
            steps_per_epoch=run.steps_per_epoch,
            backend=spec.backend,
        )
        monitor = hyperparameters.monitor or "val_loss"
        best_value: float | None = None
        stopped_midway = False
        for epoch in range(1, hyperparameters.epochs + 1):
            result = run.run_epoch(
                epoch,
                should_stop=self.stop_requested.is_set,
                on_step=self._report_step,
            )
            if result is None:
                stopped_midway = True
                break
            step = result.step
            metrics = {"train_loss": result.train_loss, "val_loss": result.val_loss, **result.metrics}
            parameter_set = self._save(run, epoch=epoch, step=step, metrics=metrics, tags=["latest"])
            value = metrics.get(monitor)
            if value is not None and monitor_improved(monitor, value, best_value):
                best_value = value
                self.engine.tag_parameter_set(parameter_set.id, add=["best"], exclusive_in_session=True)
                self.best_parameter_set_id = parameter_set.id
                self.report(trainer_pb2.WorkerReport(best_parameter_set_id=parameter_set.id))
            self.report(
                trainer_pb2.WorkerReport(
                    epoch_end=trainer_pb2.EpochMetrics(
                        epoch=epoch,
                        step=step,
                        train_loss=result.train_loss,
                        val_loss=result.val_loss,
                        metrics=result.metrics,
                        parameter_set_id=parameter_set.id,
                        epoch_seconds=result.epoch_seconds,
                        examples_per_second=result.examples_per_second,
                    )
                )
            )
            if self.stop_requested.is_set():
                break

        if self.stop_requested.is_set():
            # A stop between epochs finds the last epoch stored already; a stop midway stores the
            # steps taken since then, so no training is lost.
            if stopped_midway or not self.last_parameter_set_id or self.last_parameter_set_id == spec.init_parameter_set:
                self._save(run, epoch=run.step // run.steps_per_epoch, step=run.step, metrics={}, tags=["final", "latest"])
            else:
                self.engine.tag_parameter_set(self.last_parameter_set_id, add=["final"], exclusive_in_session=True)
            self._state(trainer_pb2.STOPPED)
            return 0
        self._state(trainer_pb2.COMPLETED)
        return 0

    def _report_step(self, report) -> None:
        self.report(
            trainer_pb2.WorkerReport(
                progress=trainer_pb2.StepProgress(
                    epoch=report.epoch,
                    step=report.step,
                    step_in_epoch=report.step_in_epoch,
                    train_loss=report.train_loss,
                    examples_per_second=report.examples_per_second,
                    learning_rate=report.learning_rate,
                )
            )
        )

    def _save(self, run: SessionRun, *, epoch: int, step: int, metrics: dict, tags: list[str]):
        arrays, roles = run.parameter_arrays()
        parameter_set = self.engine.save_parameter_set(
            self.model_ref,
            arrays,
            roles=roles,
            session_id=self.spec.session_id,
            epoch=epoch,
            step=step,
            metrics=metrics,
            parent_id=self.last_parameter_set_id,
        )
        self.engine.tag_parameter_set(parameter_set.id, add=tags, exclusive_in_session=True)
        logger.info("Session %s saved parameter set %s at epoch %d, step %d", self.spec.session_id, parameter_set.id, epoch, step)
        self.last_parameter_set_id = parameter_set.id
        return parameter_set


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
    channel = rpc.insecure_channel(arguments.trainer)
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

    stop_requested = threading.Event()

    def follow_commands() -> None:
        try:
            for command in commands:
                if command.WhichOneof("command") == "stop":
                    logger.info("Session %s received a stop request", arguments.session_id)
                    stop_requested.set()
        except Exception as error:  # noqa: BLE001 - the trainer went away; stop cleanly
            if not stop_requested.is_set():
                logger.warning("Session %s lost its trainer connection (%s); stopping", arguments.session_id, error)
            stop_requested.set()

    follower = threading.Thread(target=follow_commands, name="worker-commands", daemon=True)
    follower.start()
    exit_code = Worker(first.start, reports.put, stop_requested).run()
    reports.put(_END_OF_REPORTS)
    follower.join(timeout=10)
    channel.close()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
