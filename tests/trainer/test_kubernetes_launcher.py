import base64
import json
import pathlib
import signal
import threading
import time

import pytest

from lasagne_engine.security import ClientSecurity
from lasagne_engine.trainer.kubernetes_jobs import (
    COMPILE_CACHE_DIR,
    CONTAINER_NAME,
    DEFAULT_GPU_MEMORY_BYTES,
    JOB_LABEL,
    KubernetesSettings,
    job_manifest,
    kubernetes_devices,
    quantity_bytes,
    secret_manifest,
    session_backend,
)
from lasagne_engine.trainer.kubernetes_launcher import KubernetesLauncher, LaunchError
from lasagne_engine.trainer.launcher import LaunchRequest
from tests.trainer.kubernetes_stand_in import StandInApi, validate_manifest

IMAGE = "registry.example.com/lasagne-engine-trainer:test"
TOKEN = "0123456789abcdef0123456789abcdef"
CLIENT_TOKEN = "trainer-client-token-0123456789"
TRAINER_ENVIRONMENT = {
    "LASAGNE_ENGINE_LOG_LEVEL": "DEBUG",
    "LASAGNE_ENGINE_CHUNK_BYTES": "65536",
    "LASAGNE_ENGINE_TOKEN_SIGNING_KEY": "must-not-reach-the-pod",
    "LASAGNE_ENGINE_K8S_IMAGE": IMAGE,
    "LASAGNE_ENGINE_HOME": "/var/lib/lasagne-engine",
    "LASAGNE_ENGINE_TRAINER_ADDRESS": "0.0.0.0:50153",
    "AWS_SECRET_ACCESS_KEY": "must-not-reach-the-pod",
    "LASAGNE_ENGINE_TLS_CA": "/run/secrets/trainer-only/ca.pem",
    "LASAGNE_ENGINE_CONFIG": "/etc/lasagne-engine/config.toml",
    "MINIO_ROOT_PASSWORD": "must-not-reach-the-pod",
    "PYTENSOR_FLAGS": "optimizer=fast_run",
}


def settings(namespace: str = "lasagne", **overrides) -> KubernetesSettings:
    return KubernetesSettings(image=IMAGE, trainer_address="lasagne-trainer:50153", namespace=namespace, **overrides)


def launch_request(session_id: str = "s-0123456789ab", backend: str = "jax") -> LaunchRequest:
    return LaunchRequest(
        session_id=session_id,
        token=TOKEN,
        trainer_address="127.0.0.1:50153",
        device="k8s:0",
        backend=backend,
        working_dir=pathlib.Path("/unused"),
    )


def environment_of(job: dict) -> dict:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {variable["name"]: variable.get("value", variable.get("valueFrom")) for variable in container["env"]}


class Exits:
    """Records each call of on_exit."""

    def __init__(self):
        self.calls: list[tuple[int, str]] = []
        self.event = threading.Event()

    def __call__(self, returncode: int, tail: str) -> None:
        self.calls.append((returncode, tail))
        self.event.set()

    def wait(self, timeout_s: float = 15.0) -> tuple[int, str]:
        assert self.event.wait(timeout_s), "on_exit was not called"
        return self.calls[0]


@pytest.fixture
def api():
    stand_in = StandInApi()
    yield stand_in
    stand_in.close()


@pytest.fixture
def kubeconfig(api, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))


@pytest.fixture
def make_launcher(api, kubeconfig):
    launchers = []

    def make(**overrides) -> KubernetesLauncher:
        watch_timeout_s = overrides.pop("watch_timeout_s", 5)
        launcher = KubernetesLauncher(settings(api.namespace, **overrides), environ=TRAINER_ENVIRONMENT,
                                      security=ClientSecurity(), watch_timeout_s=watch_timeout_s)
        launchers.append(launcher)
        return launcher

    yield make
    for launcher in launchers:
        launcher.close()


def launched_job(api: StandInApi) -> str:
    api.wait_for(lambda: api.jobs, message="a Job")
    return next(iter(api.jobs))


def watch_requests(api: StandInApi) -> int:
    return sum(request.query.get("watch", "").lower() == "true" for request in api.requests_to("GET", "/jobs"))


def watching(api: StandInApi) -> bool:
    return watch_requests(api) > 0


