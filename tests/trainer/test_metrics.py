"""TrainerMetrics fed with reports by hand, each test on its own registry, and over real HTTP."""

import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from lasagne_engine.trainer.metrics import STATE_NAMES, STEP_DURATION_BUCKETS_S, TrainerMetrics
from lasagne_engine.trainer.server import start_metrics
from lasagne_engine.v1 import trainer_pb2
from tests.conftest import free_port

LABELS = {"session": "s-1", "model": "mlp", "device": "cpu:0"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics(registry, clock) -> TrainerMetrics:
    return TrainerMetrics(registry, retention_s=60.0, clock=clock)


def make_session(state=trainer_pb2.RUNNING, *, session_id="s-1", device="cpu:0", **fields) -> trainer_pb2.Session:
    return trainer_pb2.Session(
        id=session_id,
        model="mlp",
        device=device,
        state=state,
        hyperparameters=trainer_pb2.Hyperparameters(epochs=5, learning_rate=0.01, batch_size=32),
        **fields,
    )


def progress(epoch=1, step=10, *, step_seconds=(), train_loss=0.5) -> trainer_pb2.WorkerReport:
    return trainer_pb2.WorkerReport(
        progress=trainer_pb2.StepProgress(
            epoch=epoch,
            step=step,
            step_in_epoch=step,
            train_loss=train_loss,
            examples_per_second=1200.0,
            learning_rate=0.005,
            step_seconds=list(step_seconds),
        )
    )


def epoch_end(epoch=1, step=44) -> trainer_pb2.WorkerReport:
    return trainer_pb2.WorkerReport(
        epoch_end=trainer_pb2.EpochMetrics(
            epoch=epoch,
            step=step,
            train_loss=0.4,
            val_loss=0.3,
            metrics={"val_accuracy": 0.9},
            parameter_set_id="ps-1",
            epoch_seconds=2.5,
            examples_per_second=1100.0,
        )
    )


def statistics(step=50, names=("hidden_W", "hidden_b")) -> trainer_pb2.WorkerReport:
    return trainer_pb2.WorkerReport(
        parameter_statistics=trainer_pb2.ParameterStatistics(
            step=step,
            parameters=[
                trainer_pb2.ParameterStatistic(
                    name=name, layer=name.rsplit("_", 1)[0], l2_norm=2.0 + i, mean=0.1, std=0.3,
                    gradient_l2_norm=0.02, update_ratio=0.001,
                )
                for i, name in enumerate(names)
            ],
        )
    )


def sample(registry, name, **labels):
    """Return the value of a session's sample, or None when it is not exported."""
    return registry.get_sample_value(name, {**LABELS, **labels})


def trainer_sample(registry, name, **labels):
    return registry.get_sample_value(name, labels)


def family_names(registry) -> set[str]:
    return {family.name for family in registry.collect()}


class TestSessionSeries:
    def test_state_is_one_hot(self, metrics, registry):
        metrics.session_updated(make_session(trainer_pb2.COMPILING))

        for state in STATE_NAMES:
            expected = 1.0 if state == "compiling" else 0.0
            assert sample(registry, "lasagne_engine_session_state", state=state) == expected
        assert sample(registry, "lasagne_engine_session_planned_epochs") == 5
        assert trainer_sample(registry, "lasagne_engine_trainer_live_sessions") == 1

    def test_progress_sets_gauges(self, metrics, registry):
        session = make_session()
        metrics.session_updated(session)

        metrics.session_report(session, progress(epoch=2, step=60, train_loss=0.25))

        assert sample(registry, "lasagne_engine_session_epoch") == 2
        assert sample(registry, "lasagne_engine_session_steps_total") == 60
        assert sample(registry, "lasagne_engine_session_train_loss") == 0.25
        assert sample(registry, "lasagne_engine_session_examples_per_second") == 1200.0
        assert sample(registry, "lasagne_engine_session_learning_rate") == 0.005

    def test_learning_rate_from_hyperparameters(self, metrics, registry):
        metrics.session_updated(make_session(trainer_pb2.PENDING))

        assert sample(registry, "lasagne_engine_session_learning_rate") == 0.01

    def test_losses_absent_before_reports(self, metrics, registry):
        metrics.session_updated(make_session(trainer_pb2.LOADING))

        assert sample(registry, "lasagne_engine_session_train_loss") is None
        assert sample(registry, "lasagne_engine_session_val_loss") is None
        assert sample(registry, "lasagne_engine_session_examples_per_second") is None

    def test_step_seconds_fill_histogram(self, metrics, registry):
        session = make_session()
        durations = [0.0002, 0.0004, 0.003, 0.2]

        metrics.session_report(session, progress(step_seconds=durations[:2]))
        metrics.session_report(session, progress(step_seconds=durations[2:]))

        name = "lasagne_engine_session_step_duration_seconds"
        assert sample(registry, f"{name}_count") == 4
        assert sample(registry, f"{name}_sum") == pytest.approx(sum(durations))
        for bound in STEP_DURATION_BUCKETS_S:
            expected = sum(1 for duration in durations if duration <= bound)
            assert sample(registry, f"{name}_bucket", le=str(bound)) == expected, bound
        assert sample(registry, f"{name}_bucket", le="+Inf") == 4

    def test_epoch_end_sets_validation_metrics(self, metrics, registry):
        session = make_session()

        metrics.session_report(session, epoch_end(epoch=3, step=132))

        assert sample(registry, "lasagne_engine_session_val_loss") == 0.3
        assert sample(registry, "lasagne_engine_session_val_accuracy") == 0.9
        assert sample(registry, "lasagne_engine_session_epoch_train_loss") == 0.4
        assert sample(registry, "lasagne_engine_session_epoch_duration_seconds") == 2.5
        assert sample(registry, "lasagne_engine_session_epoch") == 3
        assert sample(registry, "lasagne_engine_session_steps_total") == 132

    def test_metric_names_sanitized(self, metrics, registry):
        session = make_session()
        report = epoch_end()
        report.epoch_end.metrics["val_top-5.accuracy"] = 0.99

        metrics.session_report(session, report)

        assert sample(registry, "lasagne_engine_session_val_top_5_accuracy") == 0.99

    def test_other_reports_ignored(self, metrics, registry):
        session = make_session()

        metrics.session_report(session, trainer_pb2.WorkerReport(best_parameter_set_id="ps-1"))

        assert sample(registry, "lasagne_engine_session_state", state="running") == 1.0


class TestParameterSeries:
    def test_statistics_per_parameter(self, metrics, registry):
        session = make_session()

        metrics.session_report(session, statistics(step=50))

        expected = {
            "lasagne_engine_parameter_l2_norm": 2.0,
            "lasagne_engine_parameter_mean": 0.1,
            "lasagne_engine_parameter_standard_deviation": 0.3,
            "lasagne_engine_parameter_gradient_l2_norm": 0.02,
            "lasagne_engine_parameter_update_ratio": 0.001,
        }
        for name, value in expected.items():
            assert sample(registry, name, layer="hidden", param="hidden_W") == value, name
        assert sample(registry, "lasagne_engine_parameter_l2_norm", layer="hidden", param="hidden_b") == 3.0
        assert sample(registry, "lasagne_engine_parameter_statistics_step") == 50

    def test_new_statistics_replace_old(self, metrics, registry):
        session = make_session()
        metrics.session_report(session, statistics(names=("old_W",)))

        metrics.session_report(session, statistics(step=100, names=("new_W",)))

        assert sample(registry, "lasagne_engine_parameter_l2_norm", layer="old", param="old_W") is None
        assert sample(registry, "lasagne_engine_parameter_l2_norm", layer="new", param="new_W") == 2.0

    def test_layer_labels_only_on_parameters(self, metrics, registry):
        session = make_session()
        metrics.session_report(session, progress(step_seconds=[0.001]))
        metrics.session_report(session, epoch_end())
        metrics.session_report(session, statistics())

        for family in registry.collect():
            for metric_sample in family.samples:
                has_parameter_labels = {"layer", "param"} & set(metric_sample.labels)
                if family.name.startswith("lasagne_engine_parameter_") and family.name != "lasagne_engine_parameter_statistics_step":
                    assert has_parameter_labels == {"layer", "param"}, metric_sample
                else:
                    assert not has_parameter_labels, metric_sample


class TestDeviceSeries:
    def test_devices_replace(self, metrics, registry):
        metrics.devices_updated([
            trainer_pb2.Device(name="gpu:0", memory_budget_bytes=8 << 30, memory_used_bytes=1 << 30, session_ids=["s-1", "s-2"]),
            trainer_pb2.Device(name="gpu:1", memory_budget_bytes=8 << 30),
        ])
        metrics.devices_updated([trainer_pb2.Device(name="gpu:0", memory_budget_bytes=8 << 30, memory_used_bytes=2 << 30)])

        assert registry.get_sample_value("lasagne_engine_device_memory_budget_bytes", {"device": "gpu:0"}) == 8 << 30
        assert registry.get_sample_value("lasagne_engine_device_memory_used_bytes", {"device": "gpu:0"}) == 2 << 30
        assert registry.get_sample_value("lasagne_engine_device_sessions", {"device": "gpu:0"}) == 0
        assert registry.get_sample_value("lasagne_engine_device_memory_budget_bytes", {"device": "gpu:1"}) is None


class TestRetention:
    def feed(self, metrics, session):
        metrics.session_updated(session)
        metrics.session_report(session, progress(step_seconds=[0.001]))
        metrics.session_report(session, epoch_end())
        metrics.session_report(session, statistics())

    def test_ended_session_kept_then_dropped(self, metrics, registry, clock):
        session = make_session()
        self.feed(metrics, session)

        session.state = trainer_pb2.COMPLETED
        metrics.session_ended(session)
        clock.now += 59.0

        assert sample(registry, "lasagne_engine_session_state", state="completed") == 1.0
        assert sample(registry, "lasagne_engine_session_val_loss") == 0.3
        assert sample(registry, "lasagne_engine_session_examples_per_second") is None
        assert trainer_sample(registry, "lasagne_engine_trainer_live_sessions") == 0

        clock.now += 1.0
        exposed = [
            metric_sample
            for family in registry.collect()
            for metric_sample in family.samples
            if metric_sample.labels.get("session") == "s-1"
        ]
        assert exposed == []

    def test_dead_process_series_dropped(self, metrics, registry, clock):
        session = make_session()
        self.feed(metrics, session)

        session.state = trainer_pb2.FAILED
        session.error = "The session process ended with signal SIGKILL before the session finished."
        metrics.session_ended(session)
        clock.now += 60.0
        metrics.expire()

        assert sample(registry, "lasagne_engine_session_state", state="failed") is None
        assert sample(registry, "lasagne_engine_session_step_duration_seconds_count") is None
        assert sample(registry, "lasagne_engine_parameter_l2_norm", layer="hidden", param="hidden_W") is None
        assert trainer_sample(registry, "lasagne_engine_trainer_sessions_ended_total", state="failed") == 1

    def test_ended_counters_start_at_zero(self, registry, metrics):
        for state in ("completed", "stopped", "early_stopped", "failed", "interrupted"):
            assert trainer_sample(registry, "lasagne_engine_trainer_sessions_ended_total", state=state) == 0, state

    def test_final_state_update_ends(self, metrics, registry, clock):
        metrics.session_updated(make_session(trainer_pb2.INTERRUPTED))
        metrics.session_ended(make_session(trainer_pb2.INTERRUPTED))
        clock.now += 60.0

        assert sample(registry, "lasagne_engine_session_state", state="interrupted") is None
        assert trainer_sample(registry, "lasagne_engine_trainer_sessions_ended_total", state="interrupted") == 1

    def test_resumed_session_stays(self, metrics, registry, clock):
        metrics.session_ended(make_session(trainer_pb2.INTERRUPTED))
        clock.now += 30.0
        metrics.session_updated(make_session(trainer_pb2.PENDING))
        clock.now += 60.0

        assert sample(registry, "lasagne_engine_session_state", state="pending") == 1.0

    def test_device_change_moves_histogram(self, metrics, registry):
        metrics.session_report(make_session(device="cpu:0"), progress(step_seconds=[0.001]))

        metrics.session_report(make_session(device="cpu:1"), progress(step_seconds=[0.002]))

        name = "lasagne_engine_session_step_duration_seconds_count"
        assert sample(registry, name) is None
        assert sample(registry, name, device="cpu:1") == 1

    def test_negative_retention_rejected(self, registry):
        with pytest.raises(ValueError, match=r"retention_s=-1\.0 must be a number of seconds, 0 or more"):
            TrainerMetrics(registry, retention_s=-1.0)


class TestHttpEndpoint:
    def test_metrics_served(self, metrics):
        session = make_session()
        metrics.session_updated(session)
        metrics.session_report(session, progress(step_seconds=[0.001]))
        port = metrics.start_http_server(0)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                text = response.read().decode()
        finally:
            metrics.close()

        families = {family.name: family for family in text_string_to_metric_families(text)}
        assert families["lasagne_engine_session_steps"].type == "counter"
        assert families["lasagne_engine_session_step_duration_seconds"].type == "histogram"
        train_loss = families["lasagne_engine_session_train_loss"].samples
        assert [(s.labels, s.value) for s in train_loss] == [(LABELS, 0.5)]

    def test_default_registry_has_process_metrics(self):
        metrics = TrainerMetrics()

        names = family_names(metrics.registry)

        assert "process_cpu_seconds" in names
        assert "lasagne_engine_trainer_live_sessions" in names

    def test_second_server_rejected(self, metrics):
        port = metrics.start_http_server(0)
        try:
            with pytest.raises(RuntimeError, match=f"already listens on port {port}"):
                metrics.start_http_server(0)
        finally:
            metrics.close()


class TestStartMetrics:
    def test_port_zero_disables(self):
        assert start_metrics("127.0.0.1:50153", port=0) is None

    def test_environment_sets_port(self, monkeypatch):
        port = free_port()
        monkeypatch.setenv("LASAGNE_ENGINE_METRICS_PORT", str(port))
        monkeypatch.setenv("LASAGNE_ENGINE_METRICS_RETENTION_S", "12.5")

        metrics = start_metrics("127.0.0.1:50153")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                text = response.read().decode()
        finally:
            metrics.close()

        assert "lasagne_engine_trainer_live_sessions 0.0" in text
        assert metrics.retention_s == 12.5

    def test_busy_port_rejected(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]

            with pytest.raises(OSError, match=f"Could not serve trainer metrics on 127.0.0.1:{port} .*set LASAGNE_ENGINE_METRICS_PORT"):
                start_metrics("127.0.0.1:50153", port=port)

    def test_invalid_port_setting(self, monkeypatch):
        monkeypatch.setenv("LASAGNE_ENGINE_METRICS_PORT", "metrics")

        with pytest.raises(ValueError, match="Environment variable LASAGNE_ENGINE_METRICS_PORT='metrics' is not a valid int"):
            start_metrics("127.0.0.1:50153")

    def test_port_out_of_range(self):
        with pytest.raises(ValueError, match="Metrics port 70000 is out of range; use 1 to 65535"):
            start_metrics("127.0.0.1:50153", port=70000)
