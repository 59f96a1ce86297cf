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

:mod:`lasagne_engine.trainer.kubernetes_jobs` reads the settings and builds the manifests.
"""

import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping

from lasagne_engine.security import ClientSecurity
from lasagne_engine.trainer.kubernetes_jobs import (
    CONTAINER_NAME,
    GPU_RESOURCE,
    JOB_LABEL,
    KubernetesSettings,
    job_manifest,
    job_name,
    secret_manifest,
)
from lasagne_engine.trainer.launcher import LaunchRequest

try:
    from kubernetes import client, config, watch
    from kubernetes.client.exceptions import ApiException
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "The Kubernetes launcher needs the official client; install it with "
        "pip install 'lasagne-engine[kubernetes]'."
    ) from error

__all__ = ["KubernetesLauncher", "KubernetesSession", "LaunchError", "load_api_client"]

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 50
WATCH_TIMEOUT_S = 60
RETRY_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
# Waiting reasons after which a pod will not start without someone changing the cluster or the
# settings, so the session fails instead of staying pending. Unschedulable pods are not among
# them: they wait for a free GPU, which is how the cluster queues sessions.
FATAL_WAITING_REASONS = frozenset(
    {"ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"}
)


class LaunchError(OSError):
    """The Kubernetes API rejected a request to start a session, or could not be reached."""


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

    def end_orphan(self, session_id: str, pid: int, timeout_s: float) -> None:
        """Leave a Job of a previous trainer run to end by itself.

        Its session process checkpoints and exits once it loses its trainer, and Kubernetes
        keeps a new pod off the GPU until then, so nothing here needs to wait or delete.
        """
        logger.info("Session %s: its Job from the previous trainer run ends by itself after a checkpoint", session_id)

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