# Manifests ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"gpus": 0},
        {"compile_cache_claim": "lasagne-compile-cache", "node_selector": {"nvidia.com/gpu.present": "true"}},
        {"service_account": "lasagne-session", "image_pull_secrets": ("registry-login",), "job_ttl_s": 0},
    ],
    ids=["gpu", "cpu", "claim-and-selector", "account-and-pull-secret"],
)
def test_job_manifest_validates(overrides):
    job = job_manifest(settings(**overrides), launch_request(), "lasagne-s-0123456789ab-a1b2c3", TRAINER_ENVIRONMENT)

    assert validate_manifest(job) == []


def test_gpu_job_requests_one_gpu():
    job = job_manifest(settings(gpus=1), launch_request(), "lasagne-s-1-a1b2c3", TRAINER_ENVIRONMENT)

    pod = job["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == "1"
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    environment = environment_of(job)
    assert "CUDA_VISIBLE_DEVICES" not in environment
    assert "mode=JAX" in environment["PYTENSOR_FLAGS"]


def test_cpu_job_hides_gpus():
    job = job_manifest(settings(gpus=0), launch_request(backend="default"), "lasagne-s-1-a1b2c3", TRAINER_ENVIRONMENT)

    pod = job["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["requests"]
    assert "tolerations" not in pod
    environment = environment_of(job)
    assert environment["CUDA_VISIBLE_DEVICES"] == ""
    assert environment["JAX_PLATFORMS"] == "cpu"
    assert "mode=JAX" not in environment["PYTENSOR_FLAGS"]


def test_job_runs_worker_with_secret_token():
    name = "lasagne-s-0123456789ab-a1b2c3"
    job = job_manifest(settings(), launch_request(), name, TRAINER_ENVIRONMENT)

    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == CONTAINER_NAME
    assert container["command"] == [
        "python", "-m", "lasagne_engine.trainer.worker",
        "--session-id", "s-0123456789ab", "--trainer", "lasagne-trainer:50153",
    ]
    assert environment_of(job)["LASAGNE_ENGINE_WORKER_TOKEN"] == {"secretKeyRef": {"name": name, "key": "token"}}
    assert TOKEN not in json.dumps(job)
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["template"]["metadata"]["labels"][JOB_LABEL] == name


def test_job_environment_withholds_secrets():
    environment = environment_of(job_manifest(settings(), launch_request(), "lasagne-s-1-a1b2c3", TRAINER_ENVIRONMENT))

    assert environment["LASAGNE_ENGINE_LOG_LEVEL"] == "DEBUG"
    assert environment["LASAGNE_ENGINE_CHUNK_BYTES"] == "65536"
    for withheld in (
        "LASAGNE_ENGINE_TOKEN_SIGNING_KEY", "LASAGNE_ENGINE_K8S_IMAGE", "LASAGNE_ENGINE_HOME",
        "LASAGNE_ENGINE_TRAINER_ADDRESS", "AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_PASSWORD", "LASAGNE_ENGINE_TLS_CA",
        "LASAGNE_ENGINE_TOKEN",
    ):
        assert withheld not in environment
    assert environment["LASAGNE_ENGINE_CONFIG"] == "/dev/null"
    assert "must-not-reach-the-pod" not in json.dumps(environment)
    flags = environment["PYTENSOR_FLAGS"]
    assert "base_compiledir=/var/cache/lasagne-engine/pytensor" in flags
    assert flags.endswith("optimizer=fast_run")
    assert environment["JAX_COMPILATION_CACHE_DIR"] == "/var/cache/lasagne-engine/jax"


def test_job_carries_trainer_client_security(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nstand-in\n-----END CERTIFICATE-----\n")
    security = ClientSecurity(token=CLIENT_TOKEN, tls_ca=ca)
    name = "lasagne-s-1-a1b2c3"

    job = job_manifest(settings(), launch_request(), name, TRAINER_ENVIRONMENT, security)
    secret = secret_manifest(settings(), launch_request(), name, security)

    assert validate_manifest(job) == []
    assert validate_manifest(secret) == []
    environment = environment_of(job)
    assert environment["LASAGNE_ENGINE_TOKEN"] == {"secretKeyRef": {"name": name, "key": "client-token"}}
    assert environment["LASAGNE_ENGINE_TLS_CA"] == "/etc/lasagne-engine/tls/tls-ca.pem"
    assert "LASAGNE_ENGINE_TLS_CERT" not in environment
    pod = job["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": name, "items": [{"key": "tls-ca", "path": "tls-ca.pem"}],
                                      "defaultMode": 0o400}} in pod["volumes"]
    assert {"name": "tls", "mountPath": "/etc/lasagne-engine/tls", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert CLIENT_TOKEN not in json.dumps(job)
    assert secret["stringData"] == {"token": TOKEN, "client-token": CLIENT_TOKEN, "tls-ca": ca.read_text()}


def test_job_pod_is_unprivileged():
    pod = job_manifest(settings(), launch_request(), "lasagne-s-1-a1b2c3", TRAINER_ENVIRONMENT)["spec"]["template"]["spec"]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    container = pod["containers"][0]["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container["capabilities"] == {"drop": ["ALL"]}


# Settings and devices -------------------------------------------------------------------------


def test_settings_from_env_defaults():
    read = KubernetesSettings.from_env({
        "LASAGNE_ENGINE_K8S_IMAGE": IMAGE,
        "LASAGNE_ENGINE_K8S_TRAINER_ADDRESS": "lasagne-trainer:50153",
        "LASAGNE_ENGINE_K8S_NAMESPACE": "ml",
    })

    assert read.namespace == "ml"
    assert read.max_sessions == 4
    assert read.gpus == 1
    assert (read.cpu, read.memory) == ("2", "8Gi")
    assert read.node_selector == {}


def test_settings_from_env_reads_everything():
    read = KubernetesSettings.from_env({
        "LASAGNE_ENGINE_K8S_IMAGE": IMAGE,
        "LASAGNE_ENGINE_K8S_TRAINER_ADDRESS": "lasagne-trainer.ml.svc:50153",
        "LASAGNE_ENGINE_K8S_NAMESPACE": "ml",
        "LASAGNE_ENGINE_K8S_MAX_SESSIONS": "16",
        "LASAGNE_ENGINE_K8S_GPUS": "0",
        "LASAGNE_ENGINE_K8S_DEVICE_MEMORY_BYTES": "1073741824",
        "LASAGNE_ENGINE_K8S_CPU": "500m",
        "LASAGNE_ENGINE_K8S_MEMORY": "2Gi",
        "LASAGNE_ENGINE_K8S_IMAGE_PULL_POLICY": "Always",
        "LASAGNE_ENGINE_K8S_IMAGE_PULL_SECRETS": "one, two",
        "LASAGNE_ENGINE_K8S_SERVICE_ACCOUNT": "sessions",
        "LASAGNE_ENGINE_K8S_NODE_SELECTOR": "pool=gpu, zone=a",
        "LASAGNE_ENGINE_K8S_COMPILE_CACHE_CLAIM": "cache",
        "LASAGNE_ENGINE_K8S_JOB_TTL_S": "60",
        "LASAGNE_ENGINE_K8S_TRAINER_NAME": "trainer-b",
    })

    assert read.max_sessions == 16
    assert read.gpus == 0
    assert read.device_memory_bytes == 1 << 30
    assert (read.cpu, read.memory, read.image_pull_policy) == ("500m", "2Gi", "Always")
    assert read.image_pull_secrets == ("one", "two")
    assert read.node_selector == {"pool": "gpu", "zone": "a"}
    assert (read.service_account, read.compile_cache_claim, read.job_ttl_s, read.trainer_name) == (
        "sessions", "cache", 60, "trainer-b")


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"LASAGNE_ENGINE_K8S_IMAGE": ""}, "LASAGNE_ENGINE_K8S_IMAGE is not set"),
        ({"LASAGNE_ENGINE_K8S_TRAINER_ADDRESS": ""}, "must be host:port"),
        ({"LASAGNE_ENGINE_K8S_TRAINER_ADDRESS": "0.0.0.0:50153"}, "use the trainer's Service"),
        ({"LASAGNE_ENGINE_K8S_GPUS": "2"}, "LASAGNE_ENGINE_K8S_GPUS=2 must be between 0 and 1"),
        ({"LASAGNE_ENGINE_K8S_MAX_SESSIONS": "0"}, "LASAGNE_ENGINE_K8S_MAX_SESSIONS=0 must be at least 1"),
        ({"LASAGNE_ENGINE_K8S_MAX_SESSIONS": "many"}, "'many' is not an integer"),
        ({"LASAGNE_ENGINE_K8S_MEMORY": "8 GB"}, "is not a Kubernetes quantity"),
        ({"LASAGNE_ENGINE_K8S_NODE_SELECTOR": "gpu"}, "must be key=value"),
        ({"LASAGNE_ENGINE_K8S_IMAGE_PULL_POLICY": "Sometimes"}, "must be Always, IfNotPresent or Never"),
        ({"LASAGNE_ENGINE_K8S_TRAINER_NAME": "-bad-"}, "must be a Kubernetes label value"),
    ],
    ids=["image", "address", "wildcard", "gpus", "sessions", "integer", "memory", "selector", "pull", "name"],
)
def test_settings_reject_bad_values(variables, message):
    environ = {"LASAGNE_ENGINE_K8S_IMAGE": IMAGE, "LASAGNE_ENGINE_K8S_TRAINER_ADDRESS": "lasagne-trainer:50153",
               "LASAGNE_ENGINE_K8S_NAMESPACE": "ml", **variables}

    with pytest.raises(ValueError, match=message):
        KubernetesSettings.from_env(environ)


