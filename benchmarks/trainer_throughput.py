"""Trainer throughput: engine overhead, scaling over two CPU devices, and time to first step.

Runs the three services in this process on loopback ports with a temporary data folder, and:

1. in each of several rounds, trains the digits perceptron in an engine session on ``cpu:0``, and
   in a bare pytensor-ml loop (``Model.compile_train`` fed numpy batches, ``bare_loop.py``) with
   the same model, data, batch size and backend, in a process started as a session's is: pinned
   to the same core from its start, one thread per math library. Both sides time their step
   loops, epoch 2 onwards; prints each round and the ratio of the medians (target >= 0.95).
   Also prints the engine session's rate over its whole run, from its first epoch's end to its end,
   which adds what the session does at each epoch's end: validation, saving a parameter set
   to the registry and tagging it;
2. trains two sessions at once on ``cpu:0`` and ``cpu:1``; prints the examples per second of each
   and the ratio of the pair's sum to one session alone (target >= 1.7). Also prints the pair's
   examples per second over the window in which both ran past their first epoch, epoch ends
   included, against one session's whole-run rate;
3. prints the time from the start request to the first finished step with a warm compile cache.

    .venv/bin/python benchmarks/trainer_throughput.py [--rounds 3] [--epochs 20] [--repeat 200]
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

BENCHMARKS = pathlib.Path(__file__).resolve().parent
REPOSITORY_ROOT = BENCHMARKS.parent
COMPILE_CACHE = pathlib.Path(os.environ.get("LASAGNE_ENGINE_COMPILE_CACHE", REPOSITORY_ROOT / ".cache" / "compile-cache"))

from lasagne_engine.compute import compute_environment  # noqa: E402 - sets PyTensor's flags before it loads

os.environ.update(compute_environment(COMPILE_CACHE, backend="default"))

from lasagne_engine.client import Engine  # noqa: E402
from lasagne_engine.client.demo import MODEL_SOURCE, digits_split  # noqa: E402
from lasagne_engine.config import Addresses, Paths  # noqa: E402
from lasagne_engine.stack.serve import build_servers, stop_servers  # noqa: E402
from lasagne_engine.trainer.launcher import limit_threads_to_one_core, pinned_command  # noqa: E402
from lasagne_engine.v1 import trainer_pb2  # noqa: E402

BATCH_SIZE = 64


def steady_examples_per_second(session: trainer_pb2.Session) -> float:
    """Median examples per second over the session's epochs, the first (warm-up) excluded."""
    rates = [epoch.examples_per_second for epoch in session.epochs[1:]] or [session.epochs[0].examples_per_second]
    return statistics.median(rates)


def whole_run_examples_per_second(session: trainer_pb2.Session, first_epoch_end_at: float, ended_at: float) -> float:
    """Examples per second from the end of the first (warm-up) epoch to the end of the session, epoch ends included."""
    steps = session.epochs[-1].step - session.epochs[0].step
    return steps * BATCH_SIZE / (ended_at - first_epoch_end_at)


def record_epoch_ends(engine: Engine, session_id: str, ends: list[tuple[float, int]]) -> None:
    """Append (time, step) at each epoch end of a session until it ends."""
    for event in engine.watch_session(session_id):
        if event.WhichOneof("event") == "epoch_end":
            ends.append((time.perf_counter(), event.epoch_end.step))


def overlap_examples_per_second(ends_per_session: list[list[tuple[float, int]]]) -> float:
    """Examples per second of all sessions together over the window in which every one ran past its first epoch.

    The window runs from the latest first epoch end to the earliest last epoch end. Each
    session's step count at the window's edges is interpolated between its epoch ends.
    """
    start = max(ends[0][0] for ends in ends_per_session)
    stop = min(ends[-1][0] for ends in ends_per_session)
    if stop <= start:
        raise RuntimeError("The sessions did not run at the same time; give them more epochs.")
    total_steps = 0.0
    for ends in ends_per_session:
        times, steps = zip(*ends)
        total_steps += np.interp(stop, times, steps) - np.interp(start, times, steps)
    return total_steps * BATCH_SIZE / (stop - start)


