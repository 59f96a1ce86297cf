"""The ``lasagne-engine`` command, built on the SDK."""

import argparse
import json
import logging
import os
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


def _config_path(arguments) -> pathlib.Path:
    from lasagne_engine.security import config_path

    return config_path(_paths(arguments).home)


def _engine(arguments):
    from lasagne_engine.client import Engine

    addresses = Addresses.from_env()
    # The Engine picks the trainer itself, so LASAGNE_ENGINE_TRAINER_ADDRESSES can name several.
    return Engine(
        registry_address=addresses.registry,
        data_address=addresses.data,
        config_path=_config_path(arguments),
    )


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
    paths = _paths(arguments)
    # The trainer's own client and its session processes find the config file through the home.
    os.environ["LASAGNE_ENGINE_HOME"] = str(paths.home)
    serve(roles, paths=paths, addresses=Addresses.from_env())
    return 0


def command_up(arguments) -> int:
    from lasagne_engine.stack.daemon import set_up_development_security, up

    paths = _paths(arguments)
    addresses = Addresses.from_env()
    if arguments.tls:
        path = set_up_development_security(paths, require_client_certificates=arguments.client_certificates)
        print(f"TLS certificates in {paths.home / 'tls'}; tokens and settings in {path} (keep it private)")
    elif arguments.client_certificates:
        raise SystemExit("--client-certificates needs --tls: run 'lasagne-engine up --tls --client-certificates'.")
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

    from lasagne_engine.security import ClientSecurity

    statuses = service_status(Addresses.from_env(), ClientSecurity.from_env(_config_path(arguments)))
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


def command_delete_model(arguments) -> int:
    with _engine(arguments) as engine:
        deleted = engine.delete_model(arguments.ref, force=arguments.force)
    print(f"deleted versions {', '.join(map(str, deleted.deleted_versions))}")
    if deleted.deleted_parameter_sets:
        print(f"deleted parameter sets {', '.join(deleted.deleted_parameter_sets)}")
    return 0


def command_gc(arguments) -> int:
    with _engine(arguments) as engine:
        reports = engine.collect_garbage(dry_run=arguments.dry_run)
    verb = "would remove" if arguments.dry_run else "removed"
    rows = [
        [service, str(report.orphan_blobs), str(report.incomplete_writes), str(report.pending_deletions_completed),
         str(report.pending_deletions_remaining)]
        for service, report in reports.items()
    ]
    _table(rows, ["service", f"orphan blobs {verb}", "incomplete writes", "retried deletions", "still pending"])
    return 0 if all(report.pending_deletions_remaining == 0 for report in reports.values()) else 1


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
    if arguments.compare:
        return _compare_sessions(arguments)
    with _engine(arguments) as engine:
        sessions = engine.list_sessions()
    _table(_session_rows(sessions), ["session", "state", "model", "dataset", "device", "epoch", "val loss", "best acc", "created"])
    return 0


def _compare_sessions(arguments) -> int:
    from lasagne_engine.client.compare import DIFFERS_MARK, comparison_rows

    if len(arguments.compare) < 2:
        raise SystemExit("Name at least two sessions to compare, for example: sessions --compare s-1 s-2.")
    with _engine(arguments) as engine:
        sessions = [engine.get_session(session_id) for session_id in arguments.compare]
        model_defaults = {}
        for ref in sorted({f"{session.model}@{session.model_version}" for session in sessions}):
            model = engine.get_model(ref)
            model_defaults[ref] = json_format.MessageToDict(model.default_hyperparameters)
    _table(comparison_rows(sessions, model_defaults), ["", *(session.id for session in sessions)])
    print(f"{DIFFERS_MARK} differs between the sessions")
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
            model_hyperparameters=_key_values(arguments.set), monitor=arguments.monitor or "",
            init_parameter_set=arguments.init_parameter_set or "", description=arguments.description,
            device=arguments.device or "", resume_from=arguments.resume_from or "",
            early_stopping_patience=arguments.patience, keep_best=arguments.keep_best,
            keep_latest=arguments.keep_latest,
        )
        place = f"on {session.device}" if session.device else f"queued at position {session.queue_position}"
        if not session.device and arguments.device:
            place += f", waiting for {arguments.device}"
        print(f"started session {session.id} {place}")
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
    from lasagne_engine.client import FINAL_STATES
    from lasagne_engine.client.progress import ProgressView
    from lasagne_engine.client.watch import watch_sessions

    with _engine(arguments) as engine:
        session_ids = list(arguments.ids)
        if not session_ids:
            live_states = [state for state in trainer_pb2.SessionState.values() if state and state not in FINAL_STATES]
            session_ids = [session.id for session in engine.list_sessions(states=live_states)]
            if not session_ids:
                print("No live sessions to watch; start one with 'lasagne-engine train' or name a session.")
                return 0
        for session_id in session_ids:
            engine.get_session(session_id)  # raises NotFoundError before the view starts drawing
        view = ProgressView(refresh=engine.get_session, show_session_ids=True)
        failures = watch_sessions(engine, session_ids, view)
        finals = [view.session(session_id) or engine.get_session(session_id) for session_id in session_ids]
    for session_id, error in failures.items():
        print(f"error: watching session {session_id} failed: {error}", file=sys.stderr)
    failed = [session for session in finals if session.state == trainer_pb2.FAILED]
    for session in failed:
        print(f"session {session.id} failed: {session.error}", file=sys.stderr)
    return 1 if failures or failed else 0


