"""Runs each session as a Kubernetes Job, so the cluster's scheduler places it and the NVIDIA
device plugin gives it one GPU.

The trainer selects this launcher with ``LASAGNE_ENGINE_LAUNCHER=kubernetes``. For each launch it
creates a Secret with the session's token, then a Job whose pod runs ``python -m
lasagne_engine.trainer.worker`` with the token from that Secret, and then makes the Job the
Secret's owner, so Kubernetes deletes the Secret with the Job. The session process attaches back to
the trainer over gRPC exactly as a local one does, so pause, resume, checkpoints, hyperparameter
changes and metrics go through the same ``AttachWorker`` stream under both launchers.

A thread per Job lists and then watches it, and calls ``on_exit`` once when the Job completes,
fails or is deleted, with the exit code of the pod's container and the last lines of its log.

Settings, read by :meth:`KubernetesSettings.from_env`:

=========================================  =====================================================
``LASAGNE_ENGINE_K8S_IMAGE``               image of the session pods (required)
``LASAGNE_ENGINE_K8S_TRAINER_ADDRESS``     ``host:port`` the pods attach to, such as the
                                           trainer's Service (required)
``LASAGNE_ENGINE_K8S_NAMESPACE``           namespace of the Jobs; default the trainer pod's own
``LASAGNE_ENGINE_K8S_MAX_SESSIONS``        sessions at once, the devices ``k8s:0`` .. ``k8s:N-1``
                                           (default 4)
``LASAGNE_ENGINE_K8S_GPUS``                ``nvidia.com/gpu`` per pod, 1 or 0 (default 1)
``LASAGNE_ENGINE_K8S_DEVICE_MEMORY_BYTES`` memory budget of each device; default 15 GiB with a
                                           GPU, else the pod's memory
``LASAGNE_ENGINE_K8S_CPU``                 CPU request of a pod (default ``2``)
``LASAGNE_ENGINE_K8S_MEMORY``              memory request and limit of a pod (default ``8Gi``)
``LASAGNE_ENGINE_K8S_IMAGE_PULL_POLICY``   default ``IfNotPresent``
``LASAGNE_ENGINE_K8S_IMAGE_PULL_SECRETS``  comma-separated Secret names
``LASAGNE_ENGINE_K8S_SERVICE_ACCOUNT``     service account of the pods; default none mounted
``LASAGNE_ENGINE_K8S_NODE_SELECTOR``       ``key=value,key=value``
``LASAGNE_ENGINE_K8S_COMPILE_CACHE_CLAIM`` PersistentVolumeClaim shared as the compile cache;
                                           default an emptyDir per pod
``LASAGNE_ENGINE_K8S_JOB_TTL_S``           seconds a finished Job is kept (default 3600)
``LASAGNE_ENGINE_K8S_TRAINER_NAME``        label value that tells the Jobs of several trainers in
                                           one namespace apart (default ``trainer``)
=========================================  =====================================================
"""

import logging
import os
import pathlib
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from lasagne_engine.compute import compute_environment
from lasagne_engine.security import CONFIG_VARIABLE, ClientSecurity
from lasagne_engine.trainer.devices import DeviceInfo
from lasagne_engine.trainer.launcher import LaunchRequest
from lasagne_engine.trainer.worker import TOKEN_VARIABLE

try:
    from kubernetes import client, config, watch
    from kubernetes.client.exceptions import ApiException
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "The Kubernetes launcher needs the official client; install it with "
        "pip install 'lasagne-engine[kubernetes]'."
    ) from error

__all__ = [
    "KubernetesLauncher",
    "KubernetesSession",
    "KubernetesSettings",
    "LaunchError",
    "job_manifest",
    "kubernetes_devices",
    "load_api_client",
]

logger = logging.getLogger(__name__)

