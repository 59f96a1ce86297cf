import io
import os
import subprocess
import sys

import pytest

from lasagne_engine.client import Engine
from lasagne_engine.v1 import trainer_pb2
from tests.conftest import free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def cli_environment(tmp_path, compile_cache):
    environment = dict(os.environ)
    environment.update(
        LASAGNE_ENGINE_HOME=str(tmp_path / "home"),
        LASAGNE_ENGINE_COMPILE_CACHE=str(compile_cache),
        LASAGNE_ENGINE_REGISTRY_ADDRESS=f"127.0.0.1:{free_port()}",
        LASAGNE_ENGINE_DATA_ADDRESS=f"127.0.0.1:{free_port()}",
        LASAGNE_ENGINE_TRAINER_ADDRESS=f"127.0.0.1:{free_port()}",
    )
    yield environment
    subprocess.run([sys.executable, "-m", "lasagne_engine.client.cli", "down"], env=environment, check=False, timeout=60)


def cli(environment, *arguments, timeout_s=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lasagne_engine.client.cli", *arguments],
        env=environment, capture_output=True, text=True, timeout=timeout_s, check=False,
    )


def engine_for(environment) -> Engine:
    return Engine(
        registry_address=environment["LASAGNE_ENGINE_REGISTRY_ADDRESS"],
        data_address=environment["LASAGNE_ENGINE_DATA_ADDRESS"],
        trainer_address=environment["LASAGNE_ENGINE_TRAINER_ADDRESS"],
    )


def test_demo_reaches_accuracy_and_survives_restart(cli_environment):
    demo = cli(cli_environment, "demo")

    assert demo.returncode == 0, demo.stdout + demo.stderr
    last_line = demo.stdout.strip().splitlines()[-1]
    assert last_line.startswith("validation accuracy: ")
    assert float(last_line.split(": ")[1]) >= 0.95
    assert "epoch  20/20" in demo.stdout

    with engine_for(cli_environment) as engine:
        before = {
            "datasets": [(d.name, d.version) for d in engine.list_datasets()],
            "models": [(m.name, m.version) for m in engine.list_models()],
            "parameter_sets": sorted(p.id for p in engine.list_parameter_sets()),
            "sessions": [(s.id, s.state) for s in engine.list_sessions()],
        }
    assert cli(cli_environment, "down").returncode == 0
    assert cli(cli_environment, "status").returncode == 1
    assert cli(cli_environment, "up").returncode == 0

    with engine_for(cli_environment) as engine:
        after = {
            "datasets": [(d.name, d.version) for d in engine.list_datasets()],
            "models": [(m.name, m.version) for m in engine.list_models()],
            "parameter_sets": sorted(p.id for p in engine.list_parameter_sets()),
            "sessions": [(s.id, s.state) for s in engine.list_sessions()],
        }
    assert after == before
    assert before["sessions"][0][1] == trainer_pb2.COMPLETED
    assert len(before["parameter_sets"]) == 20


def test_demo_path_in_process(stack):
    from lasagne_engine.client.demo import run_demo

    output = io.StringIO()
    best = run_demo(stack.engine, epochs=20, stream=output)

    assert "epoch  20/20" in output.getvalue()
    environment = dict(os.environ)
    environment.update(
        LASAGNE_ENGINE_REGISTRY_ADDRESS=stack.registry.address,
        LASAGNE_ENGINE_DATA_ADDRESS=stack.data.address,
        LASAGNE_ENGINE_TRAINER_ADDRESS=stack.trainer.address,
    )
    evaluated = cli(environment, "evaluate", best, "digits")
    assert evaluated.returncode == 0, evaluated.stderr
    results = dict(item.split("=") for item in evaluated.stdout.split())
    stored = stack.engine.get_parameter_set(best)
    assert float(results["accuracy"]) == pytest.approx(stored.metrics["val_accuracy"], abs=1e-6)
    assert float(results["accuracy"]) >= 0.95

    version = stack.engine.describe_dataset("digits").version
    again = io.StringIO()
    run_demo(stack.engine, epochs=1, stream=again)
    assert f"dataset digits@{version} (unchanged)" in again.getvalue()
    assert stack.engine.describe_dataset("digits").version == version
