import contextlib
import io
import os
import re
import threading
import time

import numpy as np
import pytest

from lasagne_engine.client import FailedPreconditionError, InvalidArgumentError, NotFoundError, ResourceExhaustedError
from lasagne_engine.client.demo import MODEL_SOURCE, digits_split
from lasagne_engine.trainer.devices import cpu_devices
from lasagne_engine.v1 import trainer_pb2
from tests.conftest import Stack
from tests.trainer.test_sessions import wait_for_state

pytestmark = pytest.mark.slow

LONG = 100_000


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory, compile_cache):
    running = Stack(tmp_path_factory.mktemp("control"), compile_cache, devices=cpu_devices(2, memory_budget_bytes=1 << 30))
    running.engine.upload_dataset("digits", digits_split())
    running.engine.register_model("mlp", MODEL_SOURCE.read_text(), default_hyperparameters={"hidden_units": 32})
    yield running
    running.stop()


def stop_all(engine) -> None:
    for session in engine.list_sessions():
        if session.state not in (trainer_pb2.COMPLETED, trainer_pb2.STOPPED, trainer_pb2.FAILED,
                                 trainer_pb2.EARLY_STOPPED, trainer_pb2.INTERRUPTED, trainer_pb2.SUSPENDED):
            engine.stop_session(session.id)
            engine.wait_session(session.id, timeout_s=120)


def wait_devices_free(engine, timeout_s: float = 30.0):
    """Wait until no device has a session, because a device is freed only when its session process exits."""
    deadline = time.monotonic() + timeout_s
    devices = engine.get_devices()
    while any(device.session_ids for device in devices.devices) and time.monotonic() < deadline:
        time.sleep(0.1)
        devices = engine.get_devices()
    return devices


def test_sessions_queue_when_devices_are_busy(two_devices):
    engine = two_devices.engine
    first = engine.start_session("mlp", "digits", epochs=LONG, batch_size=8)
    second = engine.start_session("mlp", "digits", epochs=LONG, batch_size=8)
    third = engine.start_session("mlp", "digits", epochs=1, batch_size=8)
    try:
        wait_for_state(engine, first.id, {trainer_pb2.RUNNING})
        wait_for_state(engine, second.id, {trainer_pb2.RUNNING})

        queued = engine.get_session(third.id)
        devices = engine.get_devices()
        assert queued.state == trainer_pb2.QUEUED
        assert queued.queue_position == 1
        assert list(devices.queued_session_ids) == [third.id]
        by_name = {device.name: device for device in devices.devices}
        assert {by_name["cpu:0"].session_ids[0], by_name["cpu:1"].session_ids[0]} == {first.id, second.id}
        assert by_name["cpu:0"].memory_used_bytes == engine.get_session(by_name["cpu:0"].session_ids[0]).estimated_bytes
        assert by_name["cpu:0"].memory_used_bytes > 0

        engine.stop_session(first.id)
        assert engine.wait_session(third.id, timeout_s=300).state == trainer_pb2.COMPLETED
        assert engine.get_session(third.id).device == engine.get_session(first.id).device
    finally:
        stop_all(engine)

    devices = wait_devices_free(engine)
    assert [device.memory_used_bytes for device in devices.devices] == [0, 0]
    assert all(not device.session_ids for device in devices.devices)


def test_cpu_sessions_are_pinned_to_their_core(two_devices):
    engine = two_devices.engine
    session = engine.start_session("mlp", "digits", epochs=LONG, batch_size=8, device="cpu:1")
    try:
        running = wait_for_state(engine, session.id, {trainer_pb2.RUNNING})

        cores = sorted(os.sched_getaffinity(0))
        assert running.device == "cpu:1"
        assert os.sched_getaffinity(running.pid) == {cores[1 % len(cores)]}
    finally:
        stop_all(engine)