def test_devices_are_session_slots():
    gpu = kubernetes_devices(settings(max_sessions=3))
    cpu = kubernetes_devices(settings(max_sessions=2, gpus=0, memory="4Gi"))
    sized = kubernetes_devices(settings(max_sessions=1, device_memory_bytes=80 << 30))

    assert [device.name for device in gpu] == ["k8s:0", "k8s:1", "k8s:2"]
    assert {device.kind for device in gpu} == {"gpu"}
    assert {device.memory_budget_bytes for device in gpu} == {DEFAULT_GPU_MEMORY_BYTES}
    assert [(device.kind, device.memory_budget_bytes) for device in cpu] == [("cpu", 4 << 30)] * 2
    assert sized[0].memory_budget_bytes == 80 << 30
    assert {device.cpu_core for device in gpu + cpu} == {None}


def test_session_backend_follows_gpus():
    assert session_backend(settings(gpus=1), "auto") == "jax"
    assert session_backend(settings(gpus=0), "auto") == "default"
    assert session_backend(settings(gpus=1), "default") == "default"


@pytest.mark.parametrize(("quantity", "expected"), [("8Gi", 8 << 30), ("512Mi", 512 << 20), ("1G", 10**9), ("3", 3)])
def test_quantity_bytes(quantity, expected):
    assert quantity_bytes(quantity) == expected


