"""A trainer killed with SIGKILL mid-session, then started again on the same folder."""

import signal
import subprocess
import sys
import time

import pytest

from lasagne_engine.client import Engine
from lasagne_engine.client.demo import MODEL_SOURCE, digits_split
from lasagne_engine.trainer.launcher import LocalLauncher, _is_session_process
from lasagne_engine.v1 import trainer_pb2
from tests.faults.conftest import ServiceProcess
from tests.trainer.test_sessions import wait_for_state

LONG = 100_000


@pytest.fixture
def services(tmp_path, compile_cache, monkeypatch):
    """Registry and data service processes, and a trainer process not yet started, over one home folder."""
    home = tmp_path / "home"
    started = [ServiceProcess("registry", home).start(), ServiceProcess("data", home).start()]
    monkeypatch.setenv("LASAGNE_ENGINE_REGISTRY_ADDRESS", started[0].address)
    monkeypatch.setenv("LASAGNE_ENGINE_DATA_ADDRESS", started[1].address)
    monkeypatch.setenv("LASAGNE_ENGINE_COMPILE_CACHE", str(compile_cache))
    monkeypatch.setenv("LASAGNE_ENGINE_CPU_DEVICES", "1")
    trainer = ServiceProcess("trainer", home)
    started.append(trainer)
    yield started
    for service in started:
        service.stop()


@pytest.mark.slow
def test_killed_trainer_recovers_orphan_checkpoint(services):
    registry, data, trainer = services
    trainer.start()
    engine = Engine(registry_address=registry.address, data_address=data.address,
                    trainer_address=trainer.address, token="")
    try:
        engine.upload_dataset("digits", digits_split())
        engine.register_model("mlp", MODEL_SOURCE.read_text(), default_hyperparameters={"hidden_units": 32})
        session = engine.start_session("mlp", "digits", epochs=LONG, batch_size=8)
        running = wait_for_state(engine, session.id, {trainer_pb2.RUNNING})
        deadline = time.monotonic() + 60
        while engine.get_session(session.id).step < 50 and time.monotonic() < deadline:
            time.sleep(0.1)
        seen = engine.get_session(session.id)
        assert _is_session_process(running.pid, session.id)

        trainer.kill()
        trainer.start()

        deadline = time.monotonic() + 90
        while _is_session_process(running.pid, session.id) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _is_session_process(running.pid, session.id), "the previous run's session process is still alive"
        saved = engine.list_parameter_sets(session_id=session.id)
        assert saved, "the orphaned session process saved no checkpoint"
        latest = max(saved, key=lambda parameter_set: parameter_set.step)
        assert latest.step >= seen.step
        deadline = time.monotonic() + 60
        while engine.get_session(session.id).last_parameter_set_id != latest.id and time.monotonic() < deadline:
            time.sleep(0.2)
        interrupted = engine.get_session(session.id)
        assert interrupted.state == trainer_pb2.INTERRUPTED
        assert interrupted.last_parameter_set_id == latest.id

        engine.resume_session(session.id)
        resumed = wait_for_state(engine, session.id, {trainer_pb2.RUNNING, trainer_pb2.FAILED}, timeout_s=120)
        assert resumed.state == trainer_pb2.RUNNING, resumed.error
        assert resumed.step >= latest.step
        assert resumed.pid != running.pid
        stopped = engine.stop_session(session.id)
        assert engine.wait_session(stopped.id, timeout_s=120).state == trainer_pb2.STOPPED
    finally:
        engine.close()


def fake_session_process(session_id: str) -> subprocess.Popen:
    """Start a process whose command line looks like a session process of ``session_id``, in a group of its own."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    process = subprocess.Popen(
        [sys.executable, "-c", code, "lasagne_engine.trainer.worker", "--session-id", session_id],
        start_new_session=True,
    )
    # Until exec, /proc shows the test's own command line.
    deadline = time.monotonic() + 10
    while not _is_session_process(process.pid, session_id) and time.monotonic() < deadline:
        time.sleep(0.01)
    return process


def test_end_orphan_kills_process_that_stays(tmp_path):
    launcher = LocalLauncher(compile_cache=tmp_path)
    process = fake_session_process("s-0123456789ab")
    try:
        started = time.monotonic()
        launcher.end_orphan("s-0123456789ab", process.pid, timeout_s=1.0)

        assert process.wait(timeout=10) == -signal.SIGKILL
        assert time.monotonic() - started >= 1.0
    finally:
        process.kill()


def test_end_orphan_leaves_other_programs_alone(tmp_path):
    launcher = LocalLauncher(compile_cache=tmp_path)
    process = fake_session_process("s-0123456789ab")
    try:
        launcher.end_orphan("s-ba9876543210", process.pid, timeout_s=1.0)

        assert process.poll() is None
    finally:
        process.kill()
        process.wait(timeout=10)
