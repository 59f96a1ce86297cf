"""Time from a fresh process to the first finished training step, per backend, cold and warm cache.

Each measurement runs in a new process with its own compile cache folder: "cold" starts from an
empty folder, "warm" reuses the folder the cold run filled. The model is the demo's digits
perceptron (64-128-10, Adam, batch 32). Prints one line per measurement and the ratios.

    .venv/bin/python benchmarks/time_to_first_step.py
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from lasagne_engine.compute import compute_environment

CHILD = r"""
import json, time
started = time.perf_counter()
from lasagne_engine.client.demo import MODEL_SOURCE, digits_split
from lasagne_engine.modeldef import build_model
from lasagne_engine.trainer.training import SessionRun, TrainingData
import sys
arrays = digits_split()
data = TrainingData(arrays["X_train"], arrays["y_train"], arrays["X_val"], arrays["y_val"])
built = build_model(MODEL_SOURCE.read_text(), {"hidden_units": 128})
run = SessionRun(built, data, optimizer="adam", learning_rate=1e-3, batch_size=32, seed=0,
                 mode="JAX" if sys.argv[1] == "jax" else None)
imported = time.perf_counter()
compile_seconds = run.compile()
first_step = time.perf_counter()
result = run.run_epoch(1)
epoch_done = time.perf_counter()
print(json.dumps({"import_s": imported - started, "compile_s": compile_seconds,
                  "first_step_s": first_step - started, "epoch_s": epoch_done - first_step,
                  "examples_per_second": result.examples_per_second}))
"""


def measure(backend: str, cache: pathlib.Path) -> dict:
    environment = compute_environment(cache, backend=backend)
    environment.setdefault("JAX_PLATFORMS", "cpu")
    completed = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", CHILD, backend],
        env=environment, capture_output=True, text=True, check=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["default", "jax"])
    arguments = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for backend in arguments.backends:
            cache = pathlib.Path(scratch) / backend
            for temperature in ("cold", "warm"):
                figures = measure(backend, cache)
                results[(backend, temperature)] = figures
                print(f"{backend:8} {temperature}: first step after {figures['first_step_s']:7.2f} s "
                      f"(compile {figures['compile_s']:7.2f} s), then {figures['examples_per_second']:9.0f} examples/s",
                      flush=True)
    if ("default", "cold") in results and ("jax", "cold") in results:
        for temperature in ("cold", "warm"):
            ratio = results[("default", temperature)]["first_step_s"] / results[("jax", temperature)]["first_step_s"]
            print(f"{temperature} cache: default backend takes {ratio:.1f}x the time of JAX to the first step")
        ratio = results[("default", "warm")]["examples_per_second"] / results[("jax", "warm")]["examples_per_second"]
        print(f"steady state: default backend trains at {ratio:.2f}x the examples per second of JAX")
    return 0


if __name__ == "__main__":
    sys.exit(main())