CONTAINER_NAME = "session"
SESSION_LABEL = "lasagne-engine/session-id"
TRAINER_LABEL = "lasagne-engine/trainer"
# Set on the pod template, so the launcher finds a Job's pods without the labels the Job
# controller adds, whose names changed across Kubernetes versions.
JOB_LABEL = "lasagne-engine/job"
MANAGED_BY = "lasagne-engine-trainer"
TOKEN_KEY = "token"
CLIENT_TOKEN_KEY = "client-token"
# Keys of the TLS files in the Secret and the variables that point the pod's client at them.
TLS_FILES = {"tls-ca": "LASAGNE_ENGINE_TLS_CA", "tls-cert": "LASAGNE_ENGINE_TLS_CERT", "tls-key": "LASAGNE_ENGINE_TLS_KEY"}
TLS_DIR = "/etc/lasagne-engine/tls"
GPU_RESOURCE = "nvidia.com/gpu"
# Folders inside the session pod. The image's root filesystem is mounted read-only.
WORK_DIR = "/var/lib/lasagne-engine/session"
COMPILE_CACHE_DIR = "/var/cache/lasagne-engine"
# UID of the user that the images create. The pod runs as this UID whatever user the image sets.
SESSION_UID = 10001
LOG_TAIL_LINES = 50
WATCH_TIMEOUT_S = 60
RETRY_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
# NOTE: a guess for a GPU whose size the trainer cannot see: a 16 GiB card less the 1 GiB the
# local launcher keeps back. Set LASAGNE_ENGINE_K8S_DEVICE_MEMORY_BYTES to the cluster's GPUs.
DEFAULT_GPU_MEMORY_BYTES = 15 << 30
# Waiting reasons after which a pod will not start without someone changing the cluster or the
# settings, so the session fails instead of staying pending. Unschedulable pods are not among
# them: they wait for a free GPU, which is how the cluster queues sessions.
FATAL_WAITING_REASONS = frozenset(
    {"ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"}
)
# Variables of the trainer that a session pod gets. Addresses, folders and the launcher's own
# settings describe the trainer's container, not the pod's.
_FORWARDED_PREFIXES = ("LASAGNE_ENGINE_",)
_FORWARDED_NAMES = ("PYTENSOR_FLAGS",)
# The pod's token and TLS files come from its Secret, as the trainer's own client settings.
_NOT_FORWARDED_PREFIXES = ("LASAGNE_ENGINE_TOKEN", "LASAGNE_ENGINE_TLS_", "LASAGNE_ENGINE_K8S_")
_NOT_FORWARDED_NAMES = (
    CONFIG_VARIABLE,
    "LASAGNE_ENGINE_ALLOW_INSECURE_BIND",
    "LASAGNE_ENGINE_LAUNCHER",
    "LASAGNE_ENGINE_HOME",
    "LASAGNE_ENGINE_COMPILE_CACHE",
    "LASAGNE_ENGINE_REGISTRY_ADDRESS",
    "LASAGNE_ENGINE_DATA_ADDRESS",
    "LASAGNE_ENGINE_TRAINER_ADDRESS",
)
_QUANTITY = re.compile(r"^(?P<number>[0-9]+(\.[0-9]+)?)(?P<suffix>[KMGTPE]i|[kMGTPE]|m)?$")
_QUANTITY_FACTORS = {
    None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60,
}
_NAME_UNSAFE = re.compile(r"[^a-z0-9-]+")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class LaunchError(OSError):
    """The Kubernetes API rejected a request to start a session, or could not be reached."""


def quantity_bytes(quantity: str) -> int:
    """Return the bytes a Kubernetes memory quantity such as ``8Gi`` or ``500M`` stands for."""
    match = _QUANTITY.match(quantity)
    if match is None:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity; write it as 8Gi, 512Mi or 2.")
    return int(float(match["number"]) * _QUANTITY_FACTORS[match["suffix"]])


def _check_quantity(name: str, value: str) -> str:
    if _QUANTITY.match(value) is None:
        raise ValueError(f"{name}={value!r} is not a Kubernetes quantity; write it as 8Gi, 500m or 2.")
    return value


