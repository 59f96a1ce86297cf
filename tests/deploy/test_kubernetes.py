"""The cluster deployment, checked without a cluster.

Every manifest file, and every kustomization as kubectl's built-in kustomize renders it, is
validated against the Kubernetes schemas. The rendered objects are then checked against each
other, against deploy/grafana and deploy/prometheus, and against the calls the Kubernetes
launcher makes.
"""

import json
import pathlib
import re
import threading

import pytest
import yaml

from lasagne_engine.security import ClientSecurity
from lasagne_engine.stack.daemon import SERVICE_NAMES
from lasagne_engine.trainer.kubernetes_jobs import KubernetesSettings, job_manifest
from lasagne_engine.trainer.kubernetes_launcher import KubernetesLauncher
from lasagne_engine.trainer.launcher import LaunchRequest
from tests.deploy.deployment_files import DEPLOY, K8S_DIR, kustomize
from tests.trainer.kubernetes_stand_in import StandInApi, validate_manifest

OVERLAYS = sorted(path.parent.name for path in (K8S_DIR / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = {"base": K8S_DIR / "base", "monitoring": K8S_DIR / "monitoring",
                  **{name: K8S_DIR / "overlays" / name for name in OVERLAYS}}
# The Secret that users create before deploying, and the keys the manifests read from it.
CREDENTIALS = "lasagne-engine-credentials"
CREDENTIAL_KEYS = {"token", "minio-root-user", "minio-root-password", "grafana-admin-user", "grafana-admin-password"}
ROLE_PORTS = {"registry": 50151, "data": 50152, "trainer": 50153}
TEMPLATE_KINDS = ("Deployment", "StatefulSet")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(path) for name, path in KUSTOMIZATIONS.items()}


def find(documents: list[dict], kind: str, name: str) -> dict:
    matches = [document for document in documents if document["kind"] == kind and document["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_templates(documents: list[dict]) -> list[tuple[str, dict]]:
    return [(document["metadata"]["name"], document["spec"]["template"])
            for document in documents if document["kind"] in TEMPLATE_KINDS]


def container(documents: list[dict], kind: str, name: str, container_name: str) -> dict:
    template = find(documents, kind, name)["spec"]["template"]
    return next(item for item in template["spec"]["containers"] if item["name"] == container_name)


def patch_files() -> set[pathlib.Path]:
    patches = set()
    for kustomization in K8S_DIR.rglob("kustomization.yaml"):
        for patch in yaml.safe_load(kustomization.read_text()).get("patches", []):
            if "path" in patch:
                patches.add((kustomization.parent / patch["path"]).resolve())
    return patches


def manifest_files() -> list[pathlib.Path]:
    patches = patch_files()
    return sorted(path for path in K8S_DIR.rglob("*.yaml")
                  if path.name != "kustomization.yaml" and path.resolve() not in patches)


def test_overlays_exist():
    assert OVERLAYS == ["dev", "gpu-cluster"]


@pytest.mark.parametrize("path", manifest_files(), ids=lambda path: str(path.relative_to(K8S_DIR)))
def test_manifest_file_validates(path):
    documents = [document for document in yaml.safe_load_all(path.read_text()) if document]

    assert documents
    for document in documents:
        assert validate_manifest(document) == [], f"{path}: {document['kind']} {document['metadata']['name']}"


def test_validator_rejects_unknown_field():
    deployment = yaml.safe_load((K8S_DIR / "base" / "registry.yaml").read_text().split("---")[2])
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"

    problems = validate_manifest(deployment)

    assert len(problems) == 2
    assert "'imagePullPolicyy' was unexpected" in problems[0]


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_kustomization_renders_valid_objects(rendered, name):
    for document in rendered[name]:
        assert validate_manifest(document) == [], f"{name}: {document['kind']} {document['metadata']['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_share_namespace(rendered, overlay):
    documents = rendered[overlay]
    namespace = yaml.safe_load((K8S_DIR / "overlays" / overlay / "kustomization.yaml").read_text())["namespace"]

    assert find(documents, "Namespace", namespace)
    for document in documents:
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == namespace, document["metadata"]["name"]
    for binding in (document for document in documents if document["kind"] == "RoleBinding"):
        assert [subject["namespace"] for subject in binding["subjects"]] == [namespace]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_references_resolve(rendered, overlay):
    documents = rendered[overlay]
    names = {(document["kind"], document["metadata"]["name"]) for document in documents}

    for owner, template in pod_templates(documents):
        spec = template["spec"]
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in names, owner
        claim_templates = {claim["metadata"]["name"] for document in documents if document["kind"] == "StatefulSet"
                           for claim in document["spec"].get("volumeClaimTemplates", [])}
        volumes = {volume["name"] for volume in spec.get("volumes", [])}
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names, owner
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names, owner
        for item in spec["containers"]:
            for mount in item.get("volumeMounts", []):
                assert mount["name"] in volumes | claim_templates, f"{owner}: mount {mount['name']} has no volume"
            for source in item.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in names, owner
            for variable in item.get("env", []):
                secret = variable.get("valueFrom", {}).get("secretKeyRef")
                if secret is not None:
                    assert secret["name"] == CREDENTIALS, owner
                    assert secret["key"] in CREDENTIAL_KEYS, f"{owner} reads undocumented key {secret['key']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_pods_and_ports(rendered, overlay):
    documents = rendered[overlay]
    templates = pod_templates(documents)

    for service in (document for document in documents if document["kind"] == "Service"):
        selector = service["spec"]["selector"]
        matching = [template for _, template in templates
                    if selector.items() <= template["metadata"]["labels"].items()]
        assert len(matching) == 1, f"Service {service['metadata']['name']} selects {len(matching)} pod templates"
        port_names = {port["name"] for item in matching[0]["spec"]["containers"] for port in item.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{service['metadata']['name']}: {port['targetPort']}"


def test_engine_addresses_name_services(rendered):
    documents = rendered["base"]
    settings = find(documents, "ConfigMap", "lasagne-engine-settings")["data"]

    for role, port in ROLE_PORTS.items():
        host, _, service_port = settings[f"LASAGNE_ENGINE_{role.upper()}_ADDRESS"].rpartition(":")
        service = find(documents, "Service", host)
        assert [entry["port"] for entry in service["spec"]["ports"] if entry["name"] == "grpc"] == [port]
        server = container(documents, "Deployment", f"lasagne-{role}", role)
        environment = {variable["name"]: variable.get("value") for variable in server["env"]}
        assert environment[f"LASAGNE_ENGINE_{role.upper()}_ADDRESS"] == f"0.0.0.0:{port}"
        assert int(service_port) == port


def test_probes_check_each_service(rendered):
    documents = rendered["base"]

    for role, port in ROLE_PORTS.items():
        server = container(documents, "Deployment", f"lasagne-{role}", role)
        assert server["readinessProbe"]["grpc"] == {"port": port, "service": SERVICE_NAMES[role]}
        assert server["livenessProbe"]["grpc"] == {"port": port}


def test_pods_run_unprivileged(rendered):
    for name in OVERLAYS:
        for owner, template in pod_templates(rendered[name]):
            assert template["spec"]["securityContext"]["runAsNonRoot"] is True, owner
            assert template["spec"]["securityContext"]["runAsUser"] > 0, owner
            for item in template["spec"]["containers"]:
                assert item["securityContext"]["allowPrivilegeEscalation"] is False, owner
                assert item["securityContext"]["capabilities"] == {"drop": ["ALL"]}, owner


def test_stateful_services_keep_one_replica(rendered):
    documents = rendered["base"]

    for role in ROLE_PORTS:
        deployment = find(documents, "Deployment", f"lasagne-{role}")
        assert deployment["spec"]["replicas"] == 1, role
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}, role
    assert find(documents, "StatefulSet", "minio")["spec"]["replicas"] == 1


# The trainer and its session Jobs -------------------------------------------------------------


def trainer_environment(documents: list[dict]) -> dict[str, str]:
    """Return the trainer container's variables with plain values. Its env overrides its
    ConfigMap's, as in Kubernetes."""
    trainer = container(documents, "Deployment", "lasagne-trainer", "trainer")
    environment = {}
    for source in trainer["envFrom"]:
        environment.update(find(documents, "ConfigMap", source["configMapRef"]["name"])["data"])
    environment.update({variable["name"]: variable["value"] for variable in trainer["env"] if "value" in variable})
    return environment


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_session_image_follows_trainer_image(rendered, overlay):
    trainer = container(rendered[overlay], "Deployment", "lasagne-trainer", "trainer")

    assert trainer_environment(rendered[overlay])["LASAGNE_ENGINE_K8S_IMAGE"] == trainer["image"]


@pytest.mark.parametrize(("overlay", "gpus"), [("dev", 0), ("gpu-cluster", 1)])
def test_trainer_settings_make_valid_jobs(rendered, overlay, gpus):
    documents = rendered[overlay]
    environment = trainer_environment(documents)
    namespace = yaml.safe_load((K8S_DIR / "overlays" / overlay / "kustomization.yaml").read_text())["namespace"]

    settings = KubernetesSettings.from_env({**environment, "LASAGNE_ENGINE_K8S_NAMESPACE": namespace})
    request = LaunchRequest(session_id="s-0123456789ab", token="0" * 32, trainer_address="127.0.0.1:50153",
                            device="k8s:0", backend="jax" if gpus else "default", working_dir=pathlib.Path("/unused"))
    job = job_manifest(settings, request, "lasagne-s-0123456789ab-a1b2c3", environment, ClientSecurity())

    assert settings.gpus == gpus
    assert validate_manifest(job) == []
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"].get("nvidia.com/gpu") == ("1" if gpus else None)
    host, _, port = settings.trainer_address.rpartition(":")
    trainer_service = find(documents, "Service", host)
    assert int(port) in [entry["port"] for entry in trainer_service["spec"]["ports"]]


def role_allows(role: dict, api_group: str, resource: str, verb: str) -> bool:
    return any(api_group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
               for rule in role["rules"])


def launcher_calls(tmp_path, monkeypatch) -> set[tuple[str, str, str]]:
    """Run two launches against the stand-in API, one completed and one terminated, and return the
    (API group, resource, verb) of every request the launcher sent."""
    api = StandInApi()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
    settings = KubernetesSettings(image="lasagne-engine/trainer:local", trainer_address="lasagne-trainer:50153",
                                  namespace=api.namespace)
    launcher = KubernetesLauncher(settings, environ={}, security=ClientSecurity(), watch_timeout_s=1)
    try:
        exited = threading.Event()
        completed = launcher.launch(
            LaunchRequest("s-000000000001", "1" * 32, "", "k8s:0", "jax", pathlib.Path("/unused")),
            lambda code, tail: exited.set(),
        )
        api.wait_for(lambda: completed.name in api.jobs, message="the first Job")
        # A Job that ends before the launcher starts watching is seen by a listing alone.
        api.wait_for(lambda: any(request.query.get("watch", "").lower() == "true" and "/jobs" in request.path
                                 for request in list(api.requests)), message="the launcher's watch of Jobs")
        api.set_waiting(completed.name, "ContainerCreating", "")
        api.finish_pod(completed.name, 0, "done\n")
        assert exited.wait(15)
        terminated = launcher.launch(
            LaunchRequest("s-000000000002", "2" * 32, "", "k8s:1", "jax", pathlib.Path("/unused")),
            lambda code, tail: None,
        )
        api.wait_for(lambda: terminated.name in api.jobs, message="the second Job")
        terminated.terminate()
        terminated.join(15)
    finally:
        launcher.close()
        api.close()

    calls = set()
    for request in api.requests:
        parts = request.path.strip("/").split("/")
        group = "" if parts[0] == "api" else parts[1]
        after_namespace = parts[parts.index("namespaces") + 2:]
        resource = after_namespace[0] + ("/" + after_namespace[2] if len(after_namespace) == 3 else "")
        named = len(after_namespace) >= 2
        verb = {"POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}.get(request.method)
        if verb is None and request.query.get("watch", "").lower() == "true":
            verb = "watch"
        elif verb is None:
            verb = "get" if named else "list"
        calls.add((group, resource, verb))
    return calls


def test_trainer_role_grants_exactly_launcher_calls(rendered, tmp_path, monkeypatch):
    role = find(rendered["base"], "Role", "lasagne-trainer")

    calls = launcher_calls(tmp_path, monkeypatch)

    for group, resource, verb in sorted(calls):
        assert role_allows(role, group, resource, verb), f"the Role does not allow {verb} {group}/{resource}"
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert granted == calls, f"granted but never used: {sorted(granted - calls)}"
    binding = find(rendered["base"], "RoleBinding", "lasagne-trainer")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lasagne-trainer"}]
    deployment = find(rendered["base"], "Deployment", "lasagne-trainer")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "lasagne-trainer"


# Monitoring -----------------------------------------------------------------------------------


def test_grafana_configmaps_carry_deploy_grafana(rendered):
    documents = rendered["monitoring"]
    dashboards = find(documents, "ConfigMap", "lasagne-engine-grafana-dashboards")
    datasources = find(documents, "ConfigMap", "lasagne-engine-grafana-datasources")
    providers = find(documents, "ConfigMap", "lasagne-engine-grafana-dashboard-providers")
    grafana_files = DEPLOY / "grafana"

    shipped = {path.name: path.read_text() for path in (grafana_files / "dashboards").glob("*.json")}
    assert dashboards["data"] == shipped
    for text in dashboards["data"].values():
        assert json.loads(text)["uid"]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert datasources["data"] == {"prometheus.yml": (grafana_files / "provisioning/datasources/prometheus.yml").read_text()}
    assert providers["data"] == {
        "lasagne-engine.yml": (grafana_files / "provisioning/dashboards/lasagne-engine.yml").read_text()}


def test_grafana_mounts_match_provisioning(rendered):
    documents = rendered["monitoring"]
    grafana = container(documents, "Deployment", "grafana", "grafana")
    mounts = {mount["name"]: mount["mountPath"] for mount in grafana["volumeMounts"]}
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/lasagne-engine.yml").read_text())
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())

    assert mounts["dashboards"] == provider["providers"][0]["options"]["path"]
    assert mounts["datasources"] == "/etc/grafana/provisioning/datasources"
    assert mounts["dashboard-providers"] == "/etc/grafana/provisioning/dashboards"
    url = datasource["datasources"][0]["url"]
    service = find(documents, "Service", url.split("//")[1].split(":")[0])
    assert int(url.rsplit(":", 1)[1]) in [port["port"] for port in service["spec"]["ports"]]


def test_prometheus_scrapes_trainer_pods(rendered):
    monitoring = rendered["monitoring"]
    config = yaml.safe_load(find(monitoring, "ConfigMap", "lasagne-engine-prometheus")["data"]["prometheus.yml"])
    compose_config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    trainer = container(rendered["base"], "Deployment", "lasagne-trainer", "trainer")
    trainer_labels = find(rendered["base"], "Deployment", "lasagne-trainer")["spec"]["template"]["metadata"]["labels"]
    keeps = {rule["source_labels"][0]: rule["regex"] for rule in job["relabel_configs"] if rule.get("action") == "keep"}

    assert job["job_name"] == compose_config["scrape_configs"][0]["job_name"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"own_namespace": True}}]
    assert keeps["__meta_kubernetes_pod_label_app_kubernetes_io_component"] == trainer_labels[
        "app.kubernetes.io/component"]
    metrics_ports = [port for port in trainer["ports"] if port["name"] == keeps["__meta_kubernetes_pod_container_port_name"]]
    environment = {variable["name"]: variable.get("value") for variable in trainer["env"]}
    assert [port["containerPort"] for port in metrics_ports] == [int(environment["LASAGNE_ENGINE_METRICS_PORT"])]
    role = find(monitoring, "Role", "prometheus")
    assert role_allows(role, "", "pods", "list")
    assert role_allows(role, "", "pods", "watch")


def test_network_policies_admit_clients_and_prometheus(rendered):
    documents = rendered["base"]
    services = find(documents, "NetworkPolicy", "lasagne-engine-services")
    sessions = find(documents, "NetworkPolicy", "lasagne-engine-sessions")

    open_ports = {port["port"] for rule in services["spec"]["ingress"] if "from" not in rule for port in rule["ports"]}
    assert open_ports == set(ROLE_PORTS.values())
    assert "ingress" not in sessions["spec"]
    assert sessions["spec"]["policyTypes"] == ["Ingress"]


def test_credentials_stay_out_of_manifests():
    for path in K8S_DIR.rglob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") == "Secret":
                pytest.fail(f"{path} commits a Secret; credentials belong in {CREDENTIALS}, created by hand")


def test_docs_create_every_credential():
    text = (DEPLOY.parent / "docs" / "deploy.md").read_text()
    command = text[text.index("create secret generic lasagne-engine-credentials"):].split("```")[0]

    assert set(re.findall(r"--from-literal=([a-z-]+)=", command)) == CREDENTIAL_KEYS
