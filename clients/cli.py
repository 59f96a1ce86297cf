"""The ``lasagne-engine`` command, built on the SDK."""

import argparse
import json
import logging
import pathlib
import sys
from collections.abc import Sequence

import numpy as np
from google.protobuf import json_format

from lasagne_engine.config import Addresses, Paths
from lasagne_engine.v1 import trainer_pb2

logger = logging.getLogger(__name__)


def _paths(arguments) -> Paths:
    return Paths(pathlib.Path(arguments.home).expanduser().resolve()) if arguments.home else Paths()


def _engine(arguments):
    from lasagne_engine.client import Engine

    addresses = Addresses.from_env()
    return Engine(registry_address=addresses.registry, data_address=addresses.data, trainer_address=addresses.trainer)


def _when(timestamp) -> str:
    if not timestamp.seconds and not timestamp.nanos:
        return "-"
    return timestamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(value)) for value in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip())


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_values(pairs: Sequence[str]) -> dict:
    values = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise SystemExit(f"Invalid setting {pair!r}: write it as KEY=VALUE, for example hidden_units=64.")
        values[key] = _parse_value(value)
    return values


# Services ------------------------------------------------------------------------------------


def command_serve(arguments) -> int:
    from lasagne_engine import rpc
    from lasagne_engine.stack import ROLES, serve

    rpc.configure_logging()
    roles = list(ROLES) if arguments.role == "all" else [arguments.role]
    serve(roles, paths=_paths(arguments), addresses=Addresses.from_env())
    return 0


def command_up(arguments) -> int:
    from lasagne_engine.stack.daemon import up

    paths = _paths(arguments)
    addresses = Addresses.from_env()
    pid, started = up(paths, addresses)
    if started:
        print(f"LasagneEngine started (process {pid}), data in {paths.home}")
    else:
        print("LasagneEngine is already running" + (f" (process {pid})" if pid else ""))
    return command_status(arguments)


def command_down(arguments) -> int:
    from lasagne_engine.stack.daemon import down

    pid = down(_paths(arguments))
    print(f"LasagneEngine stopped (process {pid})" if pid else "LasagneEngine was not running")
    return 0


def command_status(arguments) -> int:
    from lasagne_engine.stack.daemon import running_pid, service_status

    statuses = service_status(Addresses.from_env())
    pid = running_pid(_paths(arguments))
    _table([[s.role, s.address, "serving" if s.serving else "not answering"] for s in statuses], ["service", "address", "status"])
    if pid:
        print(f"process {pid}")
    return 0 if all(status.serving for status in statuses) else 1


def command_demo(arguments) -> int:
    from lasagne_engine.client.demo import DATASET_NAME, evaluate_in_fresh_process, run_demo
    from lasagne_engine.stack.daemon import up

    paths = _paths(arguments)
    pid, started = up(paths, Addresses.from_env())
    print(f"services started (process {pid}), data in {paths.home}" if started else "services already running")
    with _engine(arguments) as engine:
        best = run_demo(engine, epochs=arguments.epochs, hidden_units=arguments.hidden_units)
        dataset = engine.describe_dataset(DATASET_NAME)
    print(f"evaluating parameter set {best} in a fresh process")
    accuracy = evaluate_in_fresh_process(best, f"{dataset.name}@{dataset.version}")
    print(f"validation accuracy: {accuracy:.4f}")
    return 0


# Datasets ------------------------------------------------------------------------------------


def _dataset_rows(datasets) -> list[list[str]]:
    return [
        [f"{d.name}@{d.version}", str(len(d.arrays)), f"{d.total_bytes:,}", _when(d.created_at), d.description]
        for d in datasets
    ]


def command_datasets(arguments) -> int:
    with _engine(arguments) as engine:
        _table(_dataset_rows(engine.list_datasets(arguments.name or "")), ["dataset", "arrays", "bytes", "created", "description"])
    return 0


def command_upload(arguments) -> int:
    path = pathlib.Path(arguments.file)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError) as error:
        raise SystemExit(f"Could not read {str(path)!r} as an .npz archive ({error}); save arrays with numpy.savez.") from error
    with _engine(arguments) as engine:
        dataset = engine.upload_dataset(arguments.name, arrays, description=arguments.description)
    print(f"uploaded {dataset.name}@{dataset.version}: {len(dataset.arrays)} arrays, {dataset.total_bytes:,} bytes")
    return 0


def command_describe(arguments) -> int:
    with _engine(arguments) as engine:
        dataset = engine.describe_dataset(arguments.ref)
    print(f"{dataset.name}@{dataset.version}  {dataset.description}")
    _table(
        [[a.name, a.dtype, "x".join(map(str, a.shape)) or "scalar", f"{a.nbytes:,}", a.sha256] for a in dataset.arrays],
        ["array", "dtype", "shape", "bytes", "sha256"],
    )
    return 0


def command_delete_dataset(arguments) -> int:
    with _engine(arguments) as engine:
        versions = engine.delete_dataset(arguments.ref)
    print(f"deleted versions {', '.join(map(str, versions))}")
    return 0


