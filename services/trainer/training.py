"""The compute of one session: datasets in shared variables, a compiled step, and the epoch loop.

Nothing here imports gRPC or calls the registry. The dataset arrays become PyTensor shared
variables once, on the session's device; the compiled training step takes only a minibatch
index, and gathers its rows inside the graph through a shared permutation that is reshuffled each
epoch. The learning rate is a shared variable too, so it can change between steps without a
recompile.
"""

import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from lasagne_engine.compute import FLOAT_DTYPE
from lasagne_engine.errors import FailedPrecondition, InvalidArgument
from lasagne_engine.modeldef import BuiltModel

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad")
# Validation runs over fixed-size blocks, masked at the end, so its compiled function has static
# shapes, which the JAX backend requires.
EVAL_BATCH_SIZE = 512


class NonFiniteLoss(FailedPrecondition):
    """A training step produced a NaN or infinite loss."""


@dataclass
class TrainingData:
    """The four arrays of a supervised session, already on the host."""

    train_inputs: np.ndarray
    train_targets: np.ndarray
    val_inputs: np.ndarray
    val_targets: np.ndarray


@dataclass
class EpochResult:
    epoch: int
    step: int
    train_loss: float
    val_loss: float
    metrics: dict[str, float]
    epoch_seconds: float
    examples_per_second: float


@dataclass
class StepReport:
    epoch: int
    step: int
    step_in_epoch: int
    train_loss: float
    examples_per_second: float
    learning_rate: float


def make_rule(optimizer: str, learning_rate):
    """Return the pytensor-ml update rule named ``optimizer`` with a shared learning rate."""
    from pytensor_ml import optim

    rules = {
        "sgd": lambda: optim.sgd(learning_rate),
        "momentum": lambda: optim.sgd(learning_rate, momentum=0.9),
        "nesterov": lambda: optim.sgd(learning_rate, momentum=0.9, nesterov=True),
        "adam": lambda: optim.adam(learning_rate),
        "adamw": lambda: optim.adamw(learning_rate),
        "rmsprop": lambda: optim.rmsprop(learning_rate),
        "adagrad": lambda: optim.adagrad(learning_rate),
    }
    if optimizer not in rules:
        raise InvalidArgument(f"Unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")
    return rules[optimizer]()


def check_shapes(model: BuiltModel, data: TrainingData, *, names: Mapping[str, str]) -> None:
    """Check that the arrays fit the network's input, output and loss.

    Raises
    ------
    FailedPrecondition
        If an example's shape differs from the network's input shape, or the targets disagree with
        the output or with the number of examples. The message names both shapes.
    """
    input_shape = tuple(model.input.type.shape[1:])
    for key in ("train_inputs", "val_inputs"):
        array = getattr(data, key)
        example_shape = array.shape[1:]
        compatible = len(example_shape) == len(input_shape) and all(
            expected is None or expected == actual for expected, actual in zip(input_shape, example_shape)
        )
        if array.ndim < 1 or not compatible:
            shown = tuple("?" if size is None else size for size in input_shape)
            raise FailedPrecondition(
                f"Array {names[key]!r} has examples of shape {example_shape} (array shape {array.shape}), "
                f"but the model's input takes examples of shape {shown}. Reshape the data or build the "
                "model with matching hyperparameters."
            )
    for inputs_key, targets_key in (("train_inputs", "train_targets"), ("val_inputs", "val_targets")):
        inputs, targets = getattr(data, inputs_key), getattr(data, targets_key)
        if len(inputs) != len(targets):
            raise FailedPrecondition(
                f"Array {names[inputs_key]!r} has {len(inputs)} examples (shape {inputs.shape}) but "
                f"{names[targets_key]!r} has {len(targets)} (shape {targets.shape}); they must match."
            )
    output_shape = tuple(model.output.type.shape[1:])
    if model.loss == "cross_entropy":
        n_classes = output_shape[-1] if output_shape else None
        for key in ("train_targets", "val_targets"):
            targets = getattr(data, key)
            if targets.ndim != 1 or targets.dtype.kind not in "iu":
                raise FailedPrecondition(
                    f"Array {names[key]!r} has shape {targets.shape} and dtype {targets.dtype}, but a "
                    "cross-entropy model trains on a vector of integer class labels."
                )
            if n_classes is not None and targets.size and (targets.min() < 0 or targets.max() >= n_classes):
                raise FailedPrecondition(
                    f"Array {names[key]!r} contains labels from {targets.min()} to {targets.max()}, but the model's "
                    f"output has shape {output_shape}, so labels must lie in 0..{n_classes - 1}."
                )
    else:
        for key in ("train_targets", "val_targets"):
            targets = getattr(data, key)
            target_shape = targets.shape[1:] if targets.ndim > 1 else (1,)
            if any(expected is not None and expected != actual for expected, actual in zip(output_shape, target_shape)) or len(target_shape) != len(output_shape):
                raise FailedPrecondition(
                    f"Array {names[key]!r} has targets of shape {target_shape}, but the model's output has "
                    f"shape {output_shape} per example."
                )


