"""Many concurrent clients against one embedded instance: failed calls, lost objects and latencies.

Starts ``lasagne-engine serve all`` in a subprocess on free 127.0.0.1 ports with a fresh data
folder, registers the digits perceptron, and uploads one dataset and one parameter set to read
back. Then ``--clients`` clients, each an ``Engine`` with its own connections, spread over
``--processes`` processes, call the services in a loop for ``--duration-s`` seconds, drawing each
call from a fixed mix:

    list_datasets 20%, describe_dataset 15%, download_array (64 KiB) 20%, upload_dataset (16 KiB) 10%,
    list_parameter_sets 10%, get_model 5%, save_parameter_set (32 KiB) 10%, load_parameter_set 10%

Afterwards every dataset version and parameter set the clients stored is downloaded again and
compared by sha256 with what was sent. Prints p50 and p99 latency per call type and exits 1 if
any call failed or any object is missing or different.

    .venv/bin/python benchmarks/load.py                       # 50 clients, 60 s
    .venv/bin/python benchmarks/load.py --clients 4 --duration-s 3 --processes 1
"""

import argparse
import collections
import hashlib
import json
import multiprocessing
import os
import pathlib
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

CALL_MIX = {
    "list_datasets": 20,
    "describe_dataset": 15,
    "download_array": 20,
    "upload_dataset": 10,
    "list_parameter_sets": 10,
    "get_model": 5,
    "save_parameter_set": 10,
    "load_parameter_set": 10,
}
MODEL_SOURCE = pathlib.Path(__file__).resolve().parents[1] / "clients" / "examples" / "digits_mlp.py"
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sha256_hex(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def start_instance(home: pathlib.Path) -> tuple[subprocess.Popen, dict[str, str]]:
    from lasagne_engine import rpc

    addresses = {role: f"127.0.0.1:{free_port()}" for role in ("registry", "data", "trainer")}
    environment = {
        **os.environ,
        "LASAGNE_ENGINE_HOME": str(home),
        "LASAGNE_ENGINE_CONFIG": os.devnull,
        "LASAGNE_ENGINE_METRICS_PORT": "0",
        "LASAGNE_ENGINE_LOG_LEVEL": "WARNING",
        **{f"LASAGNE_ENGINE_{role.upper()}_ADDRESS": address for role, address in addresses.items()},
    }
    log = open(home / "instance.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "lasagne_engine.client.cli", "serve", "all"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=environment,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not all(rpc.is_serving(address, timeout_s=0.5) for address in addresses.values()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"The instance did not start; see {home / 'instance.log'}.")
        time.sleep(0.2)
    return process, addresses


def engine_for(addresses: dict[str, str]):
    from lasagne_engine.client import Engine

    return Engine(
        registry_address=addresses["registry"],
        data_address=addresses["data"],
        trainer_address=addresses["trainer"],
        token="",
        config_path=os.devnull,
        timeout_s=120,
    )


def seed_instance(addresses: dict[str, str]) -> dict:
    """Register the model and store what the clients read: returns the references they use."""
    rng = np.random.default_rng(0)
    with engine_for(addresses) as engine:
        engine.register_model("digits", MODEL_SOURCE.read_text())
        dataset = engine.upload_dataset("seed", {"x": rng.standard_normal(16384).astype(np.float32)})
        parameter_set = engine.save_parameter_set("digits", {"w": rng.standard_normal(8192).astype(np.float32)})
    return {"dataset": f"{dataset.name}@{dataset.version}", "parameter_set": parameter_set.id}


def run_client(client_index: int, addresses: dict, seeded: dict, duration_s: float, seed: int) -> dict:
    """Call the services in a loop until ``duration_s`` passes; return latencies, failures and stored objects."""
    rng = random.Random(seed * 1000 + client_index)
    arrays_rng = np.random.default_rng(seed * 1000 + client_index)
    names, weights = zip(*CALL_MIX.items())
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    failures: list[str] = []
    stored_datasets: dict[str, str] = {}
    stored_parameter_sets: dict[str, str] = {}

    with engine_for(addresses) as engine:
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            call = rng.choices(names, weights)[0]
            started = time.perf_counter()
            try:
                if call == "list_datasets":
                    engine.list_datasets()
                elif call == "describe_dataset":
                    engine.describe_dataset(seeded["dataset"])
                elif call == "download_array":
                    engine.download_array(seeded["dataset"], "x")
                elif call == "upload_dataset":
                    array = arrays_rng.standard_normal(4096).astype(np.float32)
                    version = engine.upload_dataset(f"load-{client_index}", {"x": array})
                    stored_datasets[f"{version.name}@{version.version}"] = sha256_hex(array)
                elif call == "list_parameter_sets":
                    engine.list_parameter_sets("digits")
                elif call == "get_model":
                    engine.get_model("digits@1")
                elif call == "save_parameter_set":
                    array = arrays_rng.standard_normal(8192).astype(np.float32)
                    saved = engine.save_parameter_set("digits", {"w": array}, session_id=f"load-{client_index}")
                    stored_parameter_sets[saved.id] = sha256_hex(array)
                elif call == "load_parameter_set":
                    engine.load_parameter_set(seeded["parameter_set"])
            except Exception as error:  # noqa: BLE001 - every failure is counted and reported
                failures.append(f"{call}: {type(error).__name__}: {error}")
                continue
            latencies[call].append(time.perf_counter() - started)

    return {
        "latencies": dict(latencies),
        "failures": failures,
        "datasets": stored_datasets,
        "parameter_sets": stored_parameter_sets,
    }


def run_process(first_client: int, clients: int, addresses: dict, seeded: dict, duration_s: float, seed: int, results):
    """Run ``clients`` clients as threads of this process and put their merged results on ``results``."""
    outcomes = [None] * clients

    def target(position: int) -> None:
        outcomes[position] = run_client(first_client + position, addresses, seeded, duration_s, seed)

    threads = [threading.Thread(target=target, args=(position,)) for position in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(outcomes)


def verify(addresses: dict, datasets: dict[str, str], parameter_sets: dict[str, str]) -> list[str]:
    """Download every stored object again and return a line for each one that is missing or different."""
    problems = []
    with engine_for(addresses) as engine:
        listed = {f"{d.name}@{d.version}" for name in {ref.split("@")[0] for ref in datasets}
                  for d in engine.list_datasets(name)}
        for ref, digest in datasets.items():
            if ref not in listed:
                problems.append(f"dataset {ref} is not listed")
            elif sha256_hex(engine.download_array(ref, "x")) != digest:
                problems.append(f"dataset {ref} has other bytes than were uploaded")
        listed_sets = {parameter_set.id for parameter_set in engine.list_parameter_sets("digits")}
        for set_id, digest in parameter_sets.items():
            if set_id not in listed_sets:
                problems.append(f"parameter set {set_id} is not listed")
            elif sha256_hex(engine.load_parameter_set(set_id)["w"]) != digest:
                problems.append(f"parameter set {set_id} has other bytes than were saved")
    return problems


def percentile_ms(values: list[float], percentile: float) -> float:
    return float(np.percentile(np.array(values) * 1000, percentile)) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--duration-s", type=float, default=60.0, help="seconds the clients run (default 60)")
    parser.add_argument("--processes", type=int, default=2, help="client processes the clients are spread over (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the call mix and the arrays (default 0)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the figures to this file")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lasagne-load-") as scratch:
        home = pathlib.Path(scratch)
        instance, addresses = start_instance(home)
        try:
            seeded = seed_instance(addresses)
            context = multiprocessing.get_context("spawn")
            results = context.Queue()
            per_process = [len(part) for part in np.array_split(np.arange(arguments.clients), arguments.processes)]
            processes, first = [], 0
            for clients in per_process:
                process = context.Process(
                    target=run_process,
                    args=(first, clients, addresses, seeded, arguments.duration_s, arguments.seed, results),
                )
                process.start()
                processes.append(process)
                first += clients
            outcomes = [outcome for _ in processes for outcome in results.get()]
            for process in processes:
                process.join()

            latencies: dict[str, list[float]] = collections.defaultdict(list)
            failures, datasets, parameter_sets = [], {}, {}
            for outcome in outcomes:
                for call, values in outcome["latencies"].items():
                    latencies[call].extend(values)
                failures.extend(outcome["failures"])
                datasets.update(outcome["datasets"])
                parameter_sets.update(outcome["parameter_sets"])
            problems = verify(addresses, datasets, parameter_sets)
        finally:
            instance.terminate()
            instance.wait(timeout=60)

    total = sum(len(values) for values in latencies.values())
    print(f"{arguments.clients} clients in {arguments.processes} processes for {arguments.duration_s:.0f} s, "
          f"{os.cpu_count()} cores: {total} calls ({total / arguments.duration_s:.0f}/s), {len(failures)} failed")
    print(f"{'call':<22}{'calls':>8}{'p50 ms':>10}{'p99 ms':>10}")
    figures = {}
    for call in CALL_MIX:
        values = latencies.get(call, [])
        figures[call] = {"calls": len(values), "p50_ms": percentile_ms(values, 50), "p99_ms": percentile_ms(values, 99)}
        print(f"{call:<22}{len(values):>8}{figures[call]['p50_ms']:>10.1f}{figures[call]['p99_ms']:>10.1f}")
    print(f"stored and verified: {len(datasets)} dataset versions, {len(parameter_sets)} parameter sets; "
          f"{len(problems)} missing or different")
    for line in [*failures[:20], *problems[:20]]:
        print(f"  {line}")
    if arguments.json:
        arguments.json.write_text(json.dumps(
            {"calls": figures, "failed": len(failures), "problems": problems, "total": total}, indent=2
        ))
    return 1 if failures or problems else 0


if __name__ == "__main__":
    sys.exit(main())