# Models and parameter sets --------------------------------------------------------------------


def command_models(arguments) -> int:
    with _engine(arguments) as engine:
        models = engine.list_models(arguments.name or "")
    _table(
        [[f"{m.name}@{m.version}", m.source_sha256[:12], f"{m.signature.parameter_bytes:,}", _when(m.created_at), m.description] for m in models],
        ["model", "source", "parameter bytes", "created", "description"],
    )
    return 0


def command_register(arguments) -> int:
    source = pathlib.Path(arguments.file).read_text()
    with _engine(arguments) as engine:
        model = engine.register_model(
            arguments.name, source, description=arguments.description,
            default_hyperparameters=_key_values(arguments.set),
        )
    print(f"{'registered' if model.created else 'unchanged, already'} {model.name}@{model.version}")
    return 0


def command_model(arguments) -> int:
    with _engine(arguments) as engine:
        model = engine.get_model(arguments.ref)
    print(f"# {model.name}@{model.version}  sha256 {model.source_sha256}")
    print(model.source, end="" if model.source.endswith("\n") else "\n")
    return 0


def command_params(arguments) -> int:
    with _engine(arguments) as engine:
        sets = engine.list_parameter_sets(arguments.model or "", session_id=arguments.session or "", tag=arguments.tag or "")
    rows = [
        [p.id, f"{p.model}@{p.model_version}", p.session_id or "-", str(p.epoch), str(p.step),
         " ".join(f"{k}={v:.4g}" for k, v in sorted(p.metrics.items())), ",".join(p.tags)]
        for p in sets
    ]
    _table(rows, ["id", "model", "session", "epoch", "step", "metrics", "tags"])
    return 0


def command_delete_params(arguments) -> int:
    with _engine(arguments) as engine:
        engine.delete_parameter_set(arguments.id)
    print(f"deleted parameter set {arguments.id}")
    return 0


def command_tag(arguments) -> int:
    with _engine(arguments) as engine:
        parameter_set = engine.tag_parameter_set(arguments.id, add=arguments.add, remove=arguments.remove)
    print(f"{parameter_set.id}: {', '.join(parameter_set.tags) or 'no tags'}")
    return 0


def command_evaluate(arguments) -> int:
    from lasagne_engine.client.evaluate import evaluate_parameter_set

    with _engine(arguments) as engine:
        results = evaluate_parameter_set(engine, arguments.id, arguments.dataset, inputs=arguments.inputs, targets=arguments.targets)
    if arguments.accuracy_only:
        if "accuracy" not in results:
            raise SystemExit("This model is not a classifier, so it has no accuracy; drop --accuracy-only.")
        print(f"{results['accuracy']:.6f}")
    else:
        print(" ".join(f"{key}={value:.6g}" for key, value in results.items()))
    return 0


# Sessions ------------------------------------------------------------------------------------


def _session_rows(sessions) -> list[list[str]]:
    from lasagne_engine.client import state_name

    rows = []
    for s in sessions:
        best = max((e.metrics.get("val_accuracy", float("nan")) for e in s.epochs), default=float("nan"))
        rows.append([
            s.id, state_name(s.state), f"{s.model}@{s.model_version}", f"{s.dataset}@{s.dataset_version}", s.device,
            f"{s.epoch}/{s.hyperparameters.epochs}", f"{s.epochs[-1].val_loss:.4f}" if s.epochs else "-",
            f"{best:.4f}" if s.epochs and best == best else "-", _when(s.created_at),
        ])
    return rows


def command_sessions(arguments) -> int:
    with _engine(arguments) as engine:
        sessions = engine.list_sessions()
    _table(_session_rows(sessions), ["session", "state", "model", "dataset", "device", "epoch", "val loss", "best acc", "created"])
    return 0


def command_session(arguments) -> int:
    with _engine(arguments) as engine:
        session = engine.get_session(arguments.id)
    print(json_format.MessageToJson(session, preserving_proto_field_name=True))
    return 0


def command_train(arguments) -> int:
    from lasagne_engine.client.progress import SessionProgress

    with _engine(arguments) as engine:
        session = engine.start_session(
            arguments.model, arguments.dataset, optimizer=arguments.optimizer, learning_rate=arguments.learning_rate,
            batch_size=arguments.batch_size, epochs=arguments.epochs, seed=arguments.seed,
            model_hyperparameters=_key_values(arguments.set), monitor=arguments.monitor,
            init_parameter_set=arguments.init_parameter_set or "", description=arguments.description,
        )
        print(f"started session {session.id} on {session.device}")
        if arguments.follow:
            progress = SessionProgress(refresh=lambda: engine.get_session(session.id))
            for event in engine.watch_session(session.id):
                progress.update(event)
            final = engine.get_session(session.id)
            if final.state == trainer_pb2.FAILED:
                print(final.error, file=sys.stderr)
                return 1
    return 0