def bare_loop(data_path: pathlib.Path, *, hidden_units: int, epochs: int, core: int) -> float:
    """Run ``bare_loop.py`` pinned to ``core`` as a session process would be; return its examples per second."""
    environment = compute_environment(COMPILE_CACHE, backend="default")
    limit_threads_to_one_core(environment)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCHMARKS), environment.get("PYTHONPATH")]))
    command = pinned_command(sys.executable, core, "bare_loop", [
        "--data", str(data_path), "--hidden-units", str(hidden_units), "--epochs", str(epochs),
        "--batch-size", str(BATCH_SIZE),
    ])
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    if result["cores"] != [core]:
        raise RuntimeError(f"The bare loop ran on cores {result['cores']}, not on core {core} alone.")
    return result["examples_per_second"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="epochs per measurement (default 20)")
    parser.add_argument("--hidden-units", type=int, default=256, help="hidden layer width (default 256)")
    # Short epochs would measure the work at each epoch's end more than the steps: at 480,000
    # examples per second, 10 tiles made an epoch of 30 ms beside about 17 ms of epoch-end work.
    parser.add_argument("--repeat", type=int, default=200,
                        help="tile the training set this many times, for longer epochs (default 200)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="engine and bare measurements, alternating, of which the median counts (default 3)")
    arguments = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        print("This benchmark needs two cores for its scaling part.", file=sys.stderr)
        return 1

    arrays = digits_split()
    # A digits epoch is 22 steps; tiling the training set makes each epoch long enough to time.
    arrays["X_train"] = np.tile(arrays["X_train"], (arguments.repeat, 1))
    arrays["y_train"] = np.tile(arrays["y_train"], arguments.repeat)
    options = {"epochs": arguments.epochs, "batch_size": BATCH_SIZE, "statistics_every_steps": -1,
               "model_hyperparameters": {"hidden_units": arguments.hidden_units}}
    core = sorted(os.sched_getaffinity(0))[0]
    engine_rates, bare_rates, first_step_times, whole_rates = [], [], [], []
    with tempfile.TemporaryDirectory() as home:
        data_path = pathlib.Path(home) / "arrays.npz"
        np.savez(data_path, **arrays)
        os.environ["LASAGNE_ENGINE_CPU_DEVICES"] = "2"
        addresses = Addresses(registry="127.0.0.1:0", data="127.0.0.1:0", trainer="127.0.0.1:0")
        servers = build_servers(["registry", "data", "trainer"], paths=Paths(pathlib.Path(home)), addresses=addresses)
        for server in servers.values():
            server.start()
        engine = Engine(registry_address=servers["registry"].address, data_address=servers["data"].address,
                        trainer_address=servers["trainer"].address)
        try:
            engine.upload_dataset("digits", arrays)
            engine.register_model("mlp", MODEL_SOURCE.read_text())
            # Warms the compile cache for the measured shapes, so that every round starts warm.
            engine.wait_session(engine.start_session("mlp", "digits", device="cpu:0", **{**options, "epochs": 1}).id)

            for round_index in range(arguments.rounds):
                # Alternating which side goes first keeps a slow drift of the machine out of the ratio.
                sides = ["engine", "bare"] if round_index % 2 == 0 else ["bare", "engine"]
                for side in sides:
                    if side == "bare":
                        bare_rates.append(bare_loop(data_path, hidden_units=arguments.hidden_units,
                                                    epochs=arguments.epochs, core=core))
                        continue
                    started = time.perf_counter()
                    session = engine.start_session("mlp", "digits", device="cpu:0", **options)
                    first_step_at = first_epoch_end_at = None
                    for event in engine.watch_session(session.id):
                        kind = event.WhichOneof("event")
                        if kind == "progress" and first_step_at is None:
                            # A session reports its first step as soon as it finishes.
                            first_step_at = time.perf_counter()
                            first_step_times.append(first_step_at - started)
                        elif kind == "epoch_end" and first_epoch_end_at is None:
                            first_epoch_end_at = time.perf_counter()
                    ended_at = time.perf_counter()
                    finished = engine.get_session(session.id)
                    engine_rates.append(steady_examples_per_second(finished))
                    whole_rates.append(whole_run_examples_per_second(finished, first_epoch_end_at, ended_at))
                print(f"round {round_index + 1}: engine {engine_rates[-1]:.0f}, bare {bare_rates[-1]:.0f} examples/s, "
                      f"ratio {engine_rates[-1] / bare_rates[-1]:.3f}", flush=True)

            pair = [engine.start_session("mlp", "digits", device=device, **options) for device in ("cpu:0", "cpu:1")]
            pair_ends: list[list[tuple[float, int]]] = [[] for _ in pair]
            watchers = [threading.Thread(target=record_epoch_ends, args=(engine, session.id, ends))
                        for session, ends in zip(pair, pair_ends)]
            for watcher in watchers:
                watcher.start()
            for watcher in watchers:
                watcher.join()
            finished = [engine.get_session(session.id) for session in pair]
            pair_rates = [steady_examples_per_second(session) for session in finished]
            pair_overlap_rate = overlap_examples_per_second(pair_ends)
        finally:
            engine.close()
            stop_servers(servers, grace_s=1.0)

    engine_rate, bare_rate = statistics.median(engine_rates), statistics.median(bare_rates)
    print(f"model: digits perceptron 64-{arguments.hidden_units}-10, Adam, batch {BATCH_SIZE}, {arguments.epochs} epochs, "
          f"{len(arrays['X_train'])} training examples, default backend, {arguments.rounds} rounds")
    print(f"engine session on cpu:0:        {engine_rate:10.0f} examples/s (median of rounds)")
    print(f"bare pytensor-ml loop, core {core}:  {bare_rate:10.0f} examples/s (median of rounds)")
    print(f"engine / bare:                  {engine_rate / bare_rate:10.3f}  (target >= 0.95)")
    whole_rate = statistics.median(whole_rates)
    print(f"engine, whole run with epoch ends: {whole_rate:7.0f} examples/s, {whole_rate / bare_rate:.3f} of bare")
    print(f"two sessions, cpu:0 and cpu:1:  {pair_rates[0]:10.0f} + {pair_rates[1]:.0f} examples/s")
    print(f"two together / one alone:       {sum(pair_rates) / engine_rate:10.2f}  (target >= 1.7)")
    print(f"two over their shared window:   {pair_overlap_rate:10.0f} examples/s, epoch ends included, "
          f"{pair_overlap_rate / whole_rate:.2f} times one session's whole run")
    print(f"start request to first step:    {statistics.median(first_step_times):10.2f} s (warm compile cache, median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