# Launching against the stand-in API ---------------------------------------------------------


def test_launch_creates_secret_job_and_owner(api, make_launcher):
    launcher = make_launcher()
    exits = Exits()

    handle = launcher.launch(launch_request(), exits)

    name = launched_job(api)
    assert handle.name == name
    assert handle.pid == 0
    api.wait_for(lambda: watching(api), message="the launcher to watch its Job")
    mutations = [(request.method, request.path.rsplit("/", 2)[-2:]) for request in api.requests
                 if request.method != "GET"]
    assert mutations == [
        ("POST", ["lasagne", "secrets"]),
        ("POST", ["lasagne", "jobs"]),
        ("PATCH", ["secrets", name]),
    ]
    secret = api.secrets[name]
    assert base64.b64decode(secret["data"]["token"]).decode() == TOKEN
    assert secret["metadata"]["ownerReferences"][0]["uid"] == api.jobs[name]["metadata"]["uid"]
    assert handle.running()
    assert api.problems == []


def test_completed_job_reports_exit_and_log(api, make_launcher):
    launcher = make_launcher()
    exits = Exits()
    handle = launcher.launch(launch_request(), exits)
    name = launched_job(api)

    api.finish_pod(name, 0, "".join(f"line {number}\n" for number in range(80)))
    returncode, tail = exits.wait()

    assert returncode == 0
    assert tail.splitlines()[0] == "line 30"
    assert tail.splitlines()[-1] == "line 79"
    handle.join(5)
    assert not handle.running()
    assert len(exits.calls) == 1
    assert name not in api.secrets
    assert api.problems == []


def test_killed_container_reports_signal(api, make_launcher):
    launcher = make_launcher(memory="1Gi")
    exits = Exits()
    launcher.launch(launch_request(), exits)
    name = launched_job(api)

    api.finish_pod(name, 128 + signal.SIGKILL, "allocating\n", reason="OOMKilled")
    returncode, tail = exits.wait()

    assert returncode == -signal.SIGKILL
    assert tail.startswith("allocating")
    assert "exceeded its memory limit of 1Gi" in tail
    assert "LASAGNE_ENGINE_K8S_MEMORY" in tail


def test_terminate_deletes_job_in_foreground(api, make_launcher):
    launcher = make_launcher()
    exits = Exits()
    handle = launcher.launch(launch_request(), exits)
    name = launched_job(api)
    api.wait_for(lambda: watching(api), message="the launcher to watch its Job")

    handle.terminate()
    returncode, tail = exits.wait()

    assert api.deletions == [(name, {"propagationPolicy": "Foreground"})]
    assert returncode == -signal.SIGTERM
    assert tail == ""
    assert api.jobs == {}
    assert api.secrets == {}
    handle.kill()
    assert len(api.deletions) == 1


