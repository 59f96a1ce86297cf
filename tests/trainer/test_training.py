import shutil

import numpy as np
import pytest

from lasagne_engine.client.demo import MODEL_SOURCE, digits_split
from lasagne_engine.errors import FailedPrecondition
from lasagne_engine.modeldef import build_model
from lasagne_engine.trainer.training import SessionRun, TrainingData, array_name, check_shapes

NAMES = {"train_inputs": "X_train", "train_targets": "y_train", "val_inputs": "X_val", "val_targets": "y_val"}


def digits_data() -> TrainingData:
    arrays = digits_split()
    return TrainingData(arrays["X_train"], arrays["y_train"], arrays["X_val"], arrays["y_val"])


def new_run(mode=None, **options) -> SessionRun:
    built = build_model(MODEL_SOURCE.read_text(), {"hidden_units": 32})
    settings = {"optimizer": "adam", "learning_rate": 0.01, "batch_size": 64, "seed": 0, **options}
    return SessionRun(built, digits_data(), mode=mode, **settings)


@pytest.mark.slow
def test_step_takes_only_batch_index():
    run = new_run()
    run.compile()

    inputs = [variable for variable in run.train_step.maker.inputs if not variable.shared]

    assert [variable.variable.name for variable in inputs] == ["batch_index"]
    assert inputs[0].variable.type.ndim == 0


@pytest.mark.slow
def test_epoch_reports_first_and_last_step():
    run = new_run()
    run.compile()
    reported = []

    run.run_epoch(1, on_step=lambda report, step_seconds: reported.append((report.step_in_epoch, len(step_seconds))),
                  report_every_s=1e9)

    assert reported == [(1, 1), (run.steps_per_epoch, run.steps_per_epoch - 1)]


@pytest.mark.slow
def test_learning_rate_changes_without_recompiling():
    run = new_run()
    run.compile()
    compiled = run.train_step

    run.set_learning_rate(0.5)
    run.run_epoch(1)

    assert run.train_step is compiled
    assert run.learning_rate.get_value() == pytest.approx(0.5)


def one_step_update(run: SessionRun, start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Set the parameters to ``start``, take the first step of epoch 1 and return each trainable array's change."""
    run.load_arrays(start, source="the test's start values")
    calls = []

    def before_step() -> bool:
        calls.append(None)
        return len(calls) > 1  # let exactly one step run

    assert run.run_epoch(1, before_step=before_step) is None
    after, roles = run.parameter_arrays()
    return {name: after[name] - start[name] for name, role in roles.items() if role == "trainable"}


@pytest.mark.slow
def test_learning_rate_scales_next_update():
    run = new_run(optimizer="sgd", learning_rate=0.01)
    run.compile()
    compiled = run.train_step
    start, _ = run.parameter_arrays()

    small = one_step_update(run, start)
    run.set_learning_rate(0.02)
    large = one_step_update(run, start)

    assert run.train_step is compiled
    assert all(np.abs(change).max() > 0 for change in small.values())
    for name in small:
        np.testing.assert_allclose(large[name], 2 * small[name], rtol=1e-4, atol=1e-7, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [None, "JAX"], ids=["default", "jax"])
def test_backends_learn_digits(mode):
    run = new_run(mode)
    run.compile()

    results = [run.run_epoch(epoch) for epoch in range(1, 6)]

    assert results[-1].metrics["val_accuracy"] > 0.9
    assert results[-1].train_loss < results[0].train_loss
    assert run.step == 5 * run.steps_per_epoch


@pytest.mark.slow
def test_jax_keeps_dataset_on_device():
    import jax

    run = new_run("JAX")
    run.compile()
    run.run_epoch(1)
    data = digits_data()

    for key, variable in run.shared.items():
        stored = variable.container.storage[0]
        assert isinstance(stored, jax.Array), key
        np.testing.assert_array_equal(np.asarray(stored), getattr(data, key))
    order = run.order.container.storage[0]
    assert isinstance(order, jax.Array)
    assert sorted(np.asarray(order).tolist()) == list(range(run.n_train))


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no NVIDIA GPU on this host")
def test_jax_dataset_lives_on_the_gpu():
    run = new_run("JAX")
    run.compile()
    run.run_epoch(1)

    for variable in [*run.shared.values(), run.order]:
        assert {device.platform for device in variable.container.storage[0].devices()} == {"gpu"}, variable.name


@pytest.mark.slow
def test_validation_matches_numpy():
    run = new_run()
    run.compile()
    run.run_epoch(1)
    data = digits_data()

    val_loss, metrics = run.validate()

    weights = {array_name(v.name): v.get_value() for v in run.model.trainable}
    hidden = np.maximum(data.val_inputs @ weights["hidden_W"] + weights["hidden_b"], 0)
    logits = hidden @ weights["logits_W"] + weights["logits_b"]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected_loss = -log_probabilities[np.arange(len(data.val_targets)), data.val_targets].mean()
    expected_accuracy = (logits.argmax(axis=1) == data.val_targets).mean()
    assert val_loss == pytest.approx(expected_loss, rel=1e-4)
    assert metrics["val_accuracy"] == pytest.approx(expected_accuracy)


def test_same_seed_gives_same_order():
    first, second = new_run(), new_run()

    first.shuffle(3)
    second.shuffle(3)

    assert np.array_equal(first.order.get_value(), second.order.get_value())
    second.shuffle(4)
    assert not np.array_equal(first.order.get_value(), second.order.get_value())


def test_check_shapes_names_both_shapes():
    built = build_model(MODEL_SOURCE.read_text(), {})
    data = digits_data()
    data.train_inputs = data.train_inputs[:, :60]

    with pytest.raises(FailedPrecondition, match=r"shape \(60,\).*shape \(64,\)"):
        check_shapes(built, data, names=NAMES)


def test_check_shapes_rejects_labels_out_of_range():
    built = build_model(MODEL_SOURCE.read_text(), {})
    data = digits_data()
    data.val_targets = data.val_targets + 5

    with pytest.raises(FailedPrecondition, match=r"labels from 5 to 14.*0\.\.9"):
        check_shapes(built, data, names=NAMES)


def test_run_rejects_batch_larger_than_data():
    with pytest.raises(FailedPrecondition, match="fewer than one batch of 5000"):
        new_run(batch_size=5000)


def test_array_name_replaces_slashes():
    assert array_name("fc1_W/adam/first_moment") == "fc1_W.adam.first_moment"


@pytest.mark.slow
def test_statistics_follow_cadence_and_interval():
    every_other = new_run(statistics_every_steps=2, statistics_min_interval_s=0.0)
    throttled = new_run(statistics_every_steps=2, statistics_min_interval_s=3600.0)
    every_other.compile()
    throttled.compile()
    seen, seen_throttled = [], []

    every_other.run_epoch(1, on_statistics=lambda step, rows: seen.append((step, rows)))
    throttled.run_epoch(1, on_statistics=lambda step, rows: seen_throttled.append(step))

    assert [step for step, _ in seen] == list(range(2, every_other.steps_per_epoch + 1, 2))
    assert seen_throttled == [2]
    names = {row["name"] for row in seen[0][1]}
    assert names == {"hidden_W", "hidden_b", "logits_W", "logits_b"}
    first = seen[0][1][0]
    assert first["l2_norm"] > 0
    assert first["gradient_l2_norm"] > 0
    assert 0 < first["update_ratio"] < 1
