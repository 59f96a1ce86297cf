"""Trainer throughput: engine overhead, scaling over two CPU devices, and time to first step.

Runs the three services in this process on loopback ports with a temporary data folder, and:

1. trains the digits perceptron in an engine session on ``cpu:0`` and, in this process pinned to
   the same core, in a bare pytensor-ml loop (``Model.compile_train`` fed numpy batches) with
   the same model, data, batch size and backend; prints both and their ratio (target >= 0.95);
2. trains one session alone on ``cpu:0``, then two at once on ``cpu:0`` and ``cpu:1``; prints the
   examples per second of each and the ratio of the pair's sum to the single one (target >= 1.7);
3. prints the time from the start request to the first finished step with a warm compile cache.

    .venv/bin/python benchmarks/trainer_throughput.py [--epochs 30] [--hidden-units 256]
"""

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent
COMPILE_CACHE = pathlib.Path(os.environ.get("LASAGNE_ENGINE_COMPILE_CACHE", REPOSITORY_ROOT / ".cache" / "compile-cache"))

from lasagne_engine.compute import compute_environment  # noqa: E402 - sets PyTensor's flags before it loads

os.environ.update(compute_environment(COMPILE_CACHE, backend="default"))

from lasagne_engine.client import Engine  # noqa: E402
from lasagne_engine.client.demo import MODEL_SOURCE, digits_split  # noqa: E402
from lasagne_engine.config import Addresses, Paths  # noqa: E402
from lasagne_engine.stack.serve import build_servers, stop_servers  # noqa: E402
from lasagne_engine.v1 import trainer_pb2  # noqa: E402

BATCH_SIZE = 64


def steady_examples_per_second(session: trainer_pb2.Session) -> float:
    """Median examples per second over the session's epochs, the first (warm-up) excluded."""
    rates = [epoch.examples_per_second for epoch in session.epochs[1:]] or [session.epochs[0].examples_per_second]
    return statistics.median(rates)


def bare_loop(arrays: dict, *, hidden_units: int, epochs: int, core: int) -> float:
    """Train with pytensor-ml alone, feeding numpy minibatches; return median examples per second."""
    import numpy as np
    from pytensor_ml.loss import CrossEntropy
    from pytensor_ml.model import Model
    from pytensor_ml.optim import adam

    from lasagne_engine.modeldef import build_model

    # Pinned like a session, then unpinned again: this process also runs the services.
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        return _train_bare(arrays, hidden_units=hidden_units, epochs=epochs)
    finally:
        os.sched_setaffinity(0, previous)


def _train_bare(arrays: dict, *, hidden_units: int, epochs: int) -> float:
    import numpy as np
    from pytensor_ml.loss import CrossEntropy
    from pytensor_ml.model import Model
    from pytensor_ml.optim import adam

    from lasagne_engine.modeldef import build_model

    built = build_model(MODEL_SOURCE.read_text(), {"hidden_units": hidden_units})
    model = Model(built.output).initialize(seed=0)
    step = model.compile_train(adam(1e-3), CrossEntropy(expect_logits=True))
    features, labels = arrays["X_train"], arrays["y_train"]
    steps_per_epoch = len(features) // BATCH_SIZE
    rates = []
    for epoch in range(epochs):
        order = np.random.default_rng([0, epoch]).permutation(len(features))
        started = time.perf_counter()
        for batch in range(steps_per_epoch):
            rows = order[batch * BATCH_SIZE : (batch + 1) * BATCH_SIZE]
            step(features[rows], labels[rows])
        rates.append(steps_per_epoch * BATCH_SIZE / (time.perf_counter() - started))
    return statistics.median(rates[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs per measurement (default 30)")
    parser.add_argument("--hidden-units", type=int, default=256, help="hidden layer width (default 256)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="tile the training set this many times, for longer epochs (default 1)")
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
    with tempfile.TemporaryDirectory() as home:
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
            engine.wait_session(engine.start_session("mlp", "digits", epochs=1, device="cpu:0").id)  # warms the cache

            started = time.perf_counter()
            session = engine.start_session("mlp", "digits", device="cpu:0", **options)
            first_step_s = None
            for event in engine.watch_session(session.id):
                if event.WhichOneof("event") == "progress" and first_step_s is None:
                    first_step_s = time.perf_counter() - started
            alone = engine.get_session(session.id)
            engine_rate = steady_examples_per_second(alone)
            bare_rate = bare_loop(arrays, hidden_units=arguments.hidden_units, epochs=arguments.epochs, core=sorted(os.sched_getaffinity(0))[0])

            pair = [engine.start_session("mlp", "digits", device=device, **options) for device in ("cpu:0", "cpu:1")]
            finished = [engine.wait_session(session.id) for session in pair]
            pair_rates = [steady_examples_per_second(session) for session in finished]
        finally:
            engine.close()
            stop_servers(servers, grace_s=1.0)

    print(f"model: digits perceptron 64-{arguments.hidden_units}-10, Adam, batch {BATCH_SIZE}, {arguments.epochs} epochs, "
          f"{len(arrays['X_train'])} training examples, default backend")
    print(f"engine session on cpu:0:        {engine_rate:10.0f} examples/s")
    print(f"bare pytensor-ml loop, 1 core:  {bare_rate:10.0f} examples/s")
    print(f"engine / bare:                  {engine_rate / bare_rate:10.2f}  (target >= 0.95)")
    print(f"two sessions, cpu:0 and cpu:1:  {pair_rates[0]:10.0f} + {pair_rates[1]:.0f} examples/s")
    print(f"two together / one alone:       {sum(pair_rates) / engine_rate:10.2f}  (target >= 1.7)")
    print(f"start request to first step:    {first_step_s:10.2f} s (warm compile cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
