"""Settings and manifests of the Jobs that run sessions on a Kubernetes cluster.

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
from collections.abc import Mapping
from dataclasses import dataclass, field

from lasagne_engine.compute import compute_environment
from lasagne_engine.security import CONFIG_VARIABLE, ClientSecurity
from lasagne_engine.trainer.devices import DeviceInfo
from lasagne_engine.trainer.launcher import LaunchRequest
from lasagne_engine.trainer.worker import TOKEN_VARIABLE

__all__ = [
    "KubernetesSettings",
    "job_manifest",
    "job_name",
    "kubernetes_devices",
    "pod_environment",
    "quantity_bytes",
    "secret_manifest",
    "session_backend",
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
TLS_FILES = {
    "tls-ca": "LASAGNE_ENGINE_TLS_CA",
    "tls-cert": "LASAGNE_ENGINE_TLS_CERT",
    "tls-key": "LASAGNE_ENGINE_TLS_KEY",
}
TLS_DIR = "/etc/lasagne-engine/tls"
GPU_RESOURCE = "nvidia.com/gpu"
# Folders inside the session pod. The image's root filesystem is mounted read-only.
WORK_DIR = "/var/lib/lasagne-engine/session"
COMPILE_CACHE_DIR = "/var/cache/lasagne-engine"
# UID of the user that the images create. The pod runs as this UID whatever user the image sets.
SESSION_UID = 10001
# NOTE: a guess for a GPU whose size the trainer cannot see: a 16 GiB card less the 1 GiB the
# local launcher keeps back. Set LASAGNE_ENGINE_K8S_DEVICE_MEMORY_BYTES to the cluster's GPUs.
DEFAULT_GPU_MEMORY_BYTES = 15 << 30
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
