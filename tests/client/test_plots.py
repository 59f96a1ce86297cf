"""The plot, plot-params and sessions --compare commands, against in-test services."""

import math

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from lasagne_engine.arrays import header_for, iter_chunks
from lasagne_engine.client import cli
from lasagne_engine.client.compare import comparison_rows
from lasagne_engine.client.plots import parameter_histogram_figure, session_figure, weight_array_names
from lasagne_engine.v1 import arrays_pb2, model_registry_pb2, model_registry_pb2_grpc, trainer_pb2, trainer_pb2_grpc

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_session(
    session_id: str, *, epochs: int, rate: float, monitor="val_accuracy", state=trainer_pb2.COMPLETED
) -> trainer_pb2.Session:
    session = trainer_pb2.Session(
        id=session_id,
        model="mlp",
        model_version=1,
        dataset="digits",
        dataset_version=1,
        state=state,
        epoch=epochs,
        step=epochs * 44,
        hyperparameters=trainer_pb2.Hyperparameters(
            optimizer="adam", learning_rate=rate, batch_size=32, epochs=epochs, monitor=monitor
        ),
    )
    for epoch in range(1, epochs + 1):
        session.epochs.append(
            trainer_pb2.EpochMetrics(
                epoch=epoch,
                step=epoch * 44,
                train_loss=2.0 * math.exp(-rate * epoch),
                val_loss=2.0 * math.exp(-rate * epoch) + 0.1,
                metrics={"val_accuracy": 1.0 - math.exp(-rate * epoch)},
                parameter_set_id=f"ps-{session_id}-{epoch}",
                examples_per_second=1000.0 * epoch,
            )
        )
    session.best_parameter_set_id = f"ps-{session_id}-{epochs}"
    return session


def line_data(panel) -> dict[str, list[float]]:
    return {line.get_label(): list(line.get_ydata()) for line in panel.get_lines() if not line.get_label().startswith("_")}


class TestSessionFigure:
    def test_panels_and_curves(self):
        first, second = make_session("s-1", epochs=4, rate=0.5), make_session("s-2", epochs=3, rate=0.2)

        figure = session_figure([first, second])

        loss_panel, accuracy_panel = figure.axes
        assert loss_panel.get_ylabel() == "loss"
        assert accuracy_panel.get_ylabel() == "val_accuracy"
        curves = line_data(loss_panel)
        assert curves["s-1 (mlp@1) train"] == [e.train_loss for e in first.epochs]
        assert curves["s-1 (mlp@1) validation"] == [e.val_loss for e in first.epochs]
        assert curves["s-2 (mlp@1) validation"] == [e.val_loss for e in second.epochs]
        accuracy = line_data(accuracy_panel)
        assert accuracy["s-2 (mlp@1)"] == [e.metrics["val_accuracy"] for e in second.epochs]

    def test_best_epoch_starred(self):
        session = make_session("s-1", epochs=4, rate=0.5)
        session.best_parameter_set_id = "ps-s-1-2"

        figure = session_figure([session])

        stars = [line for line in figure.axes[1].get_lines() if line.get_marker() == "*"]
        assert len(stars) == 1
        assert list(stars[0].get_xdata()) == [2]
        assert list(stars[0].get_ydata()) == [session.epochs[1].metrics["val_accuracy"]]

    def test_sessions_without_epochs_rejected(self):
        with pytest.raises(ValueError, match="No finished epoch to plot in session s-1, s-2"):
            session_figure([trainer_pb2.Session(id="s-1"), trainer_pb2.Session(id="s-2")])