def test_kill_deletes_without_grace(api, make_launcher):
    launcher = make_launcher()
    handle = launcher.launch(launch_request(), Exits())
    name = launched_job(api)

    handle.kill()

    assert api.deletions == [(name, {"propagationPolicy": "Foreground", "gracePeriodSeconds": 0})]


def test_external_deletion_reports_kill(api, make_launcher):
    launcher = make_launcher()
    exits = Exits()
    launcher.launch(launch_request(), exits)
    name = launched_job(api)
    api.wait_for(lambda: watching(api), message="the launcher to watch its Job")

    api.delete_job_externally(name)
    returncode, tail = exits.wait()

    assert returncode == -signal.SIGKILL
    assert tail == f"The Job {name} was deleted by something other than the trainer."


def test_stuck_image_pull_fails_session(api, make_launcher):
    launcher = make_launcher(watch_timeout_s=1)
    exits = Exits()
    launcher.launch(launch_request(), exits)
    name = launched_job(api)

    api.set_waiting(name, "ImagePullBackOff", f'Back-off pulling image "{IMAGE}"')
    returncode, tail = exits.wait()

    assert returncode == 1
    assert tail == f'The session\'s pod could not start: ImagePullBackOff: Back-off pulling image "{IMAGE}"'
    assert api.deletions == [(name, {"propagationPolicy": "Foreground", "gracePeriodSeconds": 0})]


def test_unschedulable_pod_keeps_waiting(api, make_launcher):
    launcher = make_launcher(watch_timeout_s=1)
    exits = Exits()
    launcher.launch(launch_request(), exits)
    name = launched_job(api)

    api.set_waiting(name, "ContainerCreating", "")
    time.sleep(2.5)

    assert exits.calls == []
    assert api.deletions == []


def test_watch_outlives_its_timeout(api, make_launcher):
    launcher = make_launcher(watch_timeout_s=1)
    exits = Exits()
    launcher.launch(launch_request(), exits)
    name = launched_job(api)
    api.wait_for(lambda: watch_requests(api) >= 2, message="a second watch after the first timed out")

    api.finish_pod(name, 3, "could not attach\n")
    returncode, tail = exits.wait()

    assert (returncode, tail) == (3, "could not attach")


def test_rejected_job_raises_and_cleans_up(api, make_launcher):
    launcher = make_launcher()
    api.fail_next_job_create = (403, "Forbidden")

    with pytest.raises(LaunchError, match=r"Could not create Job lasagne-s-0123456789ab-[0-9a-f]{6} in namespace "
                                          r"'lasagne': HTTP 403 Forbidden"):
        launcher.launch(launch_request(), Exits())

    assert isinstance(LaunchError("x"), OSError)
    assert api.jobs == {}
    assert api.secrets == {}


def test_unreachable_api_raises_launch_error(api, make_launcher):
    launcher = make_launcher()
    api.close()

    with pytest.raises(LaunchError, match="Could not create Secret"):
        launcher.launch(launch_request(), Exits())


def test_relaunch_gets_new_job_name(api, make_launcher):
    launcher = make_launcher()

    first = launcher.launch(launch_request(), Exits())
    api.finish_pod(first.name, 0)
    first.join(10)
    second = launcher.launch(launch_request(), Exits())

    assert first.name != second.name
    assert second.name in api.jobs
    assert api.problems == []


# A real trainer with the Kubernetes launcher ---------------------------------------------------