def command_plot(arguments) -> int:
    from lasagne_engine.client.plots import plot_sessions

    with _engine(arguments) as engine:
        sessions = [engine.get_session(session_id) for session_id in arguments.ids]
    for session in sessions:
        if not session.epochs:
            print(f"session {session.id} has no finished epoch yet; it is left out", file=sys.stderr)
    panels = plot_sessions(sessions, pathlib.Path(arguments.out))
    print(f"wrote {arguments.out}: {', '.join(panels)} of {len([s for s in sessions if s.epochs])} sessions")
    return 0


def command_plot_params(arguments) -> int:
    from lasagne_engine.client.plots import plot_parameter_histograms, weight_array_names

    ids = [arguments.id, *([arguments.other] if arguments.other else [])]
    with _engine(arguments) as engine:
        loaded = []
        for parameter_set_id in ids:
            parameter_set = engine.get_parameter_set(parameter_set_id)
            names = weight_array_names({header.name: header.role for header in parameter_set.arrays})
            arrays = engine.load_parameter_set(parameter_set_id, names=names)
            # Panels follow the order the session saved the arrays in: its model's list of trainable parameters.
            loaded.append((parameter_set, {name: arrays[name] for name in names}))
    described = [f"{p.id} ({p.model}@{p.model_version}, epoch {p.epoch}, step {p.step})" for p, _ in loaded]
    if len(loaded) == 1:
        title = f"Weights of parameter set {described[0]}"
        drawn = plot_parameter_histograms(loaded[0][1], pathlib.Path(arguments.out), title=title, bins=arguments.bins)
    else:
        title = f"Change from {described[0]}\nto {described[1]}"
        drawn = plot_parameter_histograms(
            loaded[1][1], pathlib.Path(arguments.out), title=title, baseline=loaded[0][1], bins=arguments.bins,
        )
    print(f"wrote {arguments.out}: histograms of {len(drawn)} arrays")
    return 0


def command_devices(arguments) -> int:
    with _engine(arguments) as engine:
        status = engine.get_devices()
    _table(
        [[d.name, d.backend, f"{d.memory_budget_bytes:,}", f"{d.memory_used_bytes:,}", ",".join(d.session_ids) or "-"]
         for d in status.devices],
        ["device", "backend", "budget bytes", "estimated use bytes", "session"],
    )
    if status.queued_session_ids:
        print(f"queued: {', '.join(status.queued_session_ids)}")
    return 0


def command_pause(arguments) -> int:
    from lasagne_engine.client import state_name

    with _engine(arguments) as engine:
        session = engine.pause_session(arguments.id, release=arguments.release)
    action = "suspend" if arguments.release else "pause"
    print(f"{action} requested for {session.id} ({state_name(session.state)})")
    return 0


def command_resume(arguments) -> int:
    from lasagne_engine.client import state_name

    with _engine(arguments) as engine:
        session = engine.resume_session(arguments.id)
    print(f"resume requested for {session.id} ({state_name(session.state)})")
    return 0


def command_checkpoint(arguments) -> int:
    with _engine(arguments) as engine:
        parameter_set_id = engine.checkpoint_session(arguments.id)
    print(f"saved parameter set {parameter_set_id}")
    return 0