def command_watch(arguments) -> int:
    from lasagne_engine.client.progress import SessionProgress

    with _engine(arguments) as engine:
        progress = SessionProgress(refresh=lambda: engine.get_session(arguments.id))
        for event in engine.watch_session(arguments.id):
            progress.update(event)
    return 0


def command_stop(arguments) -> int:
    from lasagne_engine.client import state_name

    with _engine(arguments) as engine:
        session = engine.stop_session(arguments.id)
    print(f"stop requested for {session.id} ({state_name(session.state)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lasagne-engine",
        description="Manage PyTensor models, datasets and training sessions. Service addresses come from "
        "LASAGNE_ENGINE_{REGISTRY,DATA,TRAINER}_ADDRESS (default 127.0.0.1:50151..50153).",
    )
    parser.add_argument("--home", help="data folder (default: $LASAGNE_ENGINE_HOME or ~/.lasagne-engine)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    serve = add("serve", command_serve, "run services in the foreground, as a container would")
    serve.add_argument("role", choices=["all", "registry", "data", "trainer"])
    add("up", command_up, "start all services in the background on 127.0.0.1")
    add("down", command_down, "stop the services started by 'up'")
    add("status", command_status, "show whether each service answers")
    demo = add("demo", command_demo, "train a perceptron on the digits through all services, then evaluate it")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    demo.add_argument("--hidden-units", type=int, default=128, help="width of the hidden layer (default 128)")

    datasets = add("datasets", command_datasets, "list datasets, or every version of one")
    datasets.add_argument("name", nargs="?")
    upload = add("upload", command_upload, "upload the arrays of an .npz file as a new dataset version")
    upload.add_argument("name")
    upload.add_argument("file", help=".npz file; each array in it becomes an array of the dataset")
    upload.add_argument("--description", default="")
    describe = add("describe", command_describe, "show a dataset version's arrays")
    describe.add_argument("ref", help="NAME or NAME@VERSION")
    delete_dataset = add("delete-dataset", command_delete_dataset, "delete one dataset version (NAME@VERSION) or all (NAME)")
    delete_dataset.add_argument("ref")

    models = add("models", command_models, "list models, or every version of one")
    models.add_argument("name", nargs="?")
    register = add("register", command_register, "register a model definition file as a new version")
    register.add_argument("name")
    register.add_argument("file", help="Python file defining build(hyperparameters)")
    register.add_argument("--description", default="")
    register.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="default hyperparameter; repeatable")
    model = add("model", command_model, "print a model version's source")
    model.add_argument("ref", help="NAME or NAME@VERSION")

    params = add("params", command_params, "list parameter sets")
    params.add_argument("--model", help="NAME or NAME@VERSION")
    params.add_argument("--session")
    params.add_argument("--tag")
    delete_params = add("delete-params", command_delete_params, "delete a parameter set")
    delete_params.add_argument("id")
    tag = add("tag", command_tag, "add or remove tags of a parameter set")
    tag.add_argument("id")
    tag.add_argument("--add", action="append", default=[])
    tag.add_argument("--remove", action="append", default=[])
    evaluate = add("evaluate", command_evaluate, "evaluate a parameter set on a dataset in this process")
    evaluate.add_argument("id", help="parameter set id")
    evaluate.add_argument("dataset", help="NAME or NAME@VERSION")
    evaluate.add_argument("--inputs", default="X_val", help="array of inputs (default X_val)")
    evaluate.add_argument("--targets", default="y_val", help="array of targets (default y_val)")
    evaluate.add_argument("--accuracy-only", action="store_true", help="print only the accuracy")

    train = add("train", command_train, "start a training session")
    train.add_argument("model", help="NAME or NAME@VERSION")
    train.add_argument("dataset", help="NAME or NAME@VERSION")
    train.add_argument("--optimizer", default="adam", help="sgd, momentum, nesterov, adam, adamw, rmsprop or adagrad (default adam)")
    train.add_argument("--learning-rate", type=float, default=1e-3, help="default 0.001")
    train.add_argument("--batch-size", type=int, default=32, help="examples per step (default 32)")
    train.add_argument("--epochs", type=int, default=10, help="default 10")
    train.add_argument("--seed", type=int, default=0, help="seed of initialization and data order (default 0)")
    train.add_argument("--monitor", default="val_loss", help="metric that picks the best parameter set (default val_loss)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model hyperparameter; repeatable")
    train.add_argument("--init-parameter-set", help="start from this parameter set's arrays")
    train.add_argument("--description", default="")
    train.add_argument("--follow", action="store_true", help="show live progress until the session ends")
    add("sessions", command_sessions, "list training sessions")
    session = add("session", command_session, "show one session with its per-epoch metrics, as JSON")
    session.add_argument("id")
    watch = add("watch", command_watch, "show live progress of a session")
    watch.add_argument("id")
    stop = add("stop", command_stop, "stop a session after saving a final parameter set")
    stop.add_argument("id")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from lasagne_engine.client.errors import EngineError

    arguments = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return arguments.handler(arguments)
    except EngineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
