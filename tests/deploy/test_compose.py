"""The one-host deployment, checked without a Docker engine: the Compose file against the Compose
specification's schema, each image's commands against the installed console scripts, and every
file the Compose file and the Dockerfiles refer to."""

import os
import re
import shutil
import stat
import subprocess

import pytest
import yaml

from tests.deploy.deployment_files import (
    COMPOSE_DIR,
    COMPOSE_FILE,
    DEPLOY,
    ENV_EXAMPLE,
    REPOSITORY_ROOT,
    check_command,
    compose_schema,
    env_example,
    interpolate,
    interpolation_names,
    load_compose,
    parse_dockerfile,
    schema_errors,
)

# Values for the variables .env.example leaves empty, as up.sh would fill them.
FILLED_SECRETS = {
    "LASAGNE_ENGINE_TOKEN": "t" * 32,
    "MINIO_ROOT_PASSWORD": "m" * 32,
    "GRAFANA_ADMIN_PASSWORD": "g" * 32,
}
ROLE_PORTS = {"registry": 50151, "data": 50152, "trainer": 50153}
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|ACCESS_KEY|ROOT_USER|ADMIN_USER")


def environment() -> dict[str, str]:
    return {**env_example(), **FILLED_SECRETS}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(environment())


def built_services(compose: dict) -> dict[str, dict]:
    return {name: service for name, service in compose["services"].items() if "build" in service}


def final_stage(service: dict):
    dockerfile = COMPOSE_DIR / service["build"]["context"] / service["build"]["dockerfile"]
    return parse_dockerfile(dockerfile)[-1]


def test_compose_file_matches_spec_schema():
    schema = compose_schema()

    assert schema_errors(load_compose(), schema) == []
    assert schema_errors(load_compose(environment()), schema) == []


