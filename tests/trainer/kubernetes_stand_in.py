"""A stand-in for the Kubernetes API on 127.0.0.1 that records and checks the requests the official
client sends, and plays the Job controller and the kubelet for the launcher's tests.

It serves only the calls the Kubernetes launcher makes: Secrets (create, JSON patch, delete), Jobs
(create, list, watch, delete) and Pods (list, log). Every Job and Secret it receives is validated
against the Kubernetes schemas of ``kubernetes-validate`` for each version in
``KUBERNETES_VERSIONS``, with unknown fields as errors. A request that breaks a rule the real API
server enforces gets the status code that server would send. The stand-in also records the problem
in ``problems``, so a test can assert there were none.

Tests drive the cluster's side themselves (``finish_pod``, ``set_waiting``) or attach a
:class:`LocalKubelet`, which runs each Job's container command as a local process with the Job's
environment and its volumes mapped to local folders.
"""

import base64
import copy
import datetime
import http.server
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

import kubernetes_validate

# An older release that clusters still run, and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# A label selector of the one form the launcher sends: key=value.
_EQUALITY_SELECTOR = re.compile(r"^([A-Za-z0-9./_-]+)=([A-Za-z0-9._-]*)$")
_ROUTES = [
    ("secrets", re.compile(r"^/api/v1/namespaces/(?P<namespace>[a-z0-9-]+)/secrets(?:/(?P<name>[a-z0-9.-]+))?$")),
    ("jobs", re.compile(r"^/apis/batch/v1/namespaces/(?P<namespace>[a-z0-9-]+)/jobs(?:/(?P<name>[a-z0-9.-]+))?$")),
    ("log", re.compile(r"^/api/v1/namespaces/(?P<namespace>[a-z0-9-]+)/pods/(?P<name>[a-z0-9.-]+)/log$")),
    ("pods", re.compile(r"^/api/v1/namespaces/(?P<namespace>[a-z0-9-]+)/pods$")),
]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_manifest(manifest: dict) -> list[str]:
    """Return the schema violations of ``manifest`` for each version in ``KUBERNETES_VERSIONS``."""
    problems = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            location = "/".join(str(part) for part in error.path)
            problems.append(f"Kubernetes {version}: {manifest.get('kind')} {location}: {error.message}")
    return problems


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class Request:
    """One request as the stand-in received it."""

    def __init__(self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body):
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"{self.method} {self.path}?{urllib.parse.urlencode(self.query)}"