def _env_int(environ: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
    text = environ.get(name, "")
    if not text:
        return default
    try:
        value = int(text)
    except ValueError as error:
        raise ValueError(f"{name}={text!r} is not an integer.") from error
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ValueError(f"{name}={value} must be {bounds}.")
    return value


def _parse_pairs(name: str, text: str) -> dict[str, str]:
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise ValueError(f"{name} entry {item!r} must be key=value, for example nvidia.com/gpu.present=true.")
        pairs[key.strip()] = value.strip()
    return pairs


def _default_namespace() -> str:
    # Kubernetes mounts the pod's namespace next to its service account token.
    path = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    try:
        return path.read_text().strip() or "default"
    except OSError:
        return "default"


@dataclass(frozen=True)
class KubernetesSettings:
    """Settings of the session Jobs: image, namespace, resources and the address pods attach to.

    The module's docstring lists the variable of each field.
    """

    image: str
    trainer_address: str
    namespace: str = "default"
    max_sessions: int = 4
    gpus: int = 1
    device_memory_bytes: int | None = None
    cpu: str = "2"
    memory: str = "8Gi"
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    service_account: str = ""
    node_selector: dict[str, str] = field(default_factory=dict)
    compile_cache_claim: str = ""
    job_ttl_s: int = 3600
    trainer_name: str = "trainer"

    def __post_init__(self) -> None:
        if not self.image:
            raise ValueError("LASAGNE_ENGINE_K8S_IMAGE is not set; set it to the image of the session pods.")
        host, separator, port = self.trainer_address.rpartition(":")
        if not separator or not host or not port.isdigit():
            raise ValueError(
                f"LASAGNE_ENGINE_K8S_TRAINER_ADDRESS={self.trainer_address!r} must be host:port that session pods "
                "reach the trainer at, for example lasagne-trainer:50153."
            )
        if host in ("0.0.0.0", "[::]"):
            raise ValueError(
                f"LASAGNE_ENGINE_K8S_TRAINER_ADDRESS={self.trainer_address!r} is where the trainer listens, not an "
                "address pods can reach; use the trainer's Service, for example lasagne-trainer:50153."
            )
        if host in ("127.0.0.1", "localhost", "[::1]"):
            logger.warning("LASAGNE_ENGINE_K8S_TRAINER_ADDRESS=%s is a loopback address, which only pods sharing "
                           "the trainer's network namespace can reach", self.trainer_address)
        if self.gpus not in (0, 1):
            raise ValueError(f"LASAGNE_ENGINE_K8S_GPUS={self.gpus} must be 0 or 1: a session uses one device.")
        if self.max_sessions < 1:
            raise ValueError(f"LASAGNE_ENGINE_K8S_MAX_SESSIONS={self.max_sessions} must be at least 1.")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise ValueError(
                f"LASAGNE_ENGINE_K8S_IMAGE_PULL_POLICY={self.image_pull_policy!r} must be Always, IfNotPresent or Never."
            )
        _check_quantity("LASAGNE_ENGINE_K8S_CPU", self.cpu)
        _check_quantity("LASAGNE_ENGINE_K8S_MEMORY", self.memory)
        if _LABEL_VALUE.match(self.trainer_name) is None or len(self.trainer_name) > 63:
            raise ValueError(
                f"LASAGNE_ENGINE_K8S_TRAINER_NAME={self.trainer_name!r} must be a Kubernetes label value: at most "
                "63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit."
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "KubernetesSettings":
        """Read the ``LASAGNE_ENGINE_K8S_*`` variables of ``environ`` (default ``os.environ``).

        Raises
        ------
        ValueError
            If a required variable is missing or a value is malformed; the message names the
            variable and the expected form.
        """
        environ = os.environ if environ is None else environ
        memory_budget = environ.get("LASAGNE_ENGINE_K8S_DEVICE_MEMORY_BYTES", "")
        return cls(
            image=environ.get("LASAGNE_ENGINE_K8S_IMAGE", ""),
            trainer_address=environ.get("LASAGNE_ENGINE_K8S_TRAINER_ADDRESS", ""),
            namespace=environ.get("LASAGNE_ENGINE_K8S_NAMESPACE", "") or _default_namespace(),
            max_sessions=_env_int(environ, "LASAGNE_ENGINE_K8S_MAX_SESSIONS", 4, minimum=1),
            gpus=_env_int(environ, "LASAGNE_ENGINE_K8S_GPUS", 1, minimum=0, maximum=1),
            device_memory_bytes=(
                _env_int(environ, "LASAGNE_ENGINE_K8S_DEVICE_MEMORY_BYTES", 0, minimum=1) if memory_budget else None
            ),
            cpu=environ.get("LASAGNE_ENGINE_K8S_CPU", "") or "2",
            memory=environ.get("LASAGNE_ENGINE_K8S_MEMORY", "") or "8Gi",
            image_pull_policy=environ.get("LASAGNE_ENGINE_K8S_IMAGE_PULL_POLICY", "") or "IfNotPresent",
            image_pull_secrets=tuple(
                name.strip() for name in environ.get("LASAGNE_ENGINE_K8S_IMAGE_PULL_SECRETS", "").split(",") if name.strip()
            ),
            service_account=environ.get("LASAGNE_ENGINE_K8S_SERVICE_ACCOUNT", ""),
            node_selector=_parse_pairs(
                "LASAGNE_ENGINE_K8S_NODE_SELECTOR", environ.get("LASAGNE_ENGINE_K8S_NODE_SELECTOR", "")
            ),
            compile_cache_claim=environ.get("LASAGNE_ENGINE_K8S_COMPILE_CACHE_CLAIM", ""),
            job_ttl_s=_env_int(environ, "LASAGNE_ENGINE_K8S_JOB_TTL_S", 3600, minimum=0),
            trainer_name=environ.get("LASAGNE_ENGINE_K8S_TRAINER_NAME", "") or "trainer",
        )

    @property
    def device_kind(self) -> str:
        return "gpu" if self.gpus else "cpu"


def kubernetes_devices(settings: KubernetesSettings) -> list[DeviceInfo]:
    """Return the devices ``k8s:0`` .. ``k8s:N-1`` that stand for the cluster's session slots.

    N is ``LASAGNE_ENGINE_K8S_MAX_SESSIONS``. The trainer places one session on each, and the
    cluster's scheduler decides which node and GPU its pod gets. Each budget is
    ``LASAGNE_ENGINE_K8S_DEVICE_MEMORY_BYTES``; without it, 15 GiB with a GPU or the pod's memory
    limit without one.
    """
    if settings.device_memory_bytes is not None:
        budget = settings.device_memory_bytes
    elif settings.gpus:
        budget = DEFAULT_GPU_MEMORY_BYTES
    else:
        budget = quantity_bytes(settings.memory)
    return [
        DeviceInfo(name=f"k8s:{index}", kind=settings.device_kind, memory_budget_bytes=budget)
        for index in range(settings.max_sessions)
    ]


def session_backend(settings: KubernetesSettings, configured: str) -> str:
    """Return the backend for sessions on the cluster: JAX on GPU pods when ``configured`` is ``auto``."""
    if configured != "auto":
        return configured
    return "jax" if settings.gpus else "default"


def load_api_client() -> "client.ApiClient":
    """Return an API client configured from the pod's service account, or else from ``~/.kube/config``.

    Raises
    ------
    ValueError
        If neither configuration can be loaded.
    """
    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            # Read KUBECONFIG now: the client reads it once, when it is imported.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
    except config.ConfigException as error:
        raise ValueError(
            f"Could not configure the Kubernetes client: {error}. Run the trainer in a pod with a service "
            "account, or give it a kubeconfig in ~/.kube/config or $KUBECONFIG."
        ) from error
    return client.ApiClient(configuration)


def job_name(session_id: str) -> str:
    """Return a fresh Job name for a launch of ``session_id``; a resumed session gets a new one."""
    safe = _NAME_UNSAFE.sub("-", session_id.lower()).strip("-")[:40] or "session"
    return f"lasagne-{safe}-{secrets.token_hex(3)}"


def _label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63].strip("-_.")
    return value or "unknown"


def _tls_files(security: ClientSecurity) -> dict[str, pathlib.Path]:
    paths = {"tls-ca": security.tls_ca, "tls-cert": security.tls_cert, "tls-key": security.tls_key}
    return {key: path for key, path in paths.items() if path is not None}


def pod_environment(
    settings: KubernetesSettings,
    request: LaunchRequest,
    secret_name: str,
    environ: Mapping[str, str],
    security: ClientSecurity,
) -> list[dict]:
    """Return the container's ``env``: compute settings, forwarded variables, and the tokens and
    TLS files of ``secret_name``.

    The session process calls the registry and the data service and attaches to the trainer, so
    it gets the trainer's own client token and TLS files, and no config file.
    """
    base = {
        name: value
        for name, value in environ.items()
        if (name.startswith(_FORWARDED_PREFIXES) or name in _FORWARDED_NAMES)
        and not name.startswith(_NOT_FORWARDED_PREFIXES)
        and name not in _NOT_FORWARDED_NAMES
    }
    variables = compute_environment(
        pathlib.PurePosixPath(COMPILE_CACHE_DIR), backend=request.backend, base=base, create_cache=False
    )
    if not settings.gpus:
        # The device plugin shows a GPU pod only its own GPU; a CPU pod must not try any.
        variables["CUDA_VISIBLE_DEVICES"] = ""
        variables.setdefault("JAX_PLATFORMS", "cpu")
    variables["PYTHONUNBUFFERED"] = "1"
    variables["HOME"] = WORK_DIR
    variables[CONFIG_VARIABLE] = os.devnull
    for key in _tls_files(security):
        variables[TLS_FILES[key]] = f"{TLS_DIR}/{key}.pem"
    env = [{"name": name, "value": value} for name, value in sorted(variables.items())]
    env.append({"name": TOKEN_VARIABLE, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": TOKEN_KEY}}})
    if security.token:
        env.append({"name": "LASAGNE_ENGINE_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": secret_name, "key": CLIENT_TOKEN_KEY}}})
    return env


def job_manifest(
    settings: KubernetesSettings,
    request: LaunchRequest,
    name: str,
    environ: Mapping[str, str] | None = None,
    security: ClientSecurity | None = None,
) -> dict:
    """Return the Job that runs one launch of a session, as the JSON body the API receives.

    The pod runs as an unprivileged user on a read-only root filesystem, with emptyDir volumes
    for its working folder, ``/tmp`` and (unless a claim is set) the compile cache. With
    ``gpus`` set it requests and is limited to one ``nvidia.com/gpu`` and tolerates the taint
    that GPU node pools commonly carry. ``backoffLimit`` is 0 because the trainer, not the Job
    controller, decides what a failed session becomes.
    """
    environ = os.environ if environ is None else environ
    security = security if security is not None else ClientSecurity()
    labels = {
        "app.kubernetes.io/name": "lasagne-engine",
        "app.kubernetes.io/component": "session",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        SESSION_LABEL: _label_value(request.session_id),
        TRAINER_LABEL: settings.trainer_name,
    }
    env = pod_environment(settings, request, name, environ, security)

    resources: dict = {
        "requests": {"cpu": settings.cpu, "memory": settings.memory},
        "limits": {"memory": settings.memory},
    }
    if settings.gpus:
        resources["requests"][GPU_RESOURCE] = str(settings.gpus)
        resources["limits"][GPU_RESOURCE] = str(settings.gpus)
    if settings.compile_cache_claim:
        cache_volume = {"name": "compile-cache", "persistentVolumeClaim": {"claimName": settings.compile_cache_claim}}
    else:
        cache_volume = {"name": "compile-cache", "emptyDir": {}}

    volumes = [{"name": "work", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}, cache_volume]
    mounts = [
        {"name": "work", "mountPath": WORK_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "compile-cache", "mountPath": COMPILE_CACHE_DIR},
    ]
    tls_keys = sorted(_tls_files(security))
    if tls_keys:
        items = [{"key": key, "path": f"{key}.pem"} for key in tls_keys]
        volumes.append({"name": "tls", "secret": {"secretName": name, "items": items, "defaultMode": 0o400}})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})

    container = {
        "name": CONTAINER_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": [
            "python", "-m", "lasagne_engine.trainer.worker",
            "--session-id", request.session_id,
            "--trainer", settings.trainer_address,
        ],
        "workingDir": WORK_DIR,
        "env": env,
        "resources": resources,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    pod_spec: dict = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SESSION_UID,
            "runAsGroup": SESSION_UID,
            "fsGroup": SESSION_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if settings.gpus:
        pod_spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": secret} for secret in settings.image_pull_secrets]

    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": settings.job_ttl_s,
            "template": {
                "metadata": {"labels": {**labels, JOB_LABEL: name}},
                "spec": pod_spec,
            },
        },
    }