def test_schema_rejects_misspelled_key():
    document = load_compose()
    document["services"]["trainer"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilitie"] = ["gpu"]

    errors = schema_errors(document, compose_schema())

    assert errors == ["services/trainer/deploy/resources/reservations/devices/0: 'capabilitie' does not match "
                      "any of the regexes: '^x-'"]


def test_compose_builds_one_image_per_role(compose):
    built = built_services(compose)

    assert set(built) == set(ROLE_PORTS)
    for role, service in built.items():
        assert service["build"]["dockerfile"] == f"deploy/compose/{role}.Dockerfile"
        assert (COMPOSE_DIR / service["build"]["context"]).resolve() == REPOSITORY_ROOT


def test_image_commands_are_console_scripts(compose):
    for role, service in built_services(compose).items():
        stage = final_stage(service)
        command = service.get("command") or stage.last("CMD").exec_form()
        health = stage.last("HEALTHCHECK").exec_form()

        assert stage.last("ENTRYPOINT") is None, role
        check_command(command)
        check_command(health)
        assert command == ["lasagne-engine", "serve", role]
        assert health == ["lasagne-engine-healthcheck", role]


def test_images_run_unprivileged(compose):
    for role, service in built_services(compose).items():
        stage = final_stage(service)
        user = stage.last("USER").arguments

        assert user.split(":")[0] not in ("0", "root"), role
        assert int(user.split(":")[0]) >= 1000, role


def test_images_listen_on_their_role_port(compose):
    for role, service in built_services(compose).items():
        stage = final_stage(service)
        environment_lines = " ".join(instruction.arguments for instruction in stage.all("ENV"))
        exposed = {int(port) for instruction in stage.all("EXPOSE") for port in instruction.arguments.split()}

        assert f"LASAGNE_ENGINE_{role.upper()}_ADDRESS=0.0.0.0:{ROLE_PORTS[role]}" in environment_lines
        assert ROLE_PORTS[role] in exposed
        assert service["environment"][f"LASAGNE_ENGINE_{role.upper()}_ADDRESS"] == f"0.0.0.0:{ROLE_PORTS[role]}"
        assert f"127.0.0.1:{ROLE_PORTS[role]}:{ROLE_PORTS[role]}" in service["ports"]


def test_services_reach_each_other_by_name(compose):
    for service in built_services(compose).values():
        variables = service["environment"]
        for role, port in ROLE_PORTS.items():
            address = variables[f"LASAGNE_ENGINE_{role.upper()}_ADDRESS"]
            assert address in (f"{role}:{port}", f"0.0.0.0:{port}")


def test_trainer_image_has_cuda_and_kubernetes():
    build, final = parse_dockerfile(COMPOSE_DIR / "trainer.Dockerfile")

    assert build.base == final.base == "${CUDA_IMAGE}"
    install = " ".join(instruction.arguments for instruction in build.all("RUN"))
    assert 'extras["cuda"]' in install
    assert 'extras["kubernetes"]' in install


def test_slim_images_for_registry_and_data():
    for role in ("registry", "data"):
        stages = parse_dockerfile(COMPOSE_DIR / f"{role}.Dockerfile")
        text = (COMPOSE_DIR / f"{role}.Dockerfile").read_text()

        assert [stage.base for stage in stages] == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
        assert "ARG PYTHON_IMAGE=python:3.12-slim" in text


def test_dependency_layer_precedes_source(compose):
    # Copying the source after installing the dependencies keeps their layer cached across edits.
    for role, service in built_services(compose).items():
        build = parse_dockerfile(COMPOSE_DIR / f"{role}.Dockerfile")[0]
        copies = [source for instruction in build.all("COPY") for source in instruction.arguments.split()[:-1]]

        assert copies[:2] == ["pyproject.toml", "README.md"], role
        assert set(copies[2:]) == {"common", "services", "clients"}, role
        first_install = next(i for i, instruction in enumerate(build.instructions)
                             if "pip install -r requirements.txt" in instruction.arguments)
        first_source = next(i for i, instruction in enumerate(build.instructions)
                            if instruction.keyword == "COPY" and instruction.arguments.startswith("common"))
        assert first_install < first_source, role


def test_dockerfile_copies_exist_in_context(compose):
    ignored = (REPOSITORY_ROOT / ".dockerignore").read_text().splitlines()

    for role, service in built_services(compose).items():
        for stage in parse_dockerfile(COMPOSE_DIR / f"{role}.Dockerfile"):
            for instruction in stage.all("COPY"):
                words = instruction.arguments.split()
                if words[0].startswith("--from="):
                    continue
                for source in words[:-1]:
                    assert (REPOSITORY_ROOT / source).exists(), f"{role}: COPY {source} does not exist"
                    assert f"!{source}" in ignored or f"!{source}/" in ignored, (
                        f"{role}: .dockerignore leaves {source} out of the build context")


def test_compose_referenced_files_exist(compose):
    for name, service in compose["services"].items():
        if "build" in service:
            context = COMPOSE_DIR / service["build"]["context"]
            assert context.is_dir(), name
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name} mounts {source}, which does not exist"
    assert (COMPOSE_DIR / "up.sh").stat().st_mode & stat.S_IXUSR


def test_named_volumes_are_declared(compose):
    declared = set(compose["volumes"])
    used = {volume.split(":")[0] for service in compose["services"].values()
            for volume in service.get("volumes", []) if not volume.startswith((".", "/"))}

    assert used == declared


def test_trainer_reserves_every_gpu(compose):
    devices = compose["services"]["trainer"]["deploy"]["resources"]["reservations"]["devices"]

    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_startup_order_waits_for_health(compose):
    services = compose["services"]

    assert services["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    for role in ("registry", "data"):
        assert services[role]["depends_on"] == {"minio-init": {"condition": "service_completed_successfully"}}
        assert final_stage(services[role]).last("HEALTHCHECK") is not None
    assert services["trainer"]["depends_on"] == {
        "registry": {"condition": "service_healthy"}, "data": {"condition": "service_healthy"}}
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency}"


def test_credentials_come_from_env_file():
    example = env_example()
    raw = load_compose()

    for name, service in raw["services"].items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:[-?][^}]*)?\}", str(value)), (
                    f"{name}: {key} is not taken from .env: {value!r}")
    for variable, operator in interpolation_names(COMPOSE_FILE.read_text()):
        assert variable in example, f"docker-compose.yml uses ${{{variable}}}, which .env.example does not define"
        if operator == ":?":
            assert variable in FILLED_SECRETS or example[variable], variable
    for variable in FILLED_SECRETS:
        assert example[variable] == "", f".env.example must leave {variable} empty, not ship a secret"