@pytest.fixture
def trainer_on_stand_in(api, kubeconfig, tmp_path, compile_cache, monkeypatch):
    """Registry, data service and a trainer whose sessions run as Jobs of the stand-in API, with a
    local kubelet running each Job's container as a process on this host."""
    from lasagne_engine import rpc
    from lasagne_engine.client import Engine
    from lasagne_engine.data_service import add_data_service
    from lasagne_engine.model_registry import add_model_registry
    from lasagne_engine.trainer import add_trainer
    from tests.trainer.kubernetes_stand_in import LocalKubelet

    LocalKubelet(api, tmp_path / "kubelet", mounts={COMPILE_CACHE_DIR: compile_cache})
    registry = rpc.Server("127.0.0.1:0")
    add_model_registry(registry, root=tmp_path / "registry", compile_cache=compile_cache)
    data = rpc.Server("127.0.0.1:0")
    add_data_service(data, root=tmp_path / "data")
    trainer = rpc.Server("127.0.0.1:0")
    for name, value in {
        "LASAGNE_ENGINE_LAUNCHER": "kubernetes",
        "LASAGNE_ENGINE_K8S_IMAGE": IMAGE,
        "LASAGNE_ENGINE_K8S_TRAINER_ADDRESS": trainer.address,
        "LASAGNE_ENGINE_K8S_NAMESPACE": api.namespace,
        "LASAGNE_ENGINE_K8S_GPUS": "0",
        "LASAGNE_ENGINE_K8S_MAX_SESSIONS": "2",
        "LASAGNE_ENGINE_K8S_MEMORY": "4Gi",
    }.items():
        monkeypatch.setenv(name, value)
    servicer = add_trainer(trainer, root=tmp_path / "trainer", registry_address=registry.address,
                           data_address=data.address, compile_cache=compile_cache)
    for server in (registry, data, trainer):
        server.start()
    engine = Engine(registry_address=registry.address, data_address=data.address, trainer_address=trainer.address)
    yield engine, servicer
    engine.close()
    servicer.manager.close()
    servicer.manager.launcher.close()
    for server in (trainer, data, registry):
        server.stop(grace_s=1.0)


def jobs_of(api: StandInApi, session_id: str) -> list[str]:
    return [version_job["metadata"]["name"] for _, kind, version_job in api.job_events
            if kind == "ADDED" and version_job["metadata"]["labels"]["lasagne-engine/session-id"] == session_id]


@pytest.mark.slow
def test_trainer_controls_sessions_in_jobs(api, trainer_on_stand_in):
    from lasagne_engine.client.demo import MODEL_SOURCE, digits_split
    from lasagne_engine.v1 import trainer_pb2
    from tests.trainer.test_sessions import wait_for_state

    engine, servicer = trainer_on_stand_in
    assert isinstance(servicer.manager.launcher, KubernetesLauncher)
    engine.upload_dataset("digits", digits_split())
    engine.register_model("mlp", MODEL_SOURCE.read_text(), default_hyperparameters={"hidden_units": 32})
    devices = engine.get_devices().devices
    assert [(device.name, device.kind, device.memory_budget_bytes) for device in devices] == [
        ("k8s:0", "cpu", 4 << 30), ("k8s:1", "cpu", 4 << 30)]

    session = engine.start_session("mlp", "digits", epochs=100_000, batch_size=8, learning_rate=1e-3)
    # Generous: a cold compile cache makes the first compile of this graph take minutes.
    running = wait_for_state(engine, session.id, {trainer_pb2.RUNNING}, timeout_s=600)
    assert running.device == "k8s:0"
    assert running.pid == 0
    first_job = jobs_of(api, session.id)[0]
    assert api.jobs[first_job]["spec"]["template"]["spec"]["containers"][0]["command"][-3:] == [
        session.id, "--trainer", api.jobs[first_job]["spec"]["template"]["spec"]["containers"][0]["command"][-1]]

    checkpoint = engine.get_parameter_set(engine.checkpoint_session(session.id))
    assert checkpoint.session_id == session.id
    updated = engine.update_hyperparameters(session.id, learning_rate=5e-4)
    assert updated.hyperparameters.learning_rate == 5e-4
    metric_names = set()
    for point in engine.watch_metrics([session.id]):
        metric_names.add(point.name)
        if "learning_rate" in metric_names and "train_loss" in metric_names:
            break

    engine.pause_session(session.id, release=True)
    suspended = wait_for_state(engine, session.id, {trainer_pb2.SUSPENDED}, timeout_s=120)
    # The trainer resumes a suspended session once its process has exited, which it learns from
    # the Job's watch; the device is free from then on.
    api.wait_for(lambda: not any(device.session_ids for device in engine.get_devices().devices),
                 timeout_s=30, message="the trainer to see the first Job end")
    assert first_job not in api.secrets
    engine.resume_session(session.id)
    wait_for_state(engine, session.id, {trainer_pb2.RUNNING}, timeout_s=300)
    launches = jobs_of(api, session.id)
    engine.stop_session(session.id)
    final = engine.wait_session(session.id, timeout_s=120)

    assert len(launches) == 2
    assert launches[0] != launches[1]
    assert final.state == trainer_pb2.STOPPED, final.error
    assert final.step >= suspended.step
    api.wait_for(lambda: api.jobs[launches[1]]["status"].get("succeeded") == 1, timeout_s=30,
                 message="the second Job to succeed")
    assert api.problems == []