def secret_manifest(
    settings: KubernetesSettings, request: LaunchRequest, name: str, security: ClientSecurity | None = None
) -> dict:
    """Return the Secret of one launch, under the Job's name: the session's token, and the
    trainer's client token and TLS files when it has them.

    Raises
    ------
    OSError
        If a TLS file cannot be read.
    """
    security = security if security is not None else ClientSecurity()
    data = {TOKEN_KEY: request.token}
    if security.token:
        data[CLIENT_TOKEN_KEY] = security.token
    for key, path in _tls_files(security).items():
        data[key] = pathlib.Path(path).read_text()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": {
                "app.kubernetes.io/name": "lasagne-engine",
                "app.kubernetes.io/component": "session",
                "app.kubernetes.io/managed-by": MANAGED_BY,
                SESSION_LABEL: _label_value(request.session_id),
                TRAINER_LABEL: settings.trainer_name,
            },
        },
        "type": "Opaque",
        "stringData": data,
    }


def _exit_code(code: int) -> int:
    # Container runtimes report death by signal N as exit code 128 + N; the trainer's messages
    # print negative codes as signal names, as for a local process.
    if 128 < code <= 128 + 64:
        return -(code - 128)
    return code


def _job_finished(job) -> str | None:
    for condition in (job.status.conditions if job.status else None) or []:
        if condition.type in ("Complete", "Failed") and condition.status == "True":
            return condition.type
    return None


