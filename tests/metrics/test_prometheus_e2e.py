"""A real Prometheus scrapes a trainer running a real session, and every dashboard panel must show data.

Debian's ``prometheus`` package provides the two binaries. Without them these tests are skipped
on a developer's machine and fail in CI (``CI=true``), where ``.ci/run`` installs the package.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from lasagne_engine.client import cli
from lasagne_engine.client.demo import MODEL_SOURCE, digits_split
from lasagne_engine.v1 import trainer_pb2
from tests.conftest import REPOSITORY_ROOT, Stack, free_port

pytestmark = pytest.mark.slow

PROMETHEUS_CONFIG = REPOSITORY_ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = REPOSITORY_ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
SCRAPE_INTERVAL = "1s"
# What Grafana would put in for its built-in variables, at a 1 s scrape interval.
GRAFANA_BUILTINS = {"$__rate_interval": "10s", "$__interval": "1s"}
# Scrapes to wait for while the session trains, so rates and quantiles over 10 s have data.
SCRAPES_WHILE_TRAINING = 8
STARTUP_TIMEOUT_S = 30.0
# Covers a cold compile cache, where the default backend compiles the perceptron with Numba.
TRAINING_TIMEOUT_S = 420.0


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed; install Debian's prometheus package (apt-get install prometheus)."
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def http_json(url: str, params: dict | None = None) -> dict:
    if params:
        url += "?" + urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


class Prometheus:
    """A Prometheus server on a loopback port with its own storage folder, scraping one trainer."""

    def __init__(self, folder: pathlib.Path, trainer_metrics_address: str):
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"].update(scrape_interval=SCRAPE_INTERVAL, scrape_timeout=SCRAPE_INTERVAL,
                                evaluation_interval=SCRAPE_INTERVAL)
        (job,) = config["scrape_configs"]
        job["static_configs"] = [{"targets": [trainer_metrics_address]}]
        self.job = job["job_name"]
        config_path = folder / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = folder / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                require_binary("prometheus"),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"Prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"Prometheus was not ready within {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def query(self, expression: str, **params) -> list[dict]:
        reply = http_json(f"{self.url}/api/v1/query", {"query": expression, **params})
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def query_range(self, expression: str, start: float, end: float) -> list[dict]:
        reply = http_json(
            f"{self.url}/api/v1/query_range", {"query": expression, "start": start, "end": end, "step": "1s"}
        )
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def label_values(self, selector: str, label: str, start: float, end: float) -> list[str]:
        reply = http_json(f"{self.url}/api/v1/series", {"match[]": selector, "start": start, "end": end})
        assert reply["status"] == "success", reply
        return sorted({series[label] for series in reply["data"] if label in series})

    def wait_for(self, expression: str, *, timeout_s: float, minimum: float | None = None) -> None:
        """Wait until an instant query returns a series, with a value of at least ``minimum`` if given."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self.query(expression)
            if result and (minimum is None or float(result[0]["value"][1]) >= minimum):
                return
            time.sleep(0.5)
        raise AssertionError(f"{expression!r} had no result within {timeout_s} s; Prometheus log:\n{self.log()}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def scraped(tmp_path_factory, compile_cache):
    """A trainer with its metrics endpoint, Prometheus scraping it, and a session it watched train and stop."""
    require_binary("prometheus")
    folder = tmp_path_factory.mktemp("prometheus-e2e")
    metrics_port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LASAGNE_ENGINE_METRICS_PORT", str(metrics_port))
        stack = Stack(folder / "stack", compile_cache)
    prometheus = None
    try:
        prometheus = Prometheus(folder, f"127.0.0.1:{metrics_port}")
        started = time.time()
        engine = stack.engine
        dataset = engine.upload_dataset("digits", digits_split())
        model = engine.register_model("mlp", MODEL_SOURCE.read_text(), default_hyperparameters={"hidden_units": 32})
        session = engine.start_session(
            f"{model.name}@{model.version}", f"{dataset.name}@{dataset.version}",
            epochs=100_000, batch_size=16, monitor="val_accuracy", statistics_every_steps=10,
        )
        selector = f'{{session="{session.id}"}}'

        # Train until Prometheus has every kind of series of the running session, for several scrapes.
        prometheus.wait_for(f"lasagne_engine_parameter_update_ratio{selector}", timeout_s=TRAINING_TIMEOUT_S)
        prometheus.wait_for(f"lasagne_engine_session_val_loss{selector}", timeout_s=TRAINING_TIMEOUT_S)
        prometheus.wait_for(
            f"count_over_time(lasagne_engine_session_examples_per_second{selector}[5m])",
            timeout_s=60, minimum=SCRAPES_WHILE_TRAINING,
        )
        engine.stop_session(session.id)
        final = engine.wait_session(session.id, timeout_s=120)
        assert final.state == trainer_pb2.STOPPED, final.error
        prometheus.wait_for(f'lasagne_engine_session_state{{session="{session.id}", state="stopped"}} == 1', timeout_s=30)
        # A few more scrapes, so that increase() and rate() over the end of the session have two samples.
        time.sleep(3 * float(SCRAPE_INTERVAL.removesuffix("s")))

        yield {"stack": stack, "prometheus": prometheus, "session": final, "started": started}
    finally:
        if prometheus is not None:
            prometheus.stop()
        stack.stop()
        metrics = stack.trainer_servicer.manager.metrics
        if metrics is not None:
            metrics.close()


def panels_of(dashboard: dict) -> list[dict]:
    """Return every panel of a dashboard, including those nested in collapsed rows."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def substitute(expression: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        expression = expression.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return expression


def resolve_variables(dashboard: dict, prometheus: Prometheus, session_id: str, start: float, end: float) -> dict:
    """Choose each template variable's value as Grafana would: our session, or All (``.*``) where allowed."""
    values = {"__range": f"{int(end - start)}s", **{name.removeprefix("$"): value for name, value in GRAFANA_BUILTINS.items()}}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
        assert match, f"{dashboard['title']}: variable {variable['name']} is not a label_values() query"
        selector, label = substitute(match.group(1), values), match.group(2)
        found = prometheus.label_values(selector, label, start, end)
        assert found, f"{dashboard['title']}: variable {variable['name']} ({variable['definition']}) has no values"
        if variable["name"] == "session":
            assert session_id in found
            values["session"] = session_id
        elif variable.get("includeAll"):
            values[variable["name"]] = variable["allValue"]
        else:
            values[variable["name"]] = found[0]
    return values


def test_shipped_config_passes_promtool():
    promtool = require_binary("promtool")

    checked = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)

    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_provisioning_matches_dashboards():
    (datasource,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "lasagne-engine.yml").read_text())["providers"]
    job = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"][0]["job_name"]

    assert datasource["type"] == "prometheus"
    assert provider["type"] == "file"
    assert {path.stem for path in DASHBOARDS} == {"overview", "session", "parameters", "devices"}
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        variables = {variable["name"] for variable in dashboard["templating"]["list"]}
        panels = panels_of(dashboard)
        assert len({panel["id"] for panel in panels}) == len(panels), path.name
        for panel in panels:
            for target in panel.get("targets", []):
                used = set(re.findall(r"\$\{?(\w+)", target["expr"])) - {"__rate_interval", "__interval", "__range"}
                assert used <= variables, f"{path.name}: panel {panel['title']!r} uses undefined {used - variables}"
                assert target["datasource"]["uid"] == "${datasource}", f"{path.name}: {panel['title']!r}"
                job_filters = set(re.findall(r'job="([^"]+)"', target["expr"]))
                assert job_filters <= {job}, f"{path.name}: panel {panel['title']!r} selects job {job_filters}"