class StandInApi:
    """The stand-in server and the state of its one-namespace cluster."""

    def __init__(self, namespace: str = "lasagne"):
        self.namespace = namespace
        self.requests: list[Request] = []
        self.problems: list[str] = []
        self.secrets: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.pods: dict[str, dict] = {}
        self.logs: dict[str, str] = {}
        # Each change to a Job as (resource version, event type, Job), in order.
        self.job_events: list[tuple[int, str, dict]] = []
        self.deletions: list[tuple[str, dict]] = []
        self.kubelet: "LocalKubelet | None" = None
        # Error to return to the next Job creation, as (code, reason), for failure tests.
        self.fail_next_job_create: tuple[int, str] | None = None
        self._resource_version = 100
        self._changed = threading.Condition()
        handler = type("Handler", (_Handler,), {"api": self})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="kubernetes-stand-in",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self.kubelet is not None:
            self.kubelet.stop_all()
        with self._changed:
            self._changed.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: pathlib.Path) -> pathlib.Path:
        """Write a kubeconfig that points the official client at this server."""
        path.write_text(json.dumps({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "stand-in-token"}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "tester",
                                                          "namespace": self.namespace}}],
            "current-context": "stand-in",
        }))
        return path

    # The cluster's side -----------------------------------------------------------------------

    def _next_version(self) -> int:
        self._resource_version += 1
        return self._resource_version

    def _record_job_event(self, kind: str, job: dict) -> None:
        version = self._next_version()
        job["metadata"]["resourceVersion"] = str(version)
        self.job_events.append((version, kind, copy.deepcopy(job)))
        self._changed.notify_all()

    def start_pod(self, job_name: str) -> dict:
        """Create the Job's pod in phase Running, as the Job controller and the kubelet would."""
        with self._changed:
            job = self.jobs[job_name]
            template = job["spec"]["template"]
            pod_name = f"{job_name}-{uuid.uuid4().hex[:5]}"
            container = template["spec"]["containers"][0]
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": self.namespace, "uid": str(uuid.uuid4()),
                             "labels": dict(template["metadata"]["labels"]), "creationTimestamp": now(),
                             "resourceVersion": str(self._next_version())},
                "spec": copy.deepcopy(template["spec"]),
                "status": {"phase": "Running", "containerStatuses": [{
                    "name": container["name"], "image": container["image"], "imageID": "", "ready": True,
                    "restartCount": 0, "state": {"running": {"startedAt": now()}},
                }]},
            }
            self.pods[pod_name] = pod
            job.setdefault("status", {})["active"] = 1
            self._record_job_event("MODIFIED", job)
            return pod

    def set_waiting(self, job_name: str, reason: str, message: str) -> None:
        """Put the Job's pod in a waiting state, as for an image that cannot be pulled."""
        pod = self._pod_of(job_name) or self.start_pod(job_name)
        with self._changed:
            status = pod["status"]
            status["phase"] = "Pending"
            status["containerStatuses"][0]["ready"] = False
            status["containerStatuses"][0]["state"] = {"waiting": {"reason": reason, "message": message}}

    def finish_pod(self, job_name: str, exit_code: int, log: str = "", *, reason: str = "") -> None:
        """End the Job's pod with ``exit_code`` and mark the Job Complete or Failed."""
        with self._changed:
            if job_name not in self.jobs:
                return
            pod = self._pod_of(job_name) or self.start_pod(job_name)
            state = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                     "startedAt": now(), "finishedAt": now()}
            pod["status"]["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            pod["status"]["containerStatuses"][0].update(ready=False, state={"terminated": state})
            self.logs[pod["metadata"]["name"]] = log
            job = self.jobs[job_name]
            status = job.setdefault("status", {})
            status.pop("active", None)
            status["succeeded" if exit_code == 0 else "failed"] = 1
            condition = "Complete" if exit_code == 0 else "Failed"
            status["conditions"] = [{"type": condition, "status": "True", "lastTransitionTime": now(),
                                     "reason": "" if exit_code == 0 else "BackoffLimitExceeded",
                                     "message": "" if exit_code == 0 else "Job has reached the specified backoff limit"}]
            self._record_job_event("MODIFIED", job)

    def delete_job_externally(self, job_name: str) -> None:
        """Delete a Job as a person with kubectl would."""
        with self._changed:
            self._delete_job(job_name)

    def _pod_of(self, job_name: str) -> dict | None:
        with self._changed:
            for pod in self.pods.values():
                if pod["metadata"]["labels"].get("lasagne-engine/job") == job_name:
                    return pod
        return None

    def _delete_job(self, name: str) -> None:
        job = self.jobs.pop(name)
        for pod_name in [pod_name for pod_name, pod in self.pods.items()
                         if pod["metadata"]["labels"].get("lasagne-engine/job") == name]:
            del self.pods[pod_name]
        job["metadata"]["deletionTimestamp"] = now()
        self._record_job_event("DELETED", job)
        for secret in list(self.secrets.values()):
            owners = secret["metadata"].get("ownerReferences", [])
            if any(owner["uid"] == job["metadata"]["uid"] for owner in owners):
                del self.secrets[secret["metadata"]["name"]]

    def wait_for(self, predicate, timeout_s: float = 10.0, message: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError(f"Timed out after {timeout_s} s waiting for {message}; requests: {self.requests}")

    def requests_to(self, method: str, resource_path_part: str) -> list[Request]:
        return [request for request in self.requests if request.method == method and resource_path_part in request.path]


class _Handler(http.server.BaseHTTPRequestHandler):
    api: StandInApi
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        pass

    def _send_json(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _reject(self, code: int, reason: str, message: str) -> None:
        self.api.problems.append(f"{self.command} {self.path}: {message}")
        self._send_json(code, _status(code, reason, message))

    def _dispatch(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            self._reject(400, "BadRequest", f"Body is not JSON: {raw[:200]!r}")
            return
        request = Request(self.command, url.path, query, dict(self.headers), body)
        self.api.requests.append(request)

        if "application/json" not in self.headers.get("Accept", ""):
            self._reject(406, "NotAcceptable", f"Accept {self.headers.get('Accept')!r} does not include application/json")
            return
        if self.headers.get("Authorization") != "Bearer stand-in-token":
            self._reject(401, "Unauthorized", "The request did not carry the kubeconfig's bearer token")
            return
        for resource, pattern in _ROUTES:
            match = pattern.match(url.path)
            if match is None:
                continue
            if match["namespace"] != self.api.namespace:
                self._reject(403, "Forbidden", f"Namespace {match['namespace']!r} is not {self.api.namespace!r}")
                return
            handler = getattr(self, f"_{self.command.lower()}_{resource}", None)
            if handler is None:
                break
            handler(request, match.groupdict().get("name"))
            return
        self._reject(404, "NotFound", f"The stand-in does not serve {self.command} {url.path}")

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _dispatch

    # Secrets --------------------------------------------------------------------------------

    def _check_create(self, request: Request, kind: str, api_version: str) -> bool:
        if self.headers.get("Content-Type") != "application/json":
            self._reject(415, "UnsupportedMediaType", f"Content-Type {self.headers.get('Content-Type')!r}")
            return False
        body = request.body or {}
        if body.get("kind") != kind or body.get("apiVersion") != api_version:
            self._reject(400, "BadRequest", f"Expected {api_version} {kind}, got {body.get('apiVersion')} {body.get('kind')}")
            return False
        if body.get("metadata", {}).get("namespace", self.api.namespace) != self.api.namespace:
            self._reject(400, "BadRequest", "metadata.namespace does not match the request's namespace")
            return False
        problems = validate_manifest(body)
        if problems:
            self._reject(422, "Invalid", "; ".join(problems))
            return False
        return True

    def _post_secrets(self, request: Request, name: str | None) -> None:
        if name is not None or not self._check_create(request, "Secret", "v1"):
            return
        secret = copy.deepcopy(request.body)
        secret_name = secret["metadata"]["name"]
        with self.api._changed:
            if secret_name in self.api.secrets:
                self._send_json(409, _status(409, "AlreadyExists", f'secrets "{secret_name}" already exists'))
                return
            # The API server stores stringData as base64 data, as here.
            data = secret.setdefault("data", {})
            for key, value in secret.pop("stringData", {}).items():
                data[key] = base64.b64encode(value.encode()).decode()
            secret["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=now(),
                                      resourceVersion=str(self.api._next_version()))
            self.api.secrets[secret_name] = secret
        self._send_json(201, secret)

    def _patch_secrets(self, request: Request, name: str | None) -> None:
        if self.headers.get("Content-Type") != "application/json-patch+json":
            self._reject(415, "UnsupportedMediaType", f"Content-Type {self.headers.get('Content-Type')!r} for a JSON patch")
            return
        operations = request.body
        if not isinstance(operations, list) or not all(
            isinstance(operation, dict) and operation.get("op") in ("add", "replace", "remove") and
            isinstance(operation.get("path"), str) for operation in operations
        ):
            self._reject(422, "Invalid", f"Not a JSON patch: {operations!r}")
            return
        with self.api._changed:
            secret = self.api.secrets.get(name)
            if secret is None:
                self._send_json(404, _status(404, "NotFound", f'secrets "{name}" not found'))
                return
            for operation in operations:
                if operation["path"] != "/metadata/ownerReferences" or operation["op"] != "add":
                    self._reject(422, "Invalid", f"The stand-in applies only add /metadata/ownerReferences: {operation}")
                    return
                owners = operation["value"]
                for owner in owners:
                    job = self.api.jobs.get(owner.get("name"))
                    if (owner.get("kind"), owner.get("apiVersion")) != ("Job", "batch/v1") or job is None or \
                            job["metadata"]["uid"] != owner.get("uid"):
                        self._reject(422, "Invalid", f"ownerReference {owner} names no existing Job")
                        return
                secret["metadata"]["ownerReferences"] = owners
            patched = copy.deepcopy(secret)
        self._send_json(200, patched)

    def _delete_secrets(self, request: Request, name: str | None) -> None:
        with self.api._changed:
            secret = self.api.secrets.pop(name, None)
        if secret is None:
            self._send_json(404, _status(404, "NotFound", f'secrets "{name}" not found'))
            return
        self._send_json(200, _status(200, "", "") | {"status": "Success"})

    # Jobs -----------------------------------------------------------------------------------

    def _post_jobs(self, request: Request, name: str | None) -> None:
        if name is not None or not self._check_create(request, "Job", "batch/v1"):
            return
        if self.api.fail_next_job_create is not None:
            code, reason = self.api.fail_next_job_create
            self.api.fail_next_job_create = None
            self._send_json(code, _status(code, reason, f"jobs.batch is forbidden: {reason}"))
            return
        job = copy.deepcopy(request.body)
        job_name = job["metadata"]["name"]
        secret_names = [variable["valueFrom"]["secretKeyRef"]["name"]
                        for variable in job["spec"]["template"]["spec"]["containers"][0].get("env", [])
                        if "valueFrom" in variable]
        with self.api._changed:
            if job_name in self.api.jobs:
                self._send_json(409, _status(409, "AlreadyExists", f'jobs.batch "{job_name}" already exists'))
                return
            for secret_name in secret_names:
                if secret_name not in self.api.secrets:
                    self.api.problems.append(f"Job {job_name} refers to Secret {secret_name}, which does not exist yet")
            job["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=now())
            job["status"] = {}
            self.api.jobs[job_name] = job
            self.api._record_job_event("ADDED", job)
            created = copy.deepcopy(job)
        self._send_json(201, created)
        if self.api.kubelet is not None:
            self.api.kubelet.run(job_name)

    def _get_jobs(self, request: Request, name: str | None) -> None:
        selector = request.query.get("fieldSelector", "")
        match = re.fullmatch(r"metadata\.name=([a-z0-9.-]+)", selector)
        if name is not None or match is None:
            self._reject(400, "BadRequest", f"The launcher lists one Job by fieldSelector, not {request.query}")
            return
        wanted = match[1]
        if request.query.get("watch", "").lower() != "true":
            with self.api._changed:
                items = [copy.deepcopy(job) for job_name, job in self.api.jobs.items() if job_name == wanted]
                version = self.api._resource_version
            self._send_json(200, {"kind": "JobList", "apiVersion": "batch/v1",
                                  "metadata": {"resourceVersion": str(version)}, "items": items})
            return
        self._watch_jobs(request, wanted)

    def _watch_jobs(self, request: Request, wanted: str) -> None:
        try:
            since = int(request.query["resourceVersion"])
            timeout_s = int(request.query["timeoutSeconds"])
        except (KeyError, ValueError):
            self._reject(400, "BadRequest", f"A watch needs resourceVersion and timeoutSeconds: {request.query}")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                with self.api._changed:
                    events = [(version, kind, job) for version, kind, job in self.api.job_events
                              if version > since and job["metadata"]["name"] == wanted]
                    if not events:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self.api._changed.wait(min(remaining, 0.2))
                        continue
                for version, kind, job in events:
                    line = json.dumps({"type": kind, "object": job}).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    since = version
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _delete_jobs(self, request: Request, name: str | None) -> None:
        options = request.body or {}
        if options.get("propagationPolicy") not in ("Foreground", "Background"):
            self._reject(422, "Invalid", f"Deleting a Job without propagation leaves its pods running: {options}")
            return
        with self.api._changed:
            if name not in self.api.jobs:
                self._send_json(404, _status(404, "NotFound", f'jobs.batch "{name}" not found'))
                return
            self.api.deletions.append((name, options))
        if self.api.kubelet is not None:
            self.api.kubelet.stop(name, options.get("gracePeriodSeconds"))
        with self.api._changed:
            if name in self.api.jobs:
                job = copy.deepcopy(self.api.jobs[name])
                self.api._delete_job(name)
            else:
                job = None
        if job is None:
            self._send_json(404, _status(404, "NotFound", f'jobs.batch "{name}" not found'))
            return
        self._send_json(200, job)

    # Pods -----------------------------------------------------------------------------------

    def _get_pods(self, request: Request, name: str | None) -> None:
        match = _EQUALITY_SELECTOR.match(request.query.get("labelSelector", ""))
        if match is None:
            self._reject(400, "BadRequest", f"The launcher lists pods by one label, not {request.query}")
            return
        key, value = match.groups()
        with self.api._changed:
            items = [copy.deepcopy(pod) for pod in self.api.pods.values() if pod["metadata"]["labels"].get(key) == value]
            version = self.api._resource_version
        self._send_json(200, {"kind": "PodList", "apiVersion": "v1",
                              "metadata": {"resourceVersion": str(version)}, "items": items})

    def _get_log(self, request: Request, name: str | None) -> None:
        with self.api._changed:
            pod = self.api.pods.get(name)
            log = self.api.logs.get(name, "")
        if pod is None:
            self._send_json(404, _status(404, "NotFound", f'pods "{name}" not found'))
            return
        if request.query.get("container") != pod["spec"]["containers"][0]["name"]:
            self._reject(400, "BadRequest", f"container {request.query.get('container')!r} is not in pod {name}")
            return
        tail = int(request.query.get("tailLines", "0") or 0)
        lines = log.splitlines(keepends=True)
        data = "".join(lines[-tail:] if tail else lines).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class LocalKubelet:
    """Runs each Job's container as a local process, as a kubelet would run it in a pod.

    The command's ``python`` becomes this interpreter, each volume's mount path becomes a folder
    under ``root`` (or ``mounts[path]``) in the environment and working folder, and a variable
    from a Secret gets the Secret's value.
    """

    def __init__(self, api: StandInApi, root: pathlib.Path, *, mounts: dict[str, pathlib.Path] | None = None):
        self.api = api
        self.root = root
        self.mounts = mounts or {}
        self.processes: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        api.kubelet = self

    def _host_path(self, job_name: str, mount_path: str) -> pathlib.Path:
        if mount_path in self.mounts:
            return self.mounts[mount_path]
        return self.root / job_name / mount_path.strip("/").replace("/", "_")

    def run(self, job_name: str) -> None:
        job = self.api.jobs[job_name]
        container = job["spec"]["template"]["spec"]["containers"][0]
        paths = {mount["mountPath"]: self._host_path(job_name, mount["mountPath"]) for mount in container["volumeMounts"]}
        for path in paths.values():
            path.mkdir(parents=True, exist_ok=True)
        volumes = {volume["name"]: volume for volume in job["spec"]["template"]["spec"]["volumes"]}
        for mount in container["volumeMounts"]:
            source = volumes[mount["name"]].get("secret")
            if source is not None:
                data = self.api.secrets[source["secretName"]]["data"]
                for item in source["items"]:
                    (paths[mount["mountPath"]] / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))

        # One pass, longest mount path first, so a host path that contains a mount path (such as
        # /tmp) is not mapped again.
        pattern = re.compile("|".join(re.escape(path) for path in sorted(paths, key=len, reverse=True)))

        def mapped(text: str) -> str:
            return pattern.sub(lambda match: str(paths[match.group(0)]), text)

        environment = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join(sys.path)}
        for variable in container["env"]:
            if "value" in variable:
                environment[variable["name"]] = mapped(variable["value"])
            else:
                reference = variable["valueFrom"]["secretKeyRef"]
                secret = self.api.secrets[reference["name"]]
                environment[variable["name"]] = base64.b64decode(secret["data"][reference["key"]]).decode()
        command = [sys.executable if part == "python" else part for part in container["command"]]
        work_dir = pathlib.Path(mapped(container["workingDir"]))
        log_path = self.root / f"{job_name}.log"

        self.api.start_pod(job_name)
        try:
            with open(log_path, "wb") as log:
                process = subprocess.Popen(command, cwd=work_dir, env=environment, stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as error:
            self.api.problems.append(f"The kubelet could not start Job {job_name}: {error}")
            self.api.finish_pod(job_name, 127, f"{error}\n")
            return
        with self._lock:
            self.processes[job_name] = process

        def wait() -> None:
            returncode = process.wait()
            exit_code = 128 - returncode if returncode < 0 else returncode
            self.api.finish_pod(job_name, exit_code, log_path.read_text(errors="replace"))

        threading.Thread(target=wait, name=f"kubelet-{job_name}", daemon=True).start()

    def stop(self, job_name: str, grace_period_s: int | None) -> None:
        with self._lock:
            process = self.processes.get(job_name)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if grace_period_s == 0 else signal.SIGTERM)
        try:
            process.wait(timeout=30 if grace_period_s is None else grace_period_s or 1)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop_all(self) -> None:
        with self._lock:
            processes = list(self.processes.values())
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