def _created_at(resource) -> float:
    timestamp = resource.metadata.creation_timestamp
    return timestamp.timestamp() if timestamp is not None else 0.0


def _describe_api_error(error: Exception) -> str:
    if isinstance(error, ApiException):
        return f"HTTP {error.status} {error.reason}".strip()
    return f"{type(error).__name__}: {error}"


class KubernetesSession:
    """A session's Job, with the thread that watches it and reports its end once."""

    def __init__(
        self,
        launcher: "KubernetesLauncher",
        name: str,
        session_id: str,
        on_exit: Callable[[int, str], None],
    ):
        self.name = name
        self.session_id = session_id
        self._launcher = launcher
        self._on_exit = on_exit
        # _ended is set once the Job's end is known; _reported once on_exit has returned.
        self._ended = threading.Event()
        self._reported = threading.Event()
        self._lock = threading.Lock()
        self._deletion_requested = False
        # Set when the launcher deletes a Job whose pod cannot start, to explain the exit.
        self._failure_message = ""
        self._watcher = threading.Thread(target=self._watch, name=f"session-job-{name}", daemon=True)
        self._watcher.start()

    @property
    def pid(self) -> int:
        """0: the process runs in a pod on another node."""
        return 0

    def running(self) -> bool:
        return not self._ended.is_set()

    def terminate(self) -> None:
        """Delete the Job and its pod; the pod gets its normal grace period after SIGTERM."""
        self._delete(grace_period_s=None)

    def kill(self) -> None:
        """Delete the Job and its pod at once."""
        self._delete(grace_period_s=0)

    def join(self, timeout_s: float | None = None) -> None:
        """Wait until ``on_exit`` has been called and has returned, or ``timeout_s`` passes."""
        self._reported.wait(timeout_s)

    def _delete(self, *, grace_period_s: int | None) -> None:
        if self._ended.is_set():
            return
        with self._lock:
            self._deletion_requested = True
        self._launcher.delete_job(self.name, grace_period_s=grace_period_s)

    # Watching ------------------------------------------------------------------------------

    def _watch(self) -> None:
        failures = 0
        while not self._ended.is_set() and not self._launcher.closed.is_set():
            try:
                self._watch_once()
                failures = 0
            except ApiException as error:
                if error.status == 410:
                    # The resource version expired; the next list starts afresh.
                    continue
                failures = self._pause_after_error(error, failures)
            except Exception as error:  # noqa: BLE001 - a broken connection must not end the watch
                failures = self._pause_after_error(error, failures)

    def _pause_after_error(self, error: Exception, failures: int) -> int:
        if failures == 0:
            logger.warning("Watching Job %s of session %s failed (%s); retrying",
                           self.name, self.session_id, _describe_api_error(error))
        else:
            logger.debug("Watching Job %s failed again: %s", self.name, error)
        self._launcher.closed.wait(RETRY_BACKOFF_S[min(failures, len(RETRY_BACKOFF_S) - 1)])
        return failures + 1

    def _watch_once(self) -> None:
        launcher = self._launcher
        field_selector = f"metadata.name={self.name}"
        listing = launcher.batch.list_namespaced_job(launcher.settings.namespace, field_selector=field_selector)
        if not listing.items:
            self._finish_deleted()
            return
        job = listing.items[0]
        if self._check_job(job):
            return
        self._check_pod_start()
        if self._ended.is_set():
            return

        stream = watch.Watch().stream(
            launcher.batch.list_namespaced_job,
            launcher.settings.namespace,
            field_selector=field_selector,
            resource_version=listing.metadata.resource_version,
            timeout_seconds=launcher.watch_timeout_s,
            _request_timeout=launcher.watch_timeout_s + 30,
        )
        for event in stream:
            if event["type"] == "DELETED":
                self._finish_deleted()
                return
            if event["type"] in ("ADDED", "MODIFIED") and self._check_job(event["object"]):
                return

    def _check_job(self, job) -> bool:
        outcome = _job_finished(job)
        if outcome is None:
            return False
        returncode, tail = self._launcher.pod_outcome(self.name)
        if returncode is None:
            # The Job failed without a container that ran to an end, for example after eviction.
            returncode = 1
            detail = ""
            for condition in job.status.conditions or []:
                if condition.type == outcome:
                    detail = condition.message or condition.reason or ""
            tail = "\n".join(filter(None, [tail, f"The Job {self.name} failed: {detail or 'no reason given'}."]))
        self._finish(returncode, tail)
        return True

    def _check_pod_start(self) -> None:
        reason = self._launcher.fatal_waiting_reason(self.name)
        if reason is None:
            return
        logger.error("Session %s cannot start: its pod is waiting with %s; deleting Job %s",
                     self.session_id, reason, self.name)
        with self._lock:
            self._failure_message = f"The session's pod could not start: {reason}"
            self._deletion_requested = True
        self._launcher.delete_job(self.name, grace_period_s=0)

    def _finish_deleted(self) -> None:
        with self._lock:
            requested = self._deletion_requested
            failure = self._failure_message
        if failure:
            self._finish(1, failure)
        elif requested:
            self._finish(-signal.SIGTERM, "")
        else:
            self._finish(-signal.SIGKILL, f"The Job {self.name} was deleted by something other than the trainer.")

    def _finish(self, returncode: int, tail: str) -> None:
        with self._lock:
            if self._ended.is_set():
                return
            self._ended.set()
        self._launcher.delete_secret(self.name)
        logger.info("Session %s: Job %s ended with code %d", self.session_id, self.name, returncode)
        try:
            self._on_exit(returncode, tail)
        finally:
            self._reported.set()