def test_every_panel_query_returns_series(scraped):
    prometheus, session = scraped["prometheus"], scraped["session"]
    start, end = scraped["started"], time.time()
    empty = []
    queried = 0

    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        values = resolve_variables(dashboard, prometheus, session.id, start, end)
        for panel in panels_of(dashboard):
            for target in panel.get("targets", []):
                expression = substitute(target["expr"], values)
                if target.get("instant"):
                    result = prometheus.query(expression, time=end)
                else:
                    result = prometheus.query_range(expression, start, end)
                queried += 1
                if not result:
                    empty.append(f"{path.name}: {panel['title']!r} {target['refId']}: {expression}")

    assert queried >= 40
    assert empty == []


def test_killed_session_series_removed(scraped):
    stack = scraped["stack"]
    engine = stack.engine
    metrics = stack.trainer_servicer.manager.metrics
    metrics.retention_s = 1.0
    finished = scraped["session"]
    session = engine.start_session(f"{finished.model}@{finished.model_version}", f"{finished.dataset}@{finished.dataset_version}",
                                   epochs=100_000, batch_size=16)
    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    while engine.get_session(session.id).state != trainer_pb2.RUNNING and time.monotonic() < deadline:
        time.sleep(0.2)

    os.kill(engine.get_session(session.id).pid, signal.SIGKILL)
    final = engine.wait_session(session.id, timeout_s=60)

    assert final.state == trainer_pb2.FAILED
    time.sleep(metrics.retention_s)
    exposed = [
        sample
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.labels.get("session") in (session.id, finished.id)
    ]
    assert exposed == []
    ended = metrics.registry.get_sample_value("lasagne_engine_trainer_sessions_ended_total", {"state": "failed"})
    assert ended == 1


def test_plots_of_real_session(scraped, tmp_path, monkeypatch, capsys):
    stack, session = scraped["stack"], scraped["session"]
    monkeypatch.setenv("LASAGNE_ENGINE_REGISTRY_ADDRESS", stack.registry.address)
    monkeypatch.setenv("LASAGNE_ENGINE_DATA_ADDRESS", stack.data.address)
    monkeypatch.setenv("LASAGNE_ENGINE_TRAINER_ADDRESS", stack.trainer.address)
    first = session.epochs[0].parameter_set_id

    assert cli.main(["plot", session.id, "--out", str(tmp_path / "curves.png")]) == 0
    assert cli.main(["plot-params", session.best_parameter_set_id, "--out", str(tmp_path / "weights.png")]) == 0
    assert cli.main(["plot-params", first, session.last_parameter_set_id, "--out", str(tmp_path / "change.png")]) == 0

    output = capsys.readouterr().out.splitlines()
    assert output[0].endswith("loss, val_accuracy of 1 sessions")
    assert output[1].endswith("histograms of 4 arrays")
    assert output[2].endswith("histograms of 4 arrays")
    for name in ("curves.png", "weights.png", "change.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