class SessionRun:
    """Compiles and runs the training of one built model on one dataset.

    Parameters
    ----------
    model : BuiltModel
        The network, built from its definition.
    data : TrainingData
        Host arrays; copied once into shared variables.
    optimizer, learning_rate, batch_size, seed
        Training hyperparameters.
    mode : str or None
        PyTensor compile mode: None for the default backend, ``"JAX"`` for JAX.
    """

    def __init__(
        self,
        model: BuiltModel,
        data: TrainingData,
        *,
        optimizer: str,
        learning_rate: float,
        batch_size: int,
        seed: int,
        mode: str | None = None,
        statistics_every_steps: int = 0,
        statistics_min_interval_s: float = 1.0,
    ):
        import pytensor

        if batch_size < 1:
            raise InvalidArgument(f"batch_size {batch_size} must be at least 1.")
        n_train = len(data.train_inputs)
        if n_train < batch_size:
            raise FailedPrecondition(
                f"The training set has {n_train} examples, fewer than one batch of {batch_size}; "
                "lower batch_size or add data."
            )
        if len(data.val_inputs) == 0:
            raise FailedPrecondition("The validation set is empty; validation needs at least one example.")
        if not math.isfinite(learning_rate) or learning_rate <= 0:
            raise InvalidArgument(f"learning_rate {learning_rate!r} must be a positive finite number.")

        from pytensor_ml.model import Model

        # Every layer drew its initial values when it was built. Redrawing them from the seed makes
        # one seed start from the same weights, which resuming and comparing runs rely on.
        Model(model.output).initialize(seed=seed)
        self.model = model
        self.batch_size = batch_size
        self.seed = seed
        self.n_train = n_train
        self.n_val = len(data.val_inputs)
        self.steps_per_epoch = n_train // batch_size
        # Steps taken so far, counted across epochs; a resumed session starts from its parent's count.
        self.step = 0
        target_dtype = "int64" if model.loss == "cross_entropy" else FLOAT_DTYPE
        input_dtype = model.input.type.dtype

        # The one host-to-device copy of the data: everything after this indexes these variables.
        self.shared = {
            "train_inputs": pytensor.shared(np.asarray(data.train_inputs, dtype=input_dtype), name="train_inputs"),
            "train_targets": pytensor.shared(np.asarray(data.train_targets, dtype=target_dtype), name="train_targets"),
            "val_inputs": pytensor.shared(np.asarray(data.val_inputs, dtype=input_dtype), name="val_inputs"),
            "val_targets": pytensor.shared(np.asarray(data.val_targets, dtype=target_dtype), name="val_targets"),
        }
        self.order = pytensor.shared(np.arange(n_train, dtype="int64"), name="example_order")
        # The compiled functions' inputs, made once: minibatch indices and validation block starts.
        self._batch_indices = [np.array(index, dtype="int64") for index in range(self.steps_per_epoch)]
        self._block_starts = [np.array(start, dtype="int64") for start in range(0, self.n_val, EVAL_BATCH_SIZE)]
        self.learning_rate = pytensor.shared(np.asarray(learning_rate, dtype=FLOAT_DTYPE), name="learning_rate")
        self.optimizer = optimizer
        self.mode = mode
        self.statistics_every_steps = max(0, statistics_every_steps)
        # A fast model reaches every N-th step many times a second; statistics more often than
        # this add reports and their cost without telling more.
        self.statistics_min_interval_s = statistics_min_interval_s
        self._last_statistics = float("-inf")
        self.train_step = None
        self.train_step_with_statistics = None
        self.evaluate_block = None
        self.optimizer_state: list = []

    def compile(self) -> float:
        """Compile the training step and the validation function; return the seconds it took."""
        import pytensor
        import pytensor.tensor as pt
        from pytensor_ml.optim import compile_train
        from pytensor_ml.pytensorf import collect_optimizer_state, rewrite_for_prediction

        started = time.perf_counter()
        model = self.model
        index = pt.lscalar("batch_index")
        rows = self.order[index * self.batch_size + pt.arange(self.batch_size)]
        batch_inputs = self.shared["train_inputs"][rows]
        batch_targets = self.shared["train_targets"][rows]
        loss = _loss_graph(model, batch_targets, model.output, reduce=True)

        rule = make_rule(self.optimizer, self.learning_rate)
        updates = rule(loss, model.trainable)
        self.optimizer_state = [
            variable for variable in collect_optimizer_state(updates, model.trainable) if variable is not self.learning_rate
        ]
        compile_kwargs = {"givens": {model.input: batch_inputs}}
        if self.mode:
            compile_kwargs["mode"] = self.mode
        self.train_step = compile_train(
            loss, updates, parameters=model.trainable, inputs=[index], compile_kwargs=compile_kwargs
        )
        if self.statistics_every_steps:
            # A second step function with the statistics as extra outputs, so the ordinary step
            # pays nothing for them. Both share the parameters and optimizer state.
            statistics = _statistics_graph(loss, updates, model.trainable)
            self.train_step_with_statistics = compile_train(
                loss, updates, parameters=model.trainable, inputs=[index], compile_kwargs=compile_kwargs,
                extra_outputs=statistics,
            )

        start = pt.lscalar("block_start")
        positions = start + pt.arange(EVAL_BATCH_SIZE)
        valid = pt.lt(positions, self.n_val)
        val_rows = pt.minimum(positions, self.n_val - 1)
        prediction = rewrite_for_prediction(model.output)
        val_targets = self.shared["val_targets"][val_rows]
        per_example = _loss_graph(model, val_targets, prediction, reduce=False)
        mask = pt.cast(valid, FLOAT_DTYPE)
        outputs = [pt.sum(per_example * mask)]
        if model.loss == "cross_entropy":
            correct = pt.cast(pt.eq(pt.argmax(prediction, axis=-1), val_targets), FLOAT_DTYPE)
            outputs.append(pt.sum(correct * mask))
        self.evaluate_block = pytensor.function(
            [start],
            outputs,
            givens={model.input: self.shared["val_inputs"][val_rows]},
            mode=self.mode,
        )
        # Every call passes a ready int64 scalar array, so the functions skip converting and
        # checking their input: for a Python int, that check took about a tenth of the digits
        # perceptron's step in a profile.
        for function in (self.train_step, self.train_step_with_statistics, self.evaluate_block):
            if function is not None:
                function.trust_input = True
        for variable in [*self.shared.values(), self.order]:
            self._keep_on_device(variable)
        # Run each function once: the default backend compiles its Numba code on first call.
        saved = self._snapshot()
        self.train_step(self._batch_indices[0])
        if self.train_step_with_statistics is not None:
            self.train_step_with_statistics(self._batch_indices[0])
        self._restore(saved)
        self.evaluate_block(self._block_starts[0])
        return time.perf_counter() - started

    def _snapshot(self) -> list[tuple]:
        return [(variable, variable.get_value(borrow=False)) for variable in self.all_state_variables()]

    @staticmethod
    def _restore(saved: list[tuple]) -> None:
        for variable, value in saved:
            variable.set_value(value)

    def all_state_variables(self) -> list:
        return [*self.model.trainable, *self.model.state, *self.optimizer_state]

    def _keep_on_device(self, variable) -> None:
        """Keep a shared variable that no update changes as an array on the JAX device.

        PyTensor's JAX functions pass such a variable's stored value to every call. A numpy value
        is then copied to the device on each step, the whole dataset included, where a JAX array
        stays put. Setting the value through ``set_value`` would turn it back into numpy.
        """
        if self.mode != "JAX":
            return
        import jax

        storage = variable.container.storage
        storage[0] = jax.device_put(np.asarray(storage[0]))

    def shuffle(self, epoch: int) -> None:
        """Set the example order of ``epoch``; the same seed and epoch always give the same order."""
        rng = np.random.default_rng([self.seed, epoch])
        self.order.set_value(rng.permutation(self.n_train).astype("int64"))
        self._keep_on_device(self.order)

    def set_learning_rate(self, value: float) -> None:
        if not math.isfinite(value) or value <= 0:
            raise InvalidArgument(f"learning_rate {value!r} must be a positive finite number.")
        self.learning_rate.set_value(np.asarray(value, dtype=FLOAT_DTYPE))

    def validate(self) -> tuple[float, dict[str, float]]:
        """Return the mean validation loss and the validation metrics."""
        loss_sum = 0.0
        correct_sum = 0.0
        for start in self._block_starts:
            results = self.evaluate_block(start)
            loss_sum += float(results[0])
            if len(results) > 1:
                correct_sum += float(results[1])
        val_loss = loss_sum / self.n_val
        if self.model.loss == "cross_entropy":
            return val_loss, {"val_accuracy": correct_sum / self.n_val}
        return val_loss, {"val_mse": val_loss}

    def run_epoch(
        self,
        epoch: int,
        *,
        start_batch: int = 0,
        before_step: Callable[[], bool] = lambda: False,
        on_step: Callable[[StepReport, list[float]], None] | None = None,
        on_statistics: Callable[[int, list[dict]], None] | None = None,
        report_every_s: float = 0.5,
    ) -> EpochResult | None:
        """Train one epoch from minibatch ``start_batch``, then validate.

        ``before_step`` runs before every step and returns True to end the epoch early, in which
        case this returns None and the steps taken so far stay applied. ``on_step`` receives a
        report after the epoch's first step, then about every ``report_every_s`` seconds and after
        its last step, with the durations of the steps since the previous report. ``on_statistics`` receives the step and per-parameter statistics every
        ``statistics_every_steps`` steps, but not more often than once per
        ``statistics_min_interval_s`` seconds.

        Raises
        ------
        NonFiniteLoss
            At the first NaN or infinite loss, naming the step.
        """
        self.shuffle(epoch)
        started = time.perf_counter()
        last_report = started
        step_seconds: list[float] = []
        loss_sum = 0.0
        steps_run = 0
        for batch_index in range(start_batch, self.steps_per_epoch):
            if before_step():
                return None
            step_started = time.perf_counter()
            with_statistics = (
                self.train_step_with_statistics is not None
                and on_statistics is not None
                and (self.step + 1) % self.statistics_every_steps == 0
                and step_started - self._last_statistics >= self.statistics_min_interval_s
            )
            if with_statistics:
                loss_value, *statistics = self.train_step_with_statistics(self._batch_indices[batch_index])
                loss_value = float(loss_value)
            else:
                loss_value = float(self.train_step(self._batch_indices[batch_index]))
            now = time.perf_counter()
            self.step += 1
            steps_run += 1
            step_seconds.append(now - step_started)
            if not math.isfinite(loss_value):
                raise NonFiniteLoss(f"The training loss became {loss_value} at epoch {epoch}, step {self.step}.")
            if with_statistics:
                self._last_statistics = step_started
                on_statistics(self.step, self._statistics_rows(statistics))
            loss_sum += loss_value
            report_due = steps_run == 1 or now - last_report >= report_every_s or batch_index == self.steps_per_epoch - 1
            if on_step is not None and report_due:
                elapsed = now - started
                on_step(
                    StepReport(
                        epoch=epoch,
                        step=self.step,
                        step_in_epoch=batch_index + 1,
                        train_loss=loss_value,
                        examples_per_second=steps_run * self.batch_size / elapsed if elapsed > 0 else 0.0,
                        learning_rate=float(self.learning_rate.get_value()),
                    ),
                    step_seconds,
                )
                step_seconds = []
                last_report = now
        train_seconds = time.perf_counter() - started
        val_loss, metrics = self.validate()
        if not math.isfinite(val_loss):
            raise NonFiniteLoss(f"The validation loss became {val_loss} after epoch {epoch}, step {self.step}.")
        return EpochResult(
            epoch=epoch,
            step=self.step,
            train_loss=loss_sum / max(steps_run, 1),
            val_loss=val_loss,
            metrics=metrics,
            epoch_seconds=time.perf_counter() - started,
            examples_per_second=steps_run * self.batch_size / train_seconds if train_seconds > 0 else 0.0,
        )

    def _statistics_rows(self, values: list) -> list[dict]:
        rows = []
        for position, variable in enumerate(self.model.trainable):
            l2_norm, mean, std, gradient_norm, update_norm = (float(v) for v in values[5 * position : 5 * position + 5])
            rows.append({
                "name": array_name(variable.name),
                "layer": getattr(variable, "layer_name", None) or variable.name.rsplit("_", 1)[0],
                "l2_norm": l2_norm,
                "mean": mean,
                "std": std,
                "gradient_l2_norm": gradient_norm,
                "update_ratio": update_norm / l2_norm if l2_norm > 0 else 0.0,
            })
        return rows

    def parameter_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Return every trainable, state and optimizer array by name, and the role of each."""
        arrays: dict[str, np.ndarray] = {}
        roles: dict[str, str] = {}
        for role, variables in (
            ("trainable", self.model.trainable),
            ("state", self.model.state),
            ("optimizer", self.optimizer_state),
        ):
            for variable in variables:
                value = variable.get_value(borrow=False)
                if isinstance(value, np.random.Generator):
                    continue  # a random generator has no array to store
                # The JAX backend leaves device arrays in updated variables; np.asarray copies them to the host.
                arrays[array_name(variable.name)] = np.asarray(value)
                roles[array_name(variable.name)] = role
        return arrays, roles

    def load_arrays(self, arrays: Mapping[str, np.ndarray], *, source: str) -> list[str]:
        """Set every variable whose name is in ``arrays``; return the names of those left unset.

        Parameters, state and optimizer state are all set, so call this after :meth:`compile`.

        Raises
        ------
        FailedPrecondition
            If an array's shape differs from the variable's.
        """
        if self.train_step is None:
            raise RuntimeError("Call compile() before load_arrays(): the optimizer's state exists only after it.")
        missing = []
        for variable in self.all_state_variables():
            name = array_name(variable.name)
            if name not in arrays:
                missing.append(name)
                continue
            value = arrays[name]
            current = variable.get_value(borrow=True)
            if tuple(value.shape) != tuple(np.shape(current)):
                raise FailedPrecondition(
                    f"Array {variable.name!r} of {source} has shape {tuple(value.shape)}, but the model's "
                    f"variable has shape {tuple(np.shape(current))}."
                )
            variable.set_value(np.asarray(value, dtype=np.asarray(current).dtype))
        return missing


def _statistics_graph(loss, updates, parameters) -> list:
    """Build, for each parameter, its L2 norm, mean, std, gradient L2 norm and update L2 norm.

    Every value is taken before the step applies its updates, which is what the update-to-parameter
    ratio compares.
    """
    import pytensor.tensor as pt

    gradients = pt.grad(loss, parameters)
    outputs = []
    for parameter, gradient in zip(parameters, gradients):
        outputs += [
            pt.sqrt(pt.sum(pt.sqr(parameter))),
            pt.mean(parameter),
            pt.std(parameter),
            pt.sqrt(pt.sum(pt.sqr(gradient))),
            pt.sqrt(pt.sum(pt.sqr(updates[parameter] - parameter))),
        ]
    return outputs


def array_name(variable_name: str) -> str:
    """Return the parameter set array name of a shared variable.

    Optimizer state is named like ``fc1_W/adam/first_moment``; array names allow only
    ``[A-Za-z0-9._-]``, so every other character becomes a dot (``fc1_W.adam.first_moment``).
    """
    return re.sub(r"[^A-Za-z0-9._-]", ".", variable_name)


def _loss_graph(model: BuiltModel, targets, output, *, reduce: bool):
    import pytensor.tensor as pt
    from pytensor_ml.loss import CrossEntropy, SquaredError

    def keep(values):
        return values

    reduction = "mean" if reduce else keep
    if model.loss == "cross_entropy":
        n_classes = model.output.type.shape[-1]
        if n_classes is None:
            raise FailedPrecondition("A cross-entropy model needs a static number of classes on its output's last axis.")
        # One-hot targets keep the loss free of a data-dependent arange, which JAX cannot compile.
        onehot = pt.cast(pt.eq(targets[:, None], pt.arange(n_classes)[None, :]), FLOAT_DTYPE)
        return CrossEntropy(reduction=reduction, expect_logits=True, expect_onehot_labels=True)(onehot, output)
    targets = targets.reshape(output.shape) if targets.ndim != output.ndim else targets
    per_element = SquaredError(reduction=keep)(targets, output)
    per_example = per_element.reshape((per_element.shape[0], -1)).mean(axis=1)
    return per_example.mean() if reduce else per_example