class TestHistogramFigure:
    ARRAYS = {
        "hidden_W": np.random.default_rng(0).normal(0.0, 0.1, size=(64, 16)).astype(np.float32),
        "hidden_b": np.linspace(-1.0, 1.0, 16, dtype=np.float32),
    }

    @staticmethod
    def bar_heights(panel) -> list[float]:
        return [patch.get_height() for patch in panel.patches]

    def test_counts_match_numpy(self):
        figure = parameter_histogram_figure(self.ARRAYS, title="weights", bins=20)

        for panel, (name, values) in zip(figure.axes, self.ARRAYS.items()):
            expected, _ = np.histogram(values.astype(np.float64).ravel(), bins=20)
            assert self.bar_heights(panel) == list(expected), name
            assert panel.get_title().startswith(f"{name} ({'x'.join(map(str, values.shape))})")

    def test_difference_counts_match_numpy(self):
        later = {name: values * 1.5 for name, values in self.ARRAYS.items()}

        figure = parameter_histogram_figure(later, title="change", baseline=self.ARRAYS, bins=10)

        change = later["hidden_W"].astype(np.float64) - self.ARRAYS["hidden_W"].astype(np.float64)
        expected, _ = np.histogram(change.ravel(), bins=10)
        assert self.bar_heights(figure.axes[0]) == list(expected)
        # The change is half of each array, so its L2 norm is half the first one's.
        assert "L2 of change / L2 of first: 0.5" in figure.axes[0].get_title()

    def test_extra_panels_hidden(self):
        arrays = {f"layer{index}_W": np.ones((2, 2)) for index in range(5)}

        figure = parameter_histogram_figure(arrays, title="weights")

        assert [panel.get_visible() for panel in figure.axes] == [True] * 5 + [False] * 3

    def test_shape_mismatch_rejected(self):
        with pytest.raises(ValueError, match=r"Array 'hidden_b' has shape \(16,\) in the first parameter set and \(8,\)"):
            parameter_histogram_figure(
                {"hidden_b": np.zeros(8)}, title="change", baseline={"hidden_b": np.zeros(16)}
            )

    def test_missing_array_rejected(self):
        with pytest.raises(ValueError, match="The first parameter set has no array 'extra_W'"):
            parameter_histogram_figure({"extra_W": np.zeros(2)}, title="change", baseline={"hidden_W": np.zeros(2)})

    def test_weight_arrays_selected(self):
        roles = {"hidden_W": "trainable", "bn_mean": "state", "hidden_W.adam.first_moment": "optimizer", "raw": ""}

        assert weight_array_names(roles) == ["hidden_W", "raw"]


class TestComparisonRows:
    def test_rows_side_by_side(self):
        first = make_session("s-1", epochs=4, rate=0.5)
        second = make_session("s-2", epochs=3, rate=0.2)
        second.hyperparameters.model.update({"hidden_units": 64})
        first.started_at.FromSeconds(1000)
        first.finished_at.FromSeconds(1095)

        rows = {row[0]: row[1:] for row in comparison_rows([first, second], {"mlp@1": {"hidden_units": 128}}, now=2000)}

        assert rows["* learning rate"] == ["0.5", "0.2"]
        assert rows["  optimizer"] == ["adam", "adam"]
        assert rows["* model: hidden_units"] == ["128", "64"]
        assert rows["* epochs"] == ["4/4", "3/3"]
        assert rows["* best val_accuracy"][0] == f"{1 - math.exp(-2.0):.6g} (epoch 4)"
        assert rows["* best val_loss"][1] == f"{2.0 * math.exp(-0.6) + 0.1:.6g} (epoch 3)"
        assert rows["* wall time"] == ["1:35.0", "-"]
        assert rows["* examples/s (mean)"] == ["2,500", "2,000"]

    def test_live_session_wall_time(self):
        session = make_session("s-1", epochs=1, rate=0.1, state=trainer_pb2.RUNNING)
        session.started_at.FromSeconds(1000)

        rows = {row[0].strip(" *"): row[1:] for row in comparison_rows([session, session], {}, now=1000 + 3725)}

        assert rows["wall time"] == ["1:02:05.0", "1:02:05.0"]


class FakeRegistry(model_registry_pb2_grpc.ModelRegistryServicer):
    """Serves parameter sets held in memory, as (metadata, arrays, roles)."""

    def __init__(self, parameter_sets):
        self.parameter_sets = parameter_sets
        self.loaded_names = []

    def _find(self, parameter_set_id, context):
        if parameter_set_id not in self.parameter_sets:
            context.abort(grpc.StatusCode.NOT_FOUND, f"No parameter set {parameter_set_id!r}.")
        return self.parameter_sets[parameter_set_id]

    def GetParameterSet(self, request, context):
        metadata, arrays, roles = self._find(request.id, context)
        result = model_registry_pb2.ParameterSet()
        result.CopyFrom(metadata)
        result.arrays.extend(header_for(name, array, role=roles[name]) for name, array in arrays.items())
        return result

    def LoadParameterSet(self, request, context):
        _, arrays, roles = self._find(request.id, context)
        self.loaded_names.append(list(request.names))
        for name in request.names or arrays:
            yield arrays_pb2.ArrayFrame(header=header_for(name, arrays[name], role=roles[name]))
            for chunk in iter_chunks(arrays[name], 1 << 16):
                yield arrays_pb2.ArrayFrame(chunk=chunk)

    def GetModel(self, request, context):
        defaults = struct_pb2.Struct()
        defaults.update({"hidden_units": 128})
        return model_registry_pb2.ModelVersion(name="mlp", version=1, default_hyperparameters=defaults)


