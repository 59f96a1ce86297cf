"""Cost of metrics: training steps per second with metrics on, against metrics switched off.

"On" means per-parameter statistics at the trainer's default cadence (every 50 steps) and a
trainer serving Prometheus metrics. "Off" means statistics turned off and no metrics endpoint.
Progress reports, which ``lasagne-engine watch`` needs, are sent either way. One run measures
two models, the demo's digits perceptron and a small convolutional network
(benchmarks/models/small_cnn.py) on the same digits as 1x8x8 images, in two ways.

1. Session loop. In this process, pinned to one core, two compiled sessions of the same model
   train in alternating epochs and build the reports a session process sends: one without
   statistics, one with statistics at every step. Their steps per second give the cost of one
   step with statistics, and so the steps per second at the default cadence. Measuring at every
   step makes the cost fifty times larger than the noise of a busy machine, and alternating every
   few milliseconds puts any change in the machine's speed on both sides.
2. Whole system. The services run in this process with two trainers, one serving metrics,
   which this script scrapes once a second (Prometheus's default is every 15 s, so this is the
   harsher case), and one without. Each round starts a real session on each trainer, pinned to
   the same core, pauses both once they run and resumes them together, so they share the core
   while they train. The cores alternate between rounds.

Steps per second comes from each epoch's examples per second (validation and checkpoints
excluded), without a session's first epoch. A side's figure is the median over its epochs, and
a ratio is on / off.

    .venv/bin/python benchmarks/metrics_cost.py

The first run compiles each model twice with Numba (with and without statistics outputs), which
takes several minutes; the compile cache in .cache/compile-cache makes later runs start fast.
"""

import argparse
import os
import pathlib
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent
COMPILE_CACHE = pathlib.Path(os.environ.get("LASAGNE_ENGINE_COMPILE_CACHE", REPOSITORY_ROOT / ".cache" / "compile-cache"))
CNN_SOURCE = REPOSITORY_ROOT / "benchmarks" / "models" / "small_cnn.py"
SCRAPE_EVERY_S = 1.0
TARGET_RATIO = 0.97
# The trainer's default cadence of per-parameter statistics, in steps.
DEFAULT_CADENCE = 50
MODES = ("off", "on")
WAIT_TIMEOUT_S = 3600.0


def _prepare_environment() -> None:
    from lasagne_engine.compute import compute_environment

    # PyTensor reads its flags at import, and the session processes inherit this environment.
    os.environ.update(compute_environment(COMPILE_CACHE, backend="default"))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Services:
    """Registry, data service, and a trainer with metrics and one without, each with devices cpu:0 and cpu:1."""

    def __init__(self, home: pathlib.Path):
        from lasagne_engine import rpc
        from lasagne_engine.client import Engine
        from lasagne_engine.data_service import add_data_service
        from lasagne_engine.model_registry import add_model_registry
        from lasagne_engine.trainer import add_trainer
        from lasagne_engine.trainer.devices import cpu_devices

        self.registry = rpc.Server("127.0.0.1:0")
        add_model_registry(self.registry, root=home / "registry", compile_cache=COMPILE_CACHE)
        self.data = rpc.Server("127.0.0.1:0")
        add_data_service(self.data, root=home / "data")
        self.metrics_port = _free_port()
        self.trainers = {}
        self.servicers = {}
        for mode in MODES:
            server = rpc.Server("127.0.0.1:0")
            self.servicers[mode] = add_trainer(
                server,
                root=home / f"trainer-{mode}",
                registry_address=self.registry.address,
                data_address=self.data.address,
                compile_cache=COMPILE_CACHE,
                devices=cpu_devices(2, memory_budget_bytes=4 << 30),
                backend="default",
                metrics_port=self.metrics_port if mode == "on" else 0,
            )
            self.trainers[mode] = server
        for server in (self.registry, self.data, *self.trainers.values()):
            server.start()
        self.engines = {
            mode: Engine(registry_address=self.registry.address, data_address=self.data.address,
                         trainer_address=server.address)
            for mode, server in self.trainers.items()
        }

    def stop(self) -> None:
        for mode, engine in self.engines.items():
            engine.close()
            manager = self.servicers[mode].manager
            manager.close()
            if manager.metrics is not None:
                manager.metrics.close()
        for server in (*self.trainers.values(), self.data, self.registry):
            server.stop(grace_s=1.0)