def test_missing_secret_stops_compose():
    without_token = {**environment(), "LASAGNE_ENGINE_TOKEN": ""}

    with pytest.raises(KeyError, match="LASAGNE_ENGINE_TOKEN: set LASAGNE_ENGINE_TOKEN in deploy/compose/.env"):
        load_compose(without_token)


def test_env_file_is_ignored_by_git():
    result = subprocess.run(["git", "check-ignore", "--quiet", "deploy/compose/.env"], cwd=REPOSITORY_ROOT)

    assert result.returncode == 0


def test_monitoring_matches_compose(compose):
    services = compose["services"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "lasagne-engine.yml").read_text())

    targets = [target for job in prometheus["scrape_configs"] for config in job["static_configs"]
               for target in config["targets"]]
    assert targets == [f"trainer:{services['trainer']['environment']['LASAGNE_ENGINE_METRICS_PORT']}"]
    assert "9464" in final_stage(services["trainer"]).last("EXPOSE").arguments.split()
    assert "../prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert f"../grafana/dashboards:{dashboards_path}:ro" in services["grafana"]["volumes"]
    assert list((DEPLOY / "grafana" / "dashboards").glob("*.json"))


def test_up_script_creates_env_and_runs_compose(tmp_path):
    folder = tmp_path / "compose"
    folder.mkdir()
    for name in ("up.sh", ".env.example", "docker-compose.yml"):
        shutil.copy2(COMPOSE_DIR / name, folder / name)
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    calls = tmp_path / "docker-calls"
    fake_docker = bin_folder / "docker"
    fake_docker.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{calls}"\n')
    fake_docker.chmod(0o755)
    run_environment = {**os.environ, "PATH": f"{bin_folder}{os.pathsep}{os.environ['PATH']}"}

    first = subprocess.run(["bash", str(folder / "up.sh"), "--no-build"], env=run_environment,
                           capture_output=True, text=True, timeout=60)
    created = (folder / ".env").read_text()
    second = subprocess.run(["bash", str(folder / "up.sh")], env=run_environment,
                            capture_output=True, text=True, timeout=60)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "Created" in first.stderr
    assert "Created" not in second.stderr
    assert (folder / ".env").read_text() == created
    assert stat.S_IMODE((folder / ".env").stat().st_mode) == 0o600
    values = dict(line.split("=", 1) for line in created.splitlines() if line and not line.startswith("#"))
    for name in FILLED_SECRETS:
        assert re.fullmatch(r"[A-Za-z0-9]{32}", values[name]), name
    assert len({values[name] for name in FILLED_SECRETS}) == len(FILLED_SECRETS)
    assert values["MINIO_ROOT_USER"] == env_example()["MINIO_ROOT_USER"]
    assert calls.read_text().splitlines() == [
        "compose", "--project-directory", str(folder), "--file", str(folder / "docker-compose.yml"),
        "--env-file", str(folder / ".env"), "up", "--detach", "--build", "--wait",
    ]
    assert load_compose({**env_example(), **{name: values[name] for name in FILLED_SECRETS}})


def test_env_example_documents_every_variable():
    text = ENV_EXAMPLE.read_text()

    for name in env_example():
        preceding = text.split(f"\n{name}=")[0].rstrip().splitlines()[-1]
        assert preceding.startswith("#") or preceding.split("=")[0] in env_example(), name


def test_interpolation_follows_compose_rules():
    values = {"SET": "value", "EMPTY": ""}

    assert interpolate("${SET}", values) == "value"
    assert interpolate("${UNSET:-fallback}", values) == "fallback"
    assert interpolate("${EMPTY:-fallback}", values) == "fallback"
    assert interpolate("${EMPTY-fallback}", values) == ""
    assert interpolate("$${SET}", values) == "${SET}"
    with pytest.raises(KeyError, match="EMPTY: needed"):
        interpolate("${EMPTY:?needed}", values)