def test_start_rejects_session_larger_than_budget(tmp_path, compile_cache):
    small = Stack(tmp_path, compile_cache, devices=cpu_devices(1, memory_budget_bytes=1 << 20))
    try:
        small.engine.upload_dataset("digits", digits_split())
        small.engine.register_model("mlp", MODEL_SOURCE.read_text())

        with pytest.raises(ResourceExhaustedError, match=r"needs an estimated [\d,]+ bytes.*largest budget is 1,048,576 bytes \(cpu:0, 1,048,576 bytes free now\)"):
            small.engine.start_session("mlp", "digits")
        assert small.engine.list_sessions() == []
    finally:
        small.stop()


def test_start_rejects_unknown_device(two_devices):
    with pytest.raises(NotFoundError, match="No device 'gpu:7'.*cpu:0, cpu:1"):
        two_devices.engine.start_session("mlp", "digits", device="gpu:7")


def test_pause_checkpoint_learning_rate_resume(two_devices):
    engine = two_devices.engine
    session = engine.start_session("mlp", "digits", epochs=LONG, batch_size=8, learning_rate=1e-3)
    try:
        wait_for_state(engine, session.id, {trainer_pb2.RUNNING})

        engine.pause_session(session.id)
        paused = wait_for_state(engine, session.id, {trainer_pb2.PAUSED}, timeout_s=60)
        checkpoint_id = engine.checkpoint_session(session.id)
        checkpoint = engine.get_parameter_set(checkpoint_id)
        time.sleep(1.0)
        still = engine.checkpoint_session(session.id)
        assert engine.get_parameter_set(still).step == checkpoint.step
        assert checkpoint.step >= paused.step
        assert "checkpoint" in checkpoint.tags

        updated = engine.update_hyperparameters(session.id, learning_rate=5e-4)
        change = updated.history[-1]
        assert (change.name, change.old_value, change.new_value) == ("learning_rate", 1e-3, 5e-4)
        assert change.step == checkpoint.step
        assert updated.hyperparameters.learning_rate == 5e-4

        engine.resume_session(session.id)
        wait_for_state(engine, session.id, {trainer_pb2.RUNNING}, timeout_s=60)
        deadline = time.monotonic() + 60
        while engine.get_session(session.id).step <= checkpoint.step and time.monotonic() < deadline:
            time.sleep(0.2)
        assert engine.get_session(session.id).step > checkpoint.step
    finally:
        stop_all(engine)


def test_control_rejects_bad_requests(two_devices):
    engine = two_devices.engine
    session = engine.start_session("mlp", "digits", epochs=1, batch_size=64)
    engine.wait_session(session.id, timeout_s=300)

    with pytest.raises(FailedPreconditionError, match="already completed"):
        engine.pause_session(session.id)
    with pytest.raises(FailedPreconditionError, match="only a paused, suspended or interrupted"):
        engine.resume_session(session.id)
    with pytest.raises(FailedPreconditionError, match="already completed"):
        engine.checkpoint_session(session.id)
    with pytest.raises(InvalidArgumentError, match="learning_rate -0.5"):
        engine.update_hyperparameters(session.id, learning_rate=-0.5)
    with pytest.raises(InvalidArgumentError, match="learning_rate 0"):
        engine.update_hyperparameters(session.id, learning_rate=0)
    with pytest.raises(FailedPreconditionError, match=f"--resume-from {session.last_parameter_set_id}"):
        engine.resume_session(session.id)
    with pytest.raises(NotFoundError):
        engine.pause_session("s-000000000000")