class Scraper(threading.Thread):
    """Fetches /metrics every second, as a busy Prometheus would."""

    def __init__(self, port: int):
        super().__init__(name="scraper", daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.stopped = threading.Event()
        self.scrapes = 0
        self.last_text = ""

    def run(self) -> None:
        while not self.stopped.wait(SCRAPE_EVERY_S):
            with urllib.request.urlopen(self.url, timeout=10) as response:
                self.last_text = response.read().decode()
            self.scrapes += 1

    def parameter_series(self, session_id: str) -> int:
        """Count the per-parameter L2 norm series of a session in the latest scrape."""
        return sum(
            1 for line in self.last_text.splitlines()
            if line.startswith("lasagne_engine_parameter_l2_norm{") and f'session="{session_id}"' in line
        )


def _wait_for_state(engine, session_id: str, states: set[int]):
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while time.monotonic() < deadline:
        session = engine.get_session(session_id)
        if session.state in states:
            return session
        time.sleep(0.05)
    raise RuntimeError(f"Session {session_id} did not reach {states} within {WAIT_TIMEOUT_S} s.")


def run_pair(services: Services, model: str, dataset: str, *, cores: dict[str, int], epochs: int, batch_size: int):
    """Run a session on each trainer at once, aligned by a pause; return the final sessions by mode."""
    from lasagne_engine.v1 import trainer_pb2

    started = {}
    for mode in MODES:
        started[mode] = services.engines[mode].start_session(
            model, dataset, epochs=epochs, batch_size=batch_size, learning_rate=1e-3,
            device=f"cpu:{cores[mode]}",
            # 0 takes the trainer's default cadence; a negative value turns statistics off.
            statistics_every_steps=0 if mode == "on" else -1,
        )
    for mode in MODES:
        # The first session to compile waits here for the other, which compiles at the same time.
        _wait_for_state(services.engines[mode], started[mode].id, {trainer_pb2.RUNNING})
        services.engines[mode].pause_session(started[mode].id)
    for mode in MODES:
        _wait_for_state(services.engines[mode], started[mode].id, {trainer_pb2.PAUSED})
    for mode in MODES:
        services.engines[mode].resume_session(started[mode].id)

    finals = {}
    for mode in MODES:
        final = services.engines[mode].wait_session(started[mode].id, timeout_s=WAIT_TIMEOUT_S)
        if final.state != trainer_pb2.COMPLETED:
            raise RuntimeError(f"Session {final.id} ({mode}, {model}) ended {final.state}: {final.error}")
        finals[mode] = final
    return finals


def session_steps_per_second(session, batch_size: int) -> float:
    """Return the median over every epoch but the first of training steps per second."""
    return statistics.median(epoch.examples_per_second / batch_size for epoch in list(session.epochs)[1:])


def session_loop_rates(source: str, data, *, epochs: int, batch_size: int, core: int) -> dict[str, float]:
    """Return the steps per second of a model's training loop without statistics and with them at every step.

    Both sessions train in this process on one core in alternating epochs, and build the reports a
    session process sends.
    """
    from lasagne_engine.modeldef import build_model
    from lasagne_engine.trainer.training import SessionRun
    from lasagne_engine.v1 import trainer_pb2

    reports = []

    def report_step(report, step_seconds) -> None:
        reports.append(trainer_pb2.WorkerReport(progress=trainer_pb2.StepProgress(
            epoch=report.epoch, step=report.step, step_in_epoch=report.step_in_epoch, train_loss=report.train_loss,
            examples_per_second=report.examples_per_second, learning_rate=report.learning_rate,
            step_seconds=step_seconds,
        )))

    def report_statistics(step, rows) -> None:
        reports.append(trainer_pb2.WorkerReport(parameter_statistics=trainer_pb2.ParameterStatistics(
            step=step, parameters=[trainer_pb2.ParameterStatistic(**row) for row in rows],
        )))

    every_step = {"off": 0, "every step": 1}
    previous_affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        runs = {}
        for side, cadence in every_step.items():
            built = build_model(source, {}, name="benchmark")
            runs[side] = SessionRun(built, data, optimizer="adam", learning_rate=1e-3, batch_size=batch_size, seed=0,
                                    statistics_every_steps=cadence)
            runs[side].compile()
        rates: dict[str, list[float]] = {side: [] for side in every_step}
        for epoch in range(1, epochs + 1):
            for side in (every_step if epoch % 2 else reversed(every_step)):
                result = runs[side].run_epoch(
                    epoch, on_step=report_step, on_statistics=report_statistics if every_step[side] else None
                )
                reports.clear()
                if epoch > 1:
                    rates[side].append(result.examples_per_second / batch_size)
    finally:
        os.sched_setaffinity(0, previous_affinity)
    return {side: statistics.median(values) for side, values in rates.items()}


def steps_per_second_at(cadence: int, off: float, every_step: float) -> float:
    """Return the steps per second with statistics every ``cadence`` steps, from the two measured rates.

    A step with statistics costs ``1 / every_step`` seconds and one without ``1 / off``.
    """
    seconds_off, seconds_with = 1.0 / off, 1.0 / every_step
    return 1.0 / (seconds_off + (seconds_with - seconds_off) / cadence)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlp-epochs", type=int, default=100, help="epochs per perceptron session (default 100)")
    parser.add_argument("--cnn-epochs", type=int, default=30, help="epochs per convolutional session (default 30)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step (default 32)")
    parser.add_argument("--rounds", type=int, default=6, help="pairs of sessions per model (default 6)")
    parser.add_argument("--loop-epochs", type=int, default=60,
                        help="epochs of each side in the session loop measurement (default 60)")
    arguments = parser.parse_args()
    _prepare_environment()

    from lasagne_engine.client.demo import MODEL_SOURCE, digits_split

    arrays = digits_split()
    images = {name: array.reshape(-1, 1, 8, 8) if name.startswith("X_") else array for name, array in arrays.items()}
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"machine: {os.cpu_count()} cores, {memory_gib:.0f} GiB, load average {os.getloadavg()[0]:.1f} at the start; "
          f"{len(arrays['X_train']) // arguments.batch_size} steps per epoch at batch {arguments.batch_size}; "
          "statistics every 50 steps when on", flush=True)

    from lasagne_engine.trainer.training import TrainingData

    loop_ratios = {}
    for label, source, data in (
        ("digits MLP", MODEL_SOURCE.read_text(), arrays),
        ("small CNN", CNN_SOURCE.read_text(), images),
    ):
        training_data = TrainingData(data["X_train"], data["y_train"], data["X_val"], data["y_val"])
        loop = session_loop_rates(source, training_data, epochs=arguments.loop_epochs,
                                  batch_size=arguments.batch_size, core=0)
        on = steps_per_second_at(DEFAULT_CADENCE, loop["off"], loop["every step"])
        loop_ratios[label] = on / loop["off"]
        print(f"{label:10} session loop: off {loop['off']:7.1f} steps/s, statistics every step "
              f"{loop['every step']:7.1f} steps/s, so every {DEFAULT_CADENCE} steps {on:7.1f} steps/s; "
              f"ratio {loop_ratios[label]:.4f}", flush=True)

    with tempfile.TemporaryDirectory() as home:
        services = Services(pathlib.Path(home))
        scraper = Scraper(services.metrics_port)
        scraper.start()
        try:
            engine = services.engines["off"]
            flat = engine.upload_dataset("digits", arrays)
            square = engine.upload_dataset("digits-images", images)
            models = {
                "digits MLP": (engine.register_model("mlp", MODEL_SOURCE.read_text()), flat, arguments.mlp_epochs),
                "small CNN": (engine.register_model("cnn", CNN_SOURCE.read_text()), square, arguments.cnn_epochs),
            }
            ratios: dict[str, list[float]] = {}
            rates: dict[tuple[str, str], list[float]] = {}
            for label, (model, dataset, epochs) in models.items():
                for round_index in range(arguments.rounds):
                    cores = {"on": round_index % 2, "off": round_index % 2}
                    finals = run_pair(
                        services, f"{model.name}@{model.version}", f"{dataset.name}@{dataset.version}",
                        cores=cores, epochs=epochs, batch_size=arguments.batch_size,
                    )
                    pair = {mode: session_steps_per_second(finals[mode], arguments.batch_size) for mode in MODES}
                    for mode in MODES:
                        rates.setdefault((label, mode), []).append(pair[mode])
                    ratios.setdefault(label, []).append(pair["on"] / pair["off"])
                    print(f"{label:10} round {round_index + 1}: off {pair['off']:7.1f} steps/s on core {cores['off']}, "
                          f"on {pair['on']:7.1f} steps/s on core {cores['on']}, ratio {pair['on'] / pair['off']:.3f} "
                          f"({scraper.parameter_series(finals['on'].id)} parameter series scraped)", flush=True)
        finally:
            scraper.stopped.set()
            services.stop()

    print(f"scrapes of /metrics during the run: {scraper.scrapes}; load average at the end {os.getloadavg()[0]:.1f}")
    for label, label_ratios in ratios.items():
        ratio = statistics.median(label_ratios)
        print(f"{label:10}: session loop ratio {loop_ratios[label]:.3f} "
              f"({'meets' if loop_ratios[label] >= TARGET_RATIO else 'misses'} the target {TARGET_RATIO}); "
              f"whole system off {statistics.median(rates[(label, 'off')]):7.1f} steps/s, "
              f"on {statistics.median(rates[(label, 'on')]):7.1f} steps/s, ratio median {ratio:.3f} over "
              f"{len(label_ratios)} rounds, range {min(label_ratios):.3f} to {max(label_ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
