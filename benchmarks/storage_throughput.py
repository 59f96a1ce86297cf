"""Storage benchmarks: loading a dataset over the network and from the same-host cache, saving and
loading parameter sets, and the data service's peak memory, on the local and the S3 backend.

Every service runs in its own process, started as ``lasagne-engine serve`` would start it, on
127.0.0.1. The S3 backend is moto's S3 server (``moto[server]``), also in its own process, reached
through the minio SDK as a MinIO server would be. Prints one line per figure, the ratios against
the targets, and a JSON summary as the last line.

    .venv/bin/python benchmarks/storage_throughput.py                  # every section, ~10 min
    .venv/bin/python benchmarks/storage_throughput.py --sections network cache

Sections:

- ``network``: load a 1 GiB array from the data service into a preallocated numpy array with
  ``Engine.download_array``, against a bare gRPC stream of the same bytes. The bare stream is a
  minimal server that sends raw 1 MiB chunks to a client that only receives them. Target: at
  least 0.8.
- ``cache``: load the same dataset from a warm :class:`~lasagne_engine.datacache.DatasetCache`
  into memory, against ``numpy.load`` of the cached file. Target: at least 0.7.
- ``parameters``: save and load time of 10 MB and 500 MB parameter sets on both backends.
- ``memory``: peak resident memory (``VmHWM``) of the data service while it stores and then
  serves a 2 GiB dataset, on both backends. Target: under 512 MiB.
"""

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))

from lasagne_engine import rpc  # noqa: E402
from lasagne_engine.client import Engine  # noqa: E402
from lasagne_engine.datacache import DatasetCache  # noqa: E402
from tests.storage.s3_server import ACCESS_KEY, SECRET_KEY, MotoServer, free_port  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
NETWORK_BYTES = 1 * GiB
MEMORY_BYTES = 2 * GiB
MEMORY_ARRAYS = 4
PARAMETER_SET_BYTES = (10 * 1000**2, 500 * 1000**2)
REPEATS = 3
BARE_OPTIONS = [("grpc.max_receive_message_length", 16 << 20)]
TARGETS = {"network": 0.8, "cache": 0.7, "memory_mib": 512}

BARE_SERVER = r"""
import sys
from concurrent import futures
import grpc
import numpy as np

total_bytes, chunk_bytes, port_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
# The same bytes the data service serves: a float32 ramp, as the benchmark uploads it.
payload = np.arange(total_bytes // 4, dtype=np.float32).view(np.uint8)

def stream(request, context):
    for offset in range(0, total_bytes, chunk_bytes):
        yield bytes(payload[offset : offset + chunk_bytes].data)

handler = grpc.method_handlers_generic_handler(
    "bench.Bare", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
)
options = [("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)]
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
with open(port_file, "w") as file:
    file.write(str(port))
server.wait_for_termination()
"""


class Service:
    """One ``lasagne-engine serve ROLE`` process on a free port of 127.0.0.1."""

    def __init__(self, role: str, home: pathlib.Path, environment: dict[str, str]):
        self.role = role
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        variable = {"registry": "LASAGNE_ENGINE_REGISTRY_ADDRESS", "data": "LASAGNE_ENGINE_DATA_ADDRESS"}[role]
        self.log = open(home / f"{role}.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lasagne_engine.client.cli", "--home", str(home), "serve", role],
            env={**os.environ, **environment, variable: self.address, "LASAGNE_ENGINE_LOG_LEVEL": "WARNING"},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while not rpc.is_serving(self.address, timeout_s=1.0):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"The {role} service did not start; see {home / f'{role}.log'}.")
            time.sleep(0.2)

    def peak_rss_bytes(self) -> int:
        """Return the process's peak resident memory, VmHWM in /proc."""
        for line in pathlib.Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM is missing from /proc; this benchmark needs Linux.")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def service_environment(home: pathlib.Path, s3: MotoServer | None) -> dict[str, str]:
    """Settings of a service process: an empty config file, and the blob store of the backend."""
    environment = {"LASAGNE_ENGINE_CONFIG": str(home / "config.toml")}
    if s3 is not None:
        environment.update(
            {
                "LASAGNE_ENGINE_BLOB_URL": f"s3://bench-{home.name.lower().replace('_', '-')}/engine",
                "LASAGNE_ENGINE_S3_ENDPOINT": f"http://{s3.endpoint}",
                "MINIO_ROOT_USER": ACCESS_KEY,
                "MINIO_ROOT_PASSWORD": SECRET_KEY,
            }
        )
    return environment