def test_suspend_frees_device_and_resume_continues(two_devices):
    engine = two_devices.engine
    session = engine.start_session("mlp", "digits", epochs=LONG, batch_size=8, device="cpu:0")
    try:
        wait_for_state(engine, session.id, {trainer_pb2.RUNNING})

        engine.pause_session(session.id, release=True)
        wait_for_state(engine, session.id, {trainer_pb2.SUSPENDED}, timeout_s=60)
        assert wait_devices_free(engine).devices[0].memory_used_bytes == 0
        engine.resume_session(session.id)
        wait_for_state(engine, session.id, {trainer_pb2.RUNNING}, timeout_s=120)
        engine.pause_session(session.id, release=True)
        suspended = wait_for_state(engine, session.id, {trainer_pb2.SUSPENDED}, timeout_s=60)
        saved = engine.get_parameter_set(suspended.last_parameter_set_id)

        engine.resume_session(session.id)
        assert engine.get_session(session.id).state in (trainer_pb2.QUEUED, trainer_pb2.PENDING, trainer_pb2.LOADING,
                                                         trainer_pb2.COMPILING, trainer_pb2.RUNNING)
        resumed = wait_for_state(engine, session.id, {trainer_pb2.RUNNING}, timeout_s=120)
        assert resumed.step >= saved.step
        assert resumed.pid != suspended.pid
    finally:
        stop_all(engine)


def final_trainable(engine, session) -> dict[str, np.ndarray]:
    arrays = engine.load_parameter_set(session.last_parameter_set_id)
    roles = {header.name: header.role for header in engine.get_parameter_set(session.last_parameter_set_id).arrays}
    return {name: value for name, value in arrays.items() if roles[name] == "trainable"}