def command_set_lr(arguments) -> int:
    with _engine(arguments) as engine:
        session = engine.update_hyperparameters(arguments.id, learning_rate=arguments.learning_rate)
    change = session.history[-1] if session.history else None
    if change is not None:
        print(f"{session.id}: learning rate {change.old_value:g} -> {change.new_value:g} at step {change.step}")
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
    up = add("up", command_up, "start all services in the background on 127.0.0.1")
    up.add_argument(
        "--tls",
        action="store_true",
        help="first create a local CA, certificates and tokens for development under the data folder and "
        "record them in its config.toml, so the services require TLS and a token; existing ones are kept",
    )
    up.add_argument(
        "--client-certificates",
        action="store_true",
        help="with --tls, also require a client certificate signed by the local CA",
    )
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
    params.add_argument("--session", help="only the parameter sets this session saved")
    params.add_argument("--tag")
    delete_params = add("delete-params", command_delete_params, "delete a parameter set")
    delete_params.add_argument("id")
    delete_model = add("delete-model", command_delete_model, "delete one model version (NAME@VERSION) or all (NAME)")
    delete_model.add_argument("ref")
    delete_model.add_argument("--force", action="store_true", help="also delete the parameter sets of those versions")
    gc = add("gc", command_gc, "remove blobs that no metadata refers to and retry failed blob deletions")
    gc.add_argument("--dry-run", action="store_true", help="only count what would be removed")
    tag = add("tag", command_tag, "add or remove tags of a parameter set")
    tag.add_argument("id", help="parameter set id")
    tag.add_argument("--add", action="append", default=[], metavar="TAG", help="tag to add; repeatable")
    tag.add_argument("--remove", action="append", default=[], metavar="TAG", help="tag to remove; repeatable")
    evaluate = add("evaluate", command_evaluate, "evaluate a parameter set on a dataset in this process")
    evaluate.add_argument("id", help="parameter set id")
    evaluate.add_argument("dataset", help="NAME or NAME@VERSION")
    evaluate.add_argument("--inputs", default="X_val", help="array of inputs (default X_val)")
    evaluate.add_argument("--targets", default="y_val", help="array of targets (default y_val)")
    evaluate.add_argument("--accuracy-only", action="store_true", help="print only the accuracy")

    train = add("train", command_train, "start a training session")
    train.add_argument("model", help="NAME or NAME@VERSION")
    train.add_argument("dataset", help="NAME or NAME@VERSION")
    # Unset values take the trainer's defaults, or with --resume-from the source session's values.
    train.add_argument("--optimizer", help="sgd, momentum, nesterov, adam, adamw, rmsprop or adagrad (default adam)")
    train.add_argument("--learning-rate", type=float, help="default 0.001")
    train.add_argument("--batch-size", type=int, help="examples per step (default 32)")
    train.add_argument("--epochs", type=int, help="epochs in total, counting those of a resumed session (default 10)")
    train.add_argument("--seed", type=int, help="seed of initialization and data order (default 0)")
    train.add_argument("--monitor", help="metric that picks the best parameter set (default val_loss)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model hyperparameter; repeatable")
    train.add_argument("--init-parameter-set", help="start from this parameter set's arrays")
    train.add_argument("--resume-from", help="continue from this parameter set, its optimizer state and step count; "
                       "hyperparameters not given here keep the source session's values")
    train.add_argument("--device", help="device to run on, such as gpu:1 (default: the first free one)")
    train.add_argument("--patience", type=int, default=0, help="stop after N epochs without improvement (default 0: never)")
    train.add_argument("--keep-best", type=int, default=0, help="keep the N best parameter sets (default 0: keep all)")
    train.add_argument("--keep-latest", type=int, default=0, help="keep the N latest parameter sets (default 0: keep all)")
    train.add_argument("--description", default="", help="free-form label shown in listings")
    train.add_argument("--follow", action="store_true", help="show live progress until the session ends")
    sessions = add("sessions", command_sessions, "list training sessions, or compare some side by side")
    sessions.add_argument(
        "--compare", nargs="+", metavar="SESSION",
        help="show these sessions' hyperparameters, best validation metrics, epochs and wall time side by side",
    )
    session = add("session", command_session, "show one session with its per-epoch metrics, as JSON")
    session.add_argument("id", help="session id")
    watch = add("watch", command_watch, "show live progress of sessions, one line each, until they end")
    watch.add_argument("ids", nargs="*", metavar="SESSION", help="sessions to watch (default: every live session)")
    plot = add("plot", command_plot, "draw the loss and validation metric curves of sessions side by side")
    plot.add_argument("ids", nargs="+", metavar="SESSION")
    plot.add_argument("--out", required=True, metavar="FILE.png", help="image to write; the extension sets the format")
    plot_params = add(
        "plot-params", command_plot_params,
        "draw a histogram of each weight array of a parameter set, or of its change from a first set",
    )
    plot_params.add_argument("id", metavar="PARAMSET", help="parameter set id")
    plot_params.add_argument("other", nargs="?", metavar="PARAMSET2",
                             help="second parameter set: draw PARAMSET2 - PARAMSET instead")
    plot_params.add_argument("--out", required=True, metavar="FILE.png", help="image to write; the extension sets the format")
    plot_params.add_argument("--bins", type=int, default=60, help="histogram bins per array (default 60)")
    stop = add("stop", command_stop, "stop a session after saving a final parameter set")
    stop.add_argument("id", help="session id")
    add("devices", command_devices, "list the trainer's devices, their memory and sessions")
    pause = add("pause", command_pause, "pause a running session before its next step")
    pause.add_argument("id", help="session id")
    pause.add_argument("--release", action="store_true", help="checkpoint and free the device (state suspended)")
    resume = add("resume", command_resume, "resume a paused, suspended or interrupted session")
    resume.add_argument("id", help="session id")
    checkpoint = add("checkpoint", command_checkpoint, "save a parameter set of a live session now")
    checkpoint.add_argument("id", help="session id")
    set_lr = add("set-lr", command_set_lr, "change a live session's learning rate at its next step")
    set_lr.add_argument("id", help="session id")
    set_lr.add_argument("learning_rate", type=float, help="the new learning rate, a positive number")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from lasagne_engine.client.errors import EngineError

    arguments = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return arguments.handler(arguments)
    except BrokenPipeError:
        # The reader of the output, such as head, has closed it: stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
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