def client(service: Service, **addresses: str) -> Engine:
    role_address = {f"{service.role}_address": service.address}
    defaults = {"registry_address": "127.0.0.1:1", "data_address": "127.0.0.1:1", "trainer_address": "127.0.0.1:1"}
    return Engine(**{**defaults, **addresses, **role_address}, timeout_s=600, config_path=os.devnull)


def ramp(total_bytes: int) -> np.ndarray:
    return np.arange(total_bytes // 4, dtype=np.float32)


def best_seconds(run, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


# Sections ------------------------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """Return the user and system CPU time a process has used, from /proc."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sha256_seconds_per_gib() -> float:
    """Return the CPU seconds hashlib's sha256 takes per GiB in 1 MiB updates, on one core."""
    chunk = np.random.default_rng(0).bytes(MiB)
    digest = hashlib.sha256()
    started = time.process_time()
    for _ in range(256):
        digest.update(chunk)
    return (time.process_time() - started) * 4


def bench_network(scratch: pathlib.Path) -> dict:
    """Alternate engine and bare downloads, so that both see the same load on a shared machine.

    Besides the wall time, each download records the CPU time of the serving process and of this
    client process. On a machine whose cores the bare stream already keeps busy, the ratio of the
    two sides' CPU time bounds how close the engine can come to the bare stream.
    """
    import grpc

    home = scratch / "network"
    home.mkdir()
    service = Service("data", home, service_environment(home, None))
    bare = BareServer(scratch)
    runs = {"engine": [], "bare": []}
    allocating_times = []
    try:
        with client(service) as engine, grpc.insecure_channel(bare.address, options=BARE_OPTIONS) as channel:
            engine.upload_dataset("bench", {"X": ramp(NETWORK_BYTES)})
            out = np.empty(NETWORK_BYTES // 4, dtype=np.float32)
            out.fill(0)
            stream = channel.unary_stream("/bench.Bare/Stream")

            def receive() -> None:
                received = sum(len(chunk) for chunk in stream(b"", timeout=600))
                assert received == NETWORK_BYTES

            sides = {
                "engine": (lambda: engine.download_array("bench@1", "X", out=out), service.process.pid),
                "bare": (receive, bare.process.pid),
            }
            for _ in range(REPEATS):
                for side, (download, server_pid) in sides.items():
                    server_started, client_started = process_cpu_seconds(server_pid), time.process_time()
                    seconds = best_seconds(download, repeats=1)
                    runs[side].append({
                        "seconds": seconds,
                        "server_cpu_s": process_cpu_seconds(server_pid) - server_started,
                        "client_cpu_s": time.process_time() - client_started,
                    })
            allocating_times.append(best_seconds(lambda: engine.load_dataset("bench@1"), repeats=1))
            assert np.array_equal(out[-3:], ramp(NETWORK_BYTES)[-3:])
    finally:
        bare.stop()
        service.stop()

    gib = NETWORK_BYTES / GiB
    result = {"bytes": NETWORK_BYTES, "cpus": len(os.sched_getaffinity(0)), "sha256_s_per_gib": sha256_seconds_per_gib()}
    for side, side_runs in runs.items():
        fastest = min(side_runs, key=lambda run: run["seconds"])
        result[f"{side}_gb_per_s"] = NETWORK_BYTES / fastest["seconds"] / 1e9
        result[f"{side}_server_cpu_s_per_gib"] = fastest["server_cpu_s"] / gib
        result[f"{side}_client_cpu_s_per_gib"] = fastest["client_cpu_s"] / gib
        result[f"{side}_cores_busy"] = (fastest["server_cpu_s"] + fastest["client_cpu_s"]) / fastest["seconds"]
    result["engine_allocating_gb_per_s"] = NETWORK_BYTES / min(allocating_times) / 1e9
    result["ratio"] = result["engine_gb_per_s"] / result["bare_gb_per_s"]
    cpu = {side: result[f"{side}_server_cpu_s_per_gib"] + result[f"{side}_client_cpu_s_per_gib"] for side in runs}
    result["cpu_ratio"] = cpu["bare"] / cpu["engine"]
    print(
        f"network: engine {result['engine_gb_per_s']:.3f} GB/s into a preallocated array "
        f"({result['engine_allocating_gb_per_s']:.3f} GB/s with load_dataset allocating), "
        f"bare gRPC {result['bare_gb_per_s']:.3f} GB/s, ratio {result['ratio']:.2f} (target >= {TARGETS['network']})"
    )
    for side in runs:
        print(
            f"network CPU per GiB, {side}: server {result[f'{side}_server_cpu_s_per_gib']:.2f} s + client "
            f"{result[f'{side}_client_cpu_s_per_gib']:.2f} s = {cpu[side]:.2f} s; "
            f"{result[f'{side}_cores_busy']:.2f} of {result['cpus']} cores busy"
        )
    print(
        f"network CPU, bare / engine: {result['cpu_ratio']:.2f}; sha256 alone takes "
        f"{result['sha256_s_per_gib']:.2f} s per GiB on one core, and the engine hashes every byte twice"
    )
    return result


class BareServer:
    """The bare gRPC server of :data:`BARE_SERVER` in its own process."""

    def __init__(self, scratch: pathlib.Path):
        port_file = scratch / "bare.port"
        self.process = subprocess.Popen(
            [sys.executable, "-c", BARE_SERVER, str(NETWORK_BYTES), str(MiB), str(port_file)]
        )
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("The bare gRPC server did not start.")
            time.sleep(0.1)
        self.address = f"127.0.0.1:{port_file.read_text()}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def bench_cache(scratch: pathlib.Path) -> dict:
    home = scratch / "cache"
    home.mkdir()
    service = Service("data", home, service_environment(home, None))
    cache = DatasetCache(home / "dataset-cache")
    try:
        with client(service) as engine:
            engine.upload_dataset("bench", {"X": ramp(NETWORK_BYTES)})
            started = time.perf_counter()
            cache.load(engine, "bench@1")
            fill_s = time.perf_counter() - started
            path = cache.path_of(engine.describe_dataset("bench@1").arrays[0].sha256)

            cache_s = best_seconds(lambda: cache.load(engine, "bench@1", mmap=False))
            mapped_s = best_seconds(lambda: np.array(cache.load(engine, "bench@1")["X"]))
    finally:
        service.stop()
    numpy_s = best_seconds(lambda: np.load(path))

    result = {
        "bytes": NETWORK_BYTES,
        "fill_gb_per_s": NETWORK_BYTES / fill_s / 1e9,
        "cache_gb_per_s": NETWORK_BYTES / cache_s / 1e9,
        "cache_mmap_copy_gb_per_s": NETWORK_BYTES / mapped_s / 1e9,
        "numpy_gb_per_s": NETWORK_BYTES / numpy_s / 1e9,
    }
    result["ratio"] = result["cache_gb_per_s"] / result["numpy_gb_per_s"]
    print(
        f"cache: first fill {result['fill_gb_per_s']:.3f} GB/s; warm load {result['cache_gb_per_s']:.3f} GB/s "
        f"(memory-mapped, then copied: {result['cache_mmap_copy_gb_per_s']:.3f} GB/s), numpy.load "
        f"{result['numpy_gb_per_s']:.3f} GB/s, ratio {result['ratio']:.2f} (target >= {TARGETS['cache']})"
    )
    return result


def bench_parameters(scratch: pathlib.Path, s3: MotoServer) -> dict:
    source = (REPOSITORY_ROOT / "clients" / "examples" / "digits_mlp.py").read_text()
    results = {}
    for backend in ("local", "s3"):
        home = scratch / f"parameters_{backend}"
        home.mkdir()
        service = Service("registry", home, service_environment(home, s3 if backend == "s3" else None))
        try:
            with client(service) as engine:
                engine.register_model("digits", source)
                for total_bytes in PARAMETER_SET_BYTES:
                    arrays = {"W": ramp(total_bytes - 4000), "b": np.ones(1000, dtype=np.float32)}
                    saved = []
                    save_s = best_seconds(lambda: saved.append(engine.save_parameter_set("digits", arrays)))
                    load_s = best_seconds(lambda: engine.load_parameter_set(saved[-1].id))
                    key = f"{backend}_{total_bytes // 1000**2}MB"
                    results[key] = {"save_s": save_s, "load_s": load_s}
                    print(f"parameters: {backend:5s} {total_bytes / 1e6:6.0f} MB  save {save_s:6.2f} s  load {load_s:6.2f} s")
                    for parameter_set in saved:
                        engine.delete_parameter_set(parameter_set.id)
        finally:
            service.stop()
    return results


def bench_memory(scratch: pathlib.Path, s3: MotoServer) -> dict:
    results = {}
    array_bytes = MEMORY_BYTES // MEMORY_ARRAYS
    arrays = {f"X{index}": ramp(array_bytes) + index for index in range(MEMORY_ARRAYS)}
    for backend in ("local", "s3"):
        home = scratch / f"memory_{backend}"
        home.mkdir()
        service = Service("data", home, service_environment(home, s3 if backend == "s3" else None))
        try:
            with client(service) as engine:
                started_rss = service.peak_rss_bytes()
                engine.upload_dataset("big", arrays)
                after_upload = service.peak_rss_bytes()
                out = np.empty(array_bytes // 4, dtype=np.float32)
                started = time.perf_counter()
                for name, array in arrays.items():
                    engine.download_array("big@1", name, out=out)
                    assert out[-1] == array[-1]
                serve_s = time.perf_counter() - started
                peak = service.peak_rss_bytes()
        finally:
            service.stop()
        results[backend] = {
            "startup_mib": started_rss / MiB,
            "after_upload_mib": after_upload / MiB,
            "peak_mib": peak / MiB,
            "serve_gb_per_s": MEMORY_BYTES / serve_s / 1e9,
        }
        print(
            f"memory: {backend:5s} data service peak RSS {peak / MiB:.0f} MiB after storing and serving "
            f"{MEMORY_BYTES / GiB:.0f} GiB ({started_rss / MiB:.0f} MiB at start, {after_upload / MiB:.0f} MiB after "
            f"the upload; served at {results[backend]['serve_gb_per_s']:.3f} GB/s), target < {TARGETS['memory_mib']} MiB"
        )
    return results


def machine() -> dict:
    memory_kib = next(
        int(line.split()[1]) for line in pathlib.Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    model = next(
        (line.split(":", 1)[1].strip() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )
    return {"cpus": os.cpu_count(), "cpu": model, "memory_gib": round(memory_kib / 1024**2, 1), "python": platform.python_version()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections", nargs="+", default=["network", "cache", "parameters", "memory"],
        choices=["network", "cache", "parameters", "memory"], help="sections to run (default: all)",
    )
    parser.add_argument("--scratch", type=pathlib.Path, help="folder for data (default: a temporary folder)")
    arguments = parser.parse_args()

    summary = {"machine": machine()}
    print(f"machine: {summary['machine']}")
    with contextlib.ExitStack() as stack:
        scratch = arguments.scratch or pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory()))
        s3 = None
        if {"parameters", "memory"} & set(arguments.sections):
            s3 = MotoServer(scratch / "moto.log").start()
            stack.callback(s3.stop)
        if "network" in arguments.sections:
            summary["network"] = bench_network(scratch)
        if "cache" in arguments.sections:
            summary["cache"] = bench_cache(scratch)
        if "parameters" in arguments.sections:
            summary["parameters"] = bench_parameters(scratch, s3)
        if "memory" in arguments.sections:
            summary["memory"] = bench_memory(scratch, s3)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