def test_resume_matches_straight_run(two_devices):
    engine = two_devices.engine
    options = {"epochs": 4, "batch_size": 32, "learning_rate": 3e-3, "seed": 7, "statistics_every_steps": -1}
    straight = engine.wait_session(engine.start_session("mlp", "digits", **options).id, timeout_s=300)
    first_half = engine.wait_session(engine.start_session("mlp", "digits", **{**options, "epochs": 2}).id, timeout_s=300)

    resumed = engine.wait_session(
        engine.start_session("mlp", "digits", **options, resume_from=first_half.last_parameter_set_id).id,
        timeout_s=300,
    )

    assert resumed.state == trainer_pb2.COMPLETED, resumed.error
    assert resumed.resumed_from == first_half.last_parameter_set_id
    assert [epoch.epoch for epoch in first_half.epochs] == [1, 2]
    assert [epoch.epoch for epoch in resumed.epochs] == [3, 4]
    steps = [epoch.step for epoch in [*first_half.epochs, *resumed.epochs]]
    assert steps == [epoch.step for epoch in straight.epochs]
    expected, actual = final_trainable(engine, straight), final_trainable(engine, resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_resume_after_stop_matches_straight_run(two_devices):
    engine = two_devices.engine
    options = {"epochs": 60, "batch_size": 32, "learning_rate": 3e-3, "seed": 11, "statistics_every_steps": -1}
    straight = engine.wait_session(engine.start_session("mlp", "digits", **options).id, timeout_s=300)
    interrupted = engine.start_session("mlp", "digits", **options)
    wait_for_state(engine, interrupted.id, {trainer_pb2.RUNNING})
    deadline = time.monotonic() + 120
    while engine.get_session(interrupted.id).step < 3 * straight.steps_per_epoch and time.monotonic() < deadline:
        time.sleep(0.01)

    engine.stop_session(interrupted.id)
    stopped = engine.wait_session(interrupted.id, timeout_s=120)
    assert stopped.state == trainer_pb2.STOPPED, "the session ended before the stop; give it more epochs"
    final_set = engine.get_parameter_set(stopped.last_parameter_set_id)
    resumed = engine.wait_session(
        engine.start_session("mlp", "digits", **options, resume_from=final_set.id).id, timeout_s=300,
    )

    assert resumed.state == trainer_pb2.COMPLETED, resumed.error
    assert resumed.epochs[0].epoch == final_set.step // straight.steps_per_epoch + 1
    steps = [epoch.step for epoch in [*stopped.epochs, *resumed.epochs]]
    assert steps == [epoch.step for epoch in straight.epochs]
    expected, actual = final_trainable(engine, straight), final_trainable(engine, resumed)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_resume_keeps_source_hyperparameters(two_devices):
    engine = two_devices.engine
    source = engine.start_session("mlp", "digits", epochs=LONG, batch_size=8, learning_rate=3e-3, seed=5,
                                  optimizer="sgd", model_hyperparameters={"hidden_units": 32})
    try:
        wait_for_state(engine, source.id, {trainer_pb2.RUNNING})
        engine.update_hyperparameters(source.id, learning_rate=7e-4)
        engine.stop_session(source.id)
        stopped = engine.wait_session(source.id, timeout_s=120)

        resumed = engine.start_session("mlp", "digits", resume_from=stopped.last_parameter_set_id, batch_size=None)
        overridden = engine.start_session("mlp", "digits", resume_from=stopped.last_parameter_set_id,
                                          learning_rate=1e-2, epochs=LONG + 1)

        inherited = resumed.hyperparameters
        assert inherited.learning_rate == 7e-4
        assert inherited.batch_size == 8
        assert inherited.epochs == LONG
        assert inherited.seed == 5
        assert inherited.optimizer == "sgd"
        assert dict(inherited.model) == {"hidden_units": 32}
        assert overridden.hyperparameters.learning_rate == 1e-2
        assert overridden.hyperparameters.epochs == LONG + 1
        assert overridden.hyperparameters.batch_size == 8
    finally:
        stop_all(engine)


def test_early_stopping_and_retention(two_devices):
    engine = two_devices.engine
    session = engine.start_session(
        "mlp", "digits", epochs=50, batch_size=64, optimizer="sgd", learning_rate=1e-12,
        monitor="val_accuracy", early_stopping_patience=2, keep_best=1, keep_latest=1,
    )

    final = engine.wait_session(session.id, timeout_s=300)

    assert final.state == trainer_pb2.EARLY_STOPPED
    assert len(final.epochs) == 3
    remaining = {parameter_set.id for parameter_set in engine.list_parameter_sets(session_id=session.id)}
    assert remaining == {final.best_parameter_set_id, final.last_parameter_set_id}
    assert final.best_parameter_set_id == final.epochs[0].parameter_set_id


def test_non_finite_loss_names_last_good_set(two_devices):
    engine = two_devices.engine
    session = engine.start_session("mlp", "digits", epochs=LONG, batch_size=64, optimizer="sgd", learning_rate=1e-3)
    deadline = time.monotonic() + 300
    while not engine.get_session(session.id).epochs and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.get_session(session.id).epochs, "the session finished no epoch"

    engine.update_hyperparameters(session.id, learning_rate=1e30)
    final = engine.wait_session(session.id, timeout_s=120)

    assert final.state == trainer_pb2.FAILED
    assert re.search(r"step \d+", final.error), final.error
    assert final.last_parameter_set_id
    assert f"the last good parameter set is {final.last_parameter_set_id}" in final.error
    good = engine.load_parameter_set(final.last_parameter_set_id)
    assert all(np.isfinite(array).all() for array in good.values())


def test_suspended_session_keeps_array_names_and_stops(two_devices):
    engine = two_devices.engine
    split = digits_split()
    engine.upload_dataset("digits-renamed", {
        "inputs": split["X_train"], "labels": split["y_train"],
        "held_out_inputs": split["X_val"], "held_out_labels": split["y_val"],
    })
    names = {"train_inputs": "inputs", "train_targets": "labels",
             "val_inputs": "held_out_inputs", "val_targets": "held_out_labels"}
    session = engine.start_session("mlp", "digits-renamed", epochs=LONG, batch_size=8, **names)
    try:
        wait_for_state(engine, session.id, {trainer_pb2.RUNNING})
        engine.pause_session(session.id, release=True)
        wait_for_state(engine, session.id, {trainer_pb2.SUSPENDED}, timeout_s=60)

        engine.resume_session(session.id)
        resumed = wait_for_state(engine, session.id, {trainer_pb2.RUNNING, trainer_pb2.FAILED}, timeout_s=120)
        assert resumed.state == trainer_pb2.RUNNING, resumed.error
        assert {key: getattr(resumed, key) for key in names} == names

        engine.pause_session(session.id, release=True)
        suspended = wait_for_state(engine, session.id, {trainer_pb2.SUSPENDED}, timeout_s=60)
        stopped = engine.stop_session(session.id)

        assert stopped.state == trainer_pb2.STOPPED
        assert stopped.last_parameter_set_id == suspended.last_parameter_set_id
        assert "final" in engine.get_parameter_set(suspended.last_parameter_set_id).tags
        with pytest.raises(FailedPreconditionError, match="is stopped"):
            engine.resume_session(session.id)
    finally:
        stop_all(engine)


def test_concurrent_resumes_start_one_process(two_devices):
    engine = two_devices.engine
    session = engine.start_session("mlp", "digits", epochs=LONG, batch_size=8)
    try:
        wait_for_state(engine, session.id, {trainer_pb2.RUNNING})
        engine.pause_session(session.id, release=True)
        wait_for_state(engine, session.id, {trainer_pb2.SUSPENDED}, timeout_s=60)
        wait_devices_free(engine)
        barrier = threading.Barrier(2)
        outcomes = []

        def resume() -> None:
            barrier.wait()
            try:
                engine.resume_session(session.id)
                outcomes.append("resumed")
            except FailedPreconditionError:
                outcomes.append("rejected")

        threads = [threading.Thread(target=resume) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

        assert sorted(outcomes) == ["rejected", "resumed"]
        running = wait_for_state(engine, session.id, {trainer_pb2.RUNNING, trainer_pb2.FAILED}, timeout_s=120)
        assert running.state == trainer_pb2.RUNNING, running.error
        time.sleep(2.0)  # a second process would have attached, been refused and failed the session by now
        assert engine.get_session(session.id).state == trainer_pb2.RUNNING
        holding = [device.name for device in engine.get_devices().devices if session.id in device.session_ids]
        assert len(holding) == 1
    finally:
        stop_all(engine)


def test_interrupted_session_resumes_after_restart(tmp_path, compile_cache):
    devices = cpu_devices(1, memory_budget_bytes=1 << 30)
    first = Stack(tmp_path, compile_cache, devices=devices)
    first.engine.upload_dataset("digits", digits_split())
    first.engine.register_model("mlp", MODEL_SOURCE.read_text(), default_hyperparameters={"hidden_units": 32})
    session = first.engine.start_session("mlp", "digits", epochs=LONG, batch_size=8)
    wait_for_state(first.engine, session.id, {trainer_pb2.RUNNING})
    first.stop()

    second = Stack(tmp_path, compile_cache, devices=devices)
    try:
        interrupted = second.engine.get_session(session.id)
        assert interrupted.state == trainer_pb2.INTERRUPTED
        assert interrupted.last_parameter_set_id
        checkpoint = second.engine.get_parameter_set(interrupted.last_parameter_set_id)

        second.engine.resume_session(session.id)
        resumed = wait_for_state(second.engine, session.id, {trainer_pb2.RUNNING}, timeout_s=120)
        assert resumed.step >= checkpoint.step
    finally:
        stop_all(second.engine)
        second.stop()


def test_parameter_set_in_use_cannot_be_deleted(two_devices):
    engine = two_devices.engine
    seed_session = engine.wait_session(engine.start_session("mlp", "digits", epochs=1, batch_size=64).id, timeout_s=300)
    start_from = seed_session.last_parameter_set_id
    session = engine.start_session("mlp", "digits", epochs=LONG, batch_size=8, init_parameter_set=start_from)
    try:
        wait_for_state(engine, session.id, {trainer_pb2.RUNNING})

        with pytest.raises(FailedPreconditionError, match=session.id):
            engine.delete_parameter_set(start_from)
    finally:
        stop_all(engine)

    engine.delete_parameter_set(start_from)
    assert start_from not in {parameter_set.id for parameter_set in engine.list_parameter_sets()}


def run_cli(arguments: list[str]) -> str:
    """Run one ``lasagne-engine`` command in this process and return what it printed."""
    from lasagne_engine.client.cli import main as cli_main

    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert cli_main(arguments) == 0
    return output.getvalue()


def session_row(listing: str, session_id: str) -> list[str]:
    """Return the cells of one session's row in the ``sessions`` table."""
    rows = [line.split() for line in listing.splitlines() if line.split()[:1] == [session_id]]
    assert len(rows) == 1, listing
    return rows[0]


def test_cli_controls_two_sessions_at_once(two_devices, monkeypatch):
    engine = two_devices.engine
    monkeypatch.setenv("LASAGNE_ENGINE_REGISTRY_ADDRESS", two_devices.registry.address)
    monkeypatch.setenv("LASAGNE_ENGINE_DATA_ADDRESS", two_devices.data.address)
    monkeypatch.setenv("LASAGNE_ENGINE_TRAINER_ADDRESS", two_devices.trainer.address)
    wait_devices_free(engine)
    session_ids = []
    try:
        for device in ("cpu:0", "cpu:1"):
            started = run_cli(["train", "mlp", "digits", "--device", device, "--epochs", str(LONG), "--batch-size", "8"])
            assert started.startswith("started session ")
            assert started.strip().endswith(f"on {device}")
            session_ids.append(started.split()[2])
        first, second = session_ids
        for session_id in session_ids:
            wait_for_state(engine, session_id, {trainer_pb2.RUNNING})

        listing = run_cli(["sessions"])
        for session_id, device in zip(session_ids, ("cpu:0", "cpu:1")):
            row = session_row(listing, session_id)
            assert row[1] == "running"
            assert row[4] == device
        devices = run_cli(["devices"])
        for session_id, device in zip(session_ids, ("cpu:0", "cpu:1")):
            row = [line.split() for line in devices.splitlines() if line.split()[:1] == [device]]
            assert len(row) == 1, devices
            assert row[0][-1] == session_id
            assert int(row[0][3].replace(",", "")) > 0
        waiting = run_cli(["train", "mlp", "digits", "--device", "cpu:0", "--epochs", "1"])
        assert waiting.strip().endswith("queued at position 1, waiting for cpu:0")
        assert "stop requested" in run_cli(["stop", waiting.split()[2]])

        assert f"pause requested for {first}" in run_cli(["pause", first])
        paused = wait_for_state(engine, first, {trainer_pb2.PAUSED}, timeout_s=60)
        assert session_row(run_cli(["sessions"]), first)[1] == "paused"

        changed = run_cli(["set-lr", second, "0.0005"])
        assert changed.startswith(f"{second}: learning rate 0.001 -> 0.0005 at step ")
        assert engine.get_session(second).hyperparameters.learning_rate == pytest.approx(5e-4)

        assert f"resume requested for {first}" in run_cli(["resume", first])
        wait_for_state(engine, first, {trainer_pb2.RUNNING}, timeout_s=60)
        deadline = time.monotonic() + 60
        while engine.get_session(first).step <= paused.step and time.monotonic() < deadline:
            time.sleep(0.2)
        assert engine.get_session(first).step > paused.step

        for session_id in session_ids:
            assert f"stop requested for {session_id}" in run_cli(["stop", session_id])
        finals = [engine.wait_session(session_id, timeout_s=120) for session_id in session_ids]
        assert [final.state for final in finals] == [trainer_pb2.STOPPED] * 2
        listing = run_cli(["sessions"])
        assert [session_row(listing, session_id)[1] for session_id in session_ids] == ["stopped", "stopped"]
    finally:
        stop_all(engine)
