import json
import os
import pathlib
import subprocess
import sys

import pytest

from lasagne_engine.trainer import devices
from lasagne_engine.trainer.devices import backend_for, cpu_devices, discover_devices, discover_gpus, estimate_session_bytes
from lasagne_engine.trainer.launcher import LaunchRequest, LocalLauncher, limit_threads_to_one_core, pinned_command


@pytest.fixture
def no_nvidia_smi(monkeypatch):
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)


def test_visible_gpus_become_devices(monkeypatch, no_nvidia_smi):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setenv("LASAGNE_ENGINE_GPU_MEMORY_BYTES", str(80 << 30))
    monkeypatch.setenv("LASAGNE_ENGINE_GPU_RESERVE_BYTES", str(2 << 30))

    found = discover_gpus()

    assert [device.name for device in found] == ["gpu:2", "gpu:3"]
    assert all(device.kind == "gpu" for device in found)
    assert found[0].memory_budget_bytes == 78 << 30
    assert found[0].cpu_core is None


NVIDIA_SMI_LISTING = """0, GPU-0b6c3f1e-aaaa-bbbb-cccc-000000000000, 81559
1, GPU-9d2e7a40-aaaa-bbbb-cccc-111111111111, 40960
"""


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """Put an ``nvidia-smi`` on PATH that prints a two-GPU memory listing, as the real one's CSV query does."""
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{NVIDIA_SMI_LISTING}EOF\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LASAGNE_ENGINE_GPU_RESERVE_BYTES", "0")


def test_nvidia_smi_gpus_by_index(monkeypatch, fake_nvidia_smi):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    found = discover_gpus()

    assert [device.name for device in found] == ["gpu:0", "gpu:1"]
    assert [device.memory_budget_bytes for device in found] == [81559 << 20, 40960 << 20]


def test_gpus_named_by_uuid_get_their_memory(monkeypatch, fake_nvidia_smi):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-9d2e7a40-aaaa-bbbb-cccc-111111111111")

    found = discover_gpus()

    assert [device.name for device in found] == ["gpu:GPU-9d2e7a40-aaaa-bbbb-cccc-111111111111"]
    assert found[0].memory_budget_bytes == 40960 << 20


@pytest.mark.parametrize("visible", ["", "-1"], ids=["empty", "minus-one"])
def test_hidden_gpus_fall_back_to_cpus(monkeypatch, no_nvidia_smi, visible):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setenv("LASAGNE_ENGINE_CPU_DEVICES", "3")
    monkeypatch.setenv("LASAGNE_ENGINE_CPU_DEVICE_MEMORY_BYTES", str(1 << 30))

    found = discover_devices()

    assert [device.name for device in found] == ["cpu:0", "cpu:1", "cpu:2"]
    assert {device.memory_budget_bytes for device in found} == {1 << 30}
    assert all(device.cpu_core is not None for device in found)


def test_cpu_device_count_must_be_positive(monkeypatch, no_nvidia_smi):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("LASAGNE_ENGINE_CPU_DEVICES", "0")

    with pytest.raises(ValueError, match="LASAGNE_ENGINE_CPU_DEVICES=0"):
        discover_devices()


@pytest.mark.parametrize(
    ("device", "configured", "expected"),
    [("gpu:0", "auto", "jax"), ("cpu:1", "auto", "default"), ("cpu:0", "jax", "jax"), ("gpu:1", "default", "default")],
)
def test_backend_for_device(device, configured, expected):
    assert backend_for(device, configured) == expected


def test_backend_setting_is_checked():
    with pytest.raises(ValueError, match="LASAGNE_ENGINE_BACKEND='cuda'"):
        backend_for("gpu:0", "cuda")


def launch_request(device: str, cpu_core: int | None) -> LaunchRequest:
    return LaunchRequest(session_id="s-1", token="secret", trainer_address="127.0.0.1:1", device=device,
                         backend=backend_for(device), working_dir=pathlib.Path("/tmp"), cpu_core=cpu_core)


def test_gpu_session_sees_only_its_gpu(tmp_path):
    launcher = LocalLauncher(compile_cache=tmp_path)

    environment = launcher.environment(launch_request("gpu:3", None))

    assert environment["CUDA_VISIBLE_DEVICES"] == "3"
    assert environment["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "mode=JAX" in environment["PYTENSOR_FLAGS"]
    assert environment["LASAGNE_ENGINE_WORKER_TOKEN"] == "secret"
    assert "-m" in launcher.command(launch_request("gpu:3", None))


def test_cpu_session_is_pinned_and_sees_no_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-sessions")
    launcher = LocalLauncher(compile_cache=tmp_path)
    request = launch_request("cpu:1", 1)

    environment = launcher.environment(request)
    command = launcher.command(request)

    assert environment["CUDA_VISIBLE_DEVICES"] == ""
    assert environment["JAX_PLATFORMS"] == "cpu"
    assert environment["OMP_NUM_THREADS"] == "1"
    assert "mode=JAX" not in environment["PYTENSOR_FLAGS"]
    assert "AWS_SECRET_ACCESS_KEY" not in environment
    assert command[1] == "-c"
    assert "sched_setaffinity" in command[2]
    assert command[3] == "1"


THREAD_AFFINITIES = """
import json, os, sys
import numpy
# Every thread of the process, numpy's math library pool included.
cores = {tid: sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}
print(json.dumps({"argv": sys.argv[1:], "cores": cores, "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS")}))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity needs Linux")
def test_pinned_command_pins_every_thread(tmp_path):
    (tmp_path / "thread_affinities.py").write_text(THREAD_AFFINITIES)
    core = max(os.sched_getaffinity(0))
    environment = {**os.environ, "PYTHONPATH": str(tmp_path)}
    limit_threads_to_one_core(environment)

    completed = subprocess.run(
        pinned_command(sys.executable, core, "thread_affinities", ["--flag", "value"]),
        env=environment, capture_output=True, text=True, timeout=60, check=True,
    )
    reported = json.loads(completed.stdout)

    assert reported["argv"] == ["--flag", "value"]
    assert reported["blas_threads"] == "1"
    assert set(map(tuple, reported["cores"].values())) == {(core,)}


def test_estimate_counts_optimizer_slots():
    common = {"dataset_bytes": 1000, "parameter_bytes": 100, "batch_size": 10, "example_bytes": 4, "output_bytes": 4}

    sgd = estimate_session_bytes(optimizer="sgd", **common)
    adam = estimate_session_bytes(optimizer="adam", **common)

    assert adam - sgd == 200
    assert sgd > 1000 + 100


def test_cpu_devices_cycle_over_cores():
    made = cpu_devices(5, memory_budget_bytes=1)

    assert [device.name for device in made] == [f"cpu:{index}" for index in range(5)]
    assert len({device.cpu_core for device in made}) == min(5, len(__import__("os").sched_getaffinity(0)))