class FakeTrainer(trainer_pb2_grpc.TrainerServicer):
    def __init__(self, sessions):
        self.sessions = {session.id: session for session in sessions}

    def GetSession(self, request, context):
        if request.id not in self.sessions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"No session {request.id!r}.")
        return self.sessions[request.id]


def parameter_set(parameter_set_id: str, scale: float):
    rng = np.random.default_rng(1)
    arrays = {
        "hidden_W": (rng.normal(size=(8, 4)) * scale).astype(np.float32),
        "hidden_b": np.full(4, scale, dtype=np.float32),
        "hidden_W.adam.first_moment": np.zeros((8, 4), dtype=np.float32),
    }
    roles = {"hidden_W": "trainable", "hidden_b": "trainable", "hidden_W.adam.first_moment": "optimizer"}
    metadata = model_registry_pb2.ParameterSet(id=parameter_set_id, model="mlp", model_version=1, epoch=3, step=132,
                                               created_at=timestamp_pb2.Timestamp(seconds=1))
    return metadata, arrays, roles


@pytest.fixture
def services(serve, monkeypatch):
    registry = FakeRegistry({"ps-1": parameter_set("ps-1", 1.0), "ps-2": parameter_set("ps-2", 2.0)})
    trainer = FakeTrainer([make_session("s-1", epochs=4, rate=0.5), make_session("s-2", epochs=3, rate=0.2)])
    address = serve(
        (model_registry_pb2_grpc.add_ModelRegistryServicer_to_server, registry),
        (trainer_pb2_grpc.add_TrainerServicer_to_server, trainer),
    )
    for service in ("REGISTRY", "DATA", "TRAINER"):
        monkeypatch.setenv(f"LASAGNE_ENGINE_{service}_ADDRESS", address)
    return registry, trainer


def read_png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    # The IHDR chunk follows the signature: length, type, then width and height as big-endian ints.
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


class TestCommands:
    def test_plot_writes_png(self, services, tmp_path, capsys):
        out = tmp_path / "curves.png"

        assert cli.main(["plot", "s-1", "s-2", "--out", str(out)]) == 0

        width, height = read_png_size(out)
        assert width > height  # two panels side by side
        assert capsys.readouterr().out.strip() == f"wrote {out}: loss, val_accuracy of 2 sessions"

    def test_plot_params_loads_weights_only(self, services, tmp_path, capsys):
        registry, _ = services
        out = tmp_path / "weights.png"

        assert cli.main(["plot-params", "ps-1", "--out", str(out)]) == 0

        assert registry.loaded_names == [["hidden_W", "hidden_b"]]
        read_png_size(out)
        assert capsys.readouterr().out.strip() == f"wrote {out}: histograms of 2 arrays"

    def test_plot_params_difference(self, services, tmp_path):
        registry, _ = services
        out = tmp_path / "change.png"

        assert cli.main(["plot-params", "ps-1", "ps-2", "--out", str(out), "--bins", "10"]) == 0

        assert len(registry.loaded_names) == 2
        read_png_size(out)

    def test_plot_params_unknown_set(self, services, tmp_path, capsys):
        assert cli.main(["plot-params", "ps-9", "--out", str(tmp_path / "x.png")]) == 2

        assert "No parameter set 'ps-9'." in capsys.readouterr().err

    def test_compare_table(self, services, capsys):
        assert cli.main(["sessions", "--compare", "s-1", "s-2"]) == 0

        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split() == ["s-1", "s-2"]
        assert any(line.split() == ["*", "learning", "rate", "0.5", "0.2"] for line in lines)
        assert any(line.split() == ["model:", "hidden_units", "128", "128"] for line in lines)
        assert lines[-1] == "* differs between the sessions"

    def test_compare_needs_two(self, services):
        with pytest.raises(SystemExit, match="Name at least two sessions to compare"):
            cli.main(["sessions", "--compare", "s-1"])