class KubernetesLauncher:
    """Starts each session as a Kubernetes Job; the interface is that of ``LocalLauncher``.

    Parameters
    ----------
    settings : KubernetesSettings
        Image, namespace, resources and the address pods attach to.
    api_client : kubernetes.client.ApiClient, optional
        Default :func:`load_api_client`, from the pod's service account or the kubeconfig.
    environ : mapping, optional
        Variables that the pods inherit some of, see :func:`pod_environment`. Default ``os.environ``.
    security : ClientSecurity, optional
        The client token and TLS files that session pods get. Default: the trainer's own,
        ``ClientSecurity.from_env()``.
    watch_timeout_s : int
        Seconds each watch request stays open before the launcher lists the Job again and checks
        whether its pod is stuck. Default 60.
    """

    def __init__(
        self,
        settings: KubernetesSettings,
        *,
        api_client: "client.ApiClient | None" = None,
        environ: Mapping[str, str] | None = None,
        security: ClientSecurity | None = None,
        watch_timeout_s: int = WATCH_TIMEOUT_S,
    ):
        self.settings = settings
        self.security = security if security is not None else ClientSecurity.from_env()
        self.api_client = api_client if api_client is not None else load_api_client()
        self.core = client.CoreV1Api(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.environ = dict(os.environ if environ is None else environ)
        self.watch_timeout_s = watch_timeout_s
        self.closed = threading.Event()

    def close(self) -> None:
        """Stop watching the Jobs; each watch thread ends within ``watch_timeout_s``. Jobs keep running."""
        self.closed.set()

    def launch(self, request: LaunchRequest, on_exit: Callable[[int, str], None]) -> KubernetesSession:
        """Create the Secret and the Job of one launch and start watching the Job.

        Raises
        ------
        LaunchError
            If the API rejects a request or cannot be reached; nothing of the launch is left behind.
        """
        namespace = self.settings.namespace
        name = job_name(request.session_id)
        job = job_manifest(self.settings, request, name, self.environ, self.security)

        try:
            self.core.create_namespaced_secret(namespace, secret_manifest(self.settings, request, name, self.security))
        except Exception as error:  # noqa: BLE001 - ApiException and urllib3's connection errors alike
            raise LaunchError(
                f"Could not create Secret {name} in namespace {namespace!r}: {_describe_api_error(error)}"
            ) from error
        try:
            created = self.batch.create_namespaced_job(namespace, job)
        except Exception as error:  # noqa: BLE001
            self.delete_secret(name)
            raise LaunchError(
                f"Could not create Job {name} in namespace {namespace!r}: {_describe_api_error(error)}"
            ) from error
        self._adopt_secret(name, created.metadata.uid)

        logger.info("Started session %s as Job %s in namespace %s (%s)", request.session_id, name, namespace,
                    f"{self.settings.gpus} {GPU_RESOURCE}" if self.settings.gpus else "no GPU")
        return KubernetesSession(self, name, request.session_id, on_exit)

    def _adopt_secret(self, name: str, job_uid: str) -> None:
        # With the Job as owner, Kubernetes deletes the Secret when the Job goes, even if the
        # trainer is gone by then.
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job_uid}
        patch = [{"op": "add", "path": "/metadata/ownerReferences", "value": [owner]}]
        try:
            self.core.patch_namespaced_secret(name, self.settings.namespace, patch)
        except Exception as error:  # noqa: BLE001 - the launcher still deletes the Secret itself
            logger.warning("Could not make Job %s the owner of its Secret (%s); the trainer deletes the Secret "
                           "when the session ends", name, _describe_api_error(error))

    def delete_job(self, name: str, *, grace_period_s: int | None) -> None:
        """Delete a Job and, before it, its pods (foreground propagation); a Job already gone is fine."""
        options = client.V1DeleteOptions(propagation_policy="Foreground", grace_period_seconds=grace_period_s)
        try:
            self.batch.delete_namespaced_job(name, self.settings.namespace, body=options)
        except ApiException as error:
            if error.status != 404:
                logger.error("Could not delete Job %s: %s", name, _describe_api_error(error))
        except Exception as error:  # noqa: BLE001
            logger.error("Could not delete Job %s: %s", name, _describe_api_error(error))

    def delete_secret(self, name: str) -> None:
        try:
            self.core.delete_namespaced_secret(name, self.settings.namespace)
        except ApiException as error:
            if error.status != 404:
                logger.warning("Could not delete Secret %s: %s", name, _describe_api_error(error))
        except Exception as error:  # noqa: BLE001
            logger.warning("Could not delete Secret %s: %s", name, _describe_api_error(error))

    def _pods(self, name: str) -> list:
        pods = self.core.list_namespaced_pod(self.settings.namespace, label_selector=f"{JOB_LABEL}={name}").items
        return sorted(pods, key=_created_at)

    def pod_outcome(self, name: str) -> tuple[int | None, str]:
        """Return the exit code of the Job's session container (None if none ended) and its last log lines."""
        try:
            pods = self._pods(name)
        except Exception as error:  # noqa: BLE001
            logger.warning("Could not list the pods of Job %s: %s", name, _describe_api_error(error))
            return None, ""
        if not pods:
            return None, ""
        pod = pods[-1]
        returncode, note = None, ""
        for status in (pod.status.container_statuses if pod.status else None) or []:
            if status.name != CONTAINER_NAME:
                continue
            terminated = (status.state and status.state.terminated) or (
                status.last_state and status.last_state.terminated
            )
            if terminated is not None:
                returncode = _exit_code(terminated.exit_code)
                if terminated.reason == "OOMKilled":
                    note = (f"The container exceeded its memory limit of {self.settings.memory}; raise "
                            "LASAGNE_ENGINE_K8S_MEMORY.")
        if pod.status is not None and pod.status.reason:
            note = "\n".join(filter(None, [note, f"The pod {pod.metadata.name} ended: {pod.status.reason}: "
                                                 f"{pod.status.message or ''}".rstrip(": ")]))
        try:
            # The client turns a text body into the repr of its bytes when it deserializes it as
            # "str" (kubernetes 36.0.3), so the launcher reads the raw body and decodes it.
            response = self.core.read_namespaced_pod_log(
                pod.metadata.name, self.settings.namespace, container=CONTAINER_NAME, tail_lines=LOG_TAIL_LINES,
                _preload_content=False,
            )
            log = response.data.decode("utf-8", errors="replace")
        except Exception as error:  # noqa: BLE001 - the log is a courtesy; the exit code matters
            logger.warning("Could not read the log of pod %s: %s", pod.metadata.name, _describe_api_error(error))
            log = ""
        return returncode, "\n".join(filter(None, [log.rstrip("\n"), note]))

    def fatal_waiting_reason(self, name: str) -> str | None:
        """Return ``reason: message`` if the Job's pod waits for something that will not come by itself."""
        try:
            pods = self._pods(name)
        except Exception as error:  # noqa: BLE001 - checked again at the next watch
            logger.debug("Could not list the pods of Job %s: %s", name, error)
            return None
        for pod in pods:
            for status in (pod.status.container_statuses if pod.status else None) or []:
                waiting = status.state.waiting if status.state else None
                if waiting is not None and waiting.reason in FATAL_WAITING_REASONS:
                    return f"{waiting.reason}: {waiting.message or 'no message'}"
        return None
