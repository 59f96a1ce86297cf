"""The baseline of the trainer benchmark: a bare pytensor-ml training loop in a process of its own.

``trainer_throughput.py`` starts this module the way the trainer starts a session on a CPU device:
pinned to one core before anything loads, with one thread per math library. Started any other
way, numpy's BLAS threads would spread over every core and the baseline would train on more
cores than the session it is compared with.

    python -m bare_loop --data ARRAYS.npz --hidden-units 256 --epochs 20 --batch-size 64

Prints one JSON line: the median examples per second over epochs 2 and later, and the cores the
process was allowed to run on.
"""

import argparse
import json
import os
import statistics
import time


def train(path: str, *, hidden_units: int, epochs: int, batch_size: int) -> list[float]:
    """Train the digits perceptron on the arrays in ``path``, feeding numpy minibatches; return each epoch's examples per second."""
    import numpy as np
    from pytensor_ml.loss import CrossEntropy
    from pytensor_ml.model import Model
    from pytensor_ml.optim import adam

    from lasagne_engine.client.demo import MODEL_SOURCE
    from lasagne_engine.modeldef import build_model

    with np.load(path) as arrays:
        features, labels = arrays["X_train"], arrays["y_train"]
    built = build_model(MODEL_SOURCE.read_text(), {"hidden_units": hidden_units})
    model = Model(built.output).initialize(seed=0)
    step = model.compile_train(adam(1e-3), CrossEntropy(expect_logits=True))
    steps_per_epoch = len(features) // batch_size
    rates = []
    for epoch in range(epochs):
        order = np.random.default_rng([0, epoch]).permutation(len(features))
        started = time.perf_counter()
        for batch in range(steps_per_epoch):
            rows = order[batch * batch_size : (batch + 1) * batch_size]
            step(features[rows], labels[rows])
        rates.append(steps_per_epoch * batch_size / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help=".npz file with X_train and y_train")
    parser.add_argument("--hidden-units", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    arguments = parser.parse_args()
    rates = train(arguments.data, hidden_units=arguments.hidden_units, epochs=arguments.epochs,
                  batch_size=arguments.batch_size)
    print(json.dumps({"examples_per_second": statistics.median(rates[1:] or rates),
                      "cores": sorted(os.sched_getaffinity(0))}))


if __name__ == "__main__":
    main()
