"""deploy/k8s checked without a cluster: every object against the Kubernetes API schemas (kubernetes-validate
ships them; nothing is fetched), then what the schemas cannot see: labels and selectors, ports, probes,
settings, references and the security context."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server.config import CoordinatorSettings
from tests.deploy import compose_topology as topo

K8S = topo.ROOT / "deploy" / "k8s"
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())  # oldest supported, newest known
COORDINATOR_SETTINGS = {f"MLECS_{name.upper()}" for name in CoordinatorSettings.model_fields}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization() -> dict[str, Any]:
    return dict(yaml.safe_load((K8S / "kustomization.yaml").read_text()))


def _rendered() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/k8s` applies: the listed resources in the kustomization's namespace,
    images retagged (the only transformations it uses)."""
    kustomization = _kustomization()
    assert set(kustomization) <= {"apiVersion", "kind", "namespace", "resources", "images"}, \
        "this test renders only namespace and images: extend it for other kustomize features"
    tags = {i["name"]: i.get("newName", i["name"]) + ":" + i["newTag"] for i in kustomization.get("images", [])}
    objects = []
    for resource in kustomization["resources"]:
        for doc in _docs(K8S / resource):
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = kustomization["namespace"]
            for container in _containers(doc):
                container["image"] = tags.get(container["image"].split(":")[0], container["image"])
            objects.append(doc)
    return objects


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    spec: dict[str, Any] | None = doc.get("spec", {}).get("template", {}).get("spec")
    return spec


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]] if spec else []


def _one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _deployments(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == "Deployment"]


def _admin_routes() -> set[str]:
    source = (topo.ROOT / "server" / "transport" / "admin_api.py").read_text()
    return set(re.findall(r'@app\.get\("(/[a-z]+)"', source))


def test_the_kustomization_lists_every_manifest_but_the_secret_example():
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(_kustomization()["resources"]) == files


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_and_the_secret_example_match_the_kubernetes_schemas_strictly(version):
    for doc in [*_rendered(), *_docs(K8S / "secret.example.yaml")]:
        kubernetes_validate.validate(doc, version, strict=True)  # raises naming the path and the problem


def test_the_schema_check_rejects_a_broken_deployment():
    deployment = copy.deepcopy(_one(_rendered(), "Deployment", "mlecs-coordinator"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(_one(_rendered(), "Deployment", "mlecs-coordinator"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kubectl_kustomize_renders_what_this_test_checks():
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, yaml.safe_load_all(result.stdout))) == sorted(map(key, _rendered()))
    assert sorted(yaml.safe_load_all(result.stdout), key=key) == sorted(_rendered(), key=key)


def test_the_coordinator_runs_as_replicas_behind_services_that_select_them():
    objects = _rendered()
    deployment = _one(objects, "Deployment", "mlecs-coordinator")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    services = [o for o in objects if o["kind"] == "Service"]
    served = set()
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: no container port {port['targetPort']}"
            served.add(port["targetPort"])
    assert served == set(ports) == {"grpc", "heartbeat", "admin"}
    devices = _one(objects, "Service", "mlecs-devices")
    # Devices reach the heartbeat port on the address they reach the device port at.
    assert {p["targetPort"] for p in devices["spec"]["ports"]} == {"grpc", "heartbeat"}
    assert {p["port"] for p in devices["spec"]["ports"]} == {ports["grpc"], ports["heartbeat"]}
    pdb = _one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"], "a drain must be able to proceed"
    compose_image = topo.load()["services"]["coordinator"]["image"].split(":")[0]
    assert container["image"].split(":")[0] == compose_image
    assert container["args"] == ["serve"]


def test_probes_hit_the_coordinators_health_endpoints_on_its_admin_port():
    objects = _rendered()
    deployment = _one(objects, "Deployment", "mlecs-coordinator")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    routes = _admin_routes()
    assert {"/healthz", "/readyz"} <= routes, f"admin API routes changed: {routes}"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes and ports[get["port"]] == ports["admin"], probe
    config = _one(objects, "ConfigMap")["data"]
    assert int(config["MLECS_ADMIN_PORT"]) == ports["admin"] and int(config["MLECS_GRPC_PORT"]) == ports["grpc"]
    assert int(config["MLECS_HEARTBEAT_PORT"]) == ports["heartbeat"] and config["MLECS_REDIS_URL"]
    assert config["MLECS_ADMIN_HOST"] == config["MLECS_GRPC_HOST"] == "0.0.0.0"


def test_settings_are_real_and_secure_and_files_they_name_are_mounted():
    objects = _rendered()
    config = _one(objects, "ConfigMap")["data"]
    for workload in (*_deployments(objects), _one(objects, "Job")):
        for container in _containers(workload):
            names = {e["name"] for e in container.get("env", [])}
            if any(s["configMapRef"]["name"] == "mlecs-coordinator" for s in container.get("envFrom", [])):
                names |= set(config)
            unknown = names - COORDINATOR_SETTINGS
            assert not unknown, f"{workload['metadata']['name']}: no setting reads {sorted(unknown)}"
            assert "MLECS_DATABASE_URL" in names
    values = {k[6:].lower(): v for k, v in config.items()}
    settings = CoordinatorSettings.model_validate({**values, "database_url": "postgresql://u@h/db"})
    assert settings.tls_enabled and not settings.allow_plaintext and not settings.open_enrolment
    assert settings.redis_url, "replicas need Redis for presence and revocations"
    deployment = _one(objects, "Deployment", "mlecs-coordinator")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    tls_secret = _one(_docs(K8S / "secret.example.yaml"), "Secret", "mlecs-coordinator-tls")
    for key in ("MLECS_TLS_CERT_FILE", "MLECS_TLS_KEY_FILE", "MLECS_TLS_CLIENT_CA_FILE"):
        path = PurePosixPath(config[key])
        mount = mounts[str(path.parent)]
        assert volumes[mount["name"]]["secret"]["secretName"] == "mlecs-coordinator-tls", key
        assert path.name in tls_secret["stringData"], f"{key}: the Secret has no key {path.name}"
    data = mounts[str(PurePosixPath(config["MLECS_DATA_DIR"]).parent)]
    assert data["readOnly"] and "persistentVolumeClaim" in volumes[data["name"]]
    for task, directory in settings.task_data.items():  # public/ and test/ on the same read-only claim
        assert PurePosixPath(directory).is_relative_to(data["mountPath"]), task
    state = volumes[mounts[config["MLECS_STATE_DIR"]]["name"]]
    claim = _one(objects, "PersistentVolumeClaim", state["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every replica must see one blob store"


def test_every_referenced_configmap_secret_claim_and_account_exists():
    objects = _rendered()
    defined = {(o["kind"], o["metadata"]["name"]) for o in objects}
    examples = {(o["kind"], o["metadata"]["name"]): o for o in _docs(K8S / "secret.example.yaml")}
    assert not any(kind == "Secret" for kind, _ in defined), "no Secret values may be applied from the repository"
    for workload in (o for o in objects if _pod_spec(o)):
        spec = _pod_spec(workload)
        assert spec is not None
        assert ("ServiceAccount", spec["serviceAccountName"]) in defined
        refs: list[tuple[str, str, str | None]] = []
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                refs.append(("Secret", volume["secret"]["secretName"], None))
            if "persistentVolumeClaim" in volume:
                refs.append(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], None))
            if "configMap" in volume:
                refs.append(("ConfigMap", volume["configMap"]["name"], None))
        for container in _containers(workload):
            for source in container.get("envFrom", []):
                refs.append(("ConfigMap", source["configMapRef"]["name"], None))
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.append(("Secret", ref["name"], ref["key"]))
        for kind, name, key in refs:
            if kind == "Secret":
                assert (kind, name) in examples, f"Secret {name} is not documented in secret.example.yaml"
                assert key is None or key in examples[(kind, name)]["stringData"], f"Secret {name} has no key {key}"
            else:
                assert (kind, name) in defined, f"{workload['metadata']['name']} refers to missing {kind} {name}"


def test_pods_run_non_root_on_a_read_only_root_with_writable_volumes_where_the_coordinator_writes():
    objects = _rendered()
    uid = re.search(r"--uid (\d+)", (topo.ROOT / "deploy" / "docker" / "coordinator.Dockerfile").read_text())
    assert uid is not None
    config = _one(objects, "ConfigMap")["data"]
    for workload in (*_deployments(objects), _one(objects, "Job")):
        spec = _pod_spec(workload)
        assert spec is not None and spec["automountServiceAccountToken"] is False
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] and pod["runAsUser"] == int(uid.group(1))
        for container in _containers(workload):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
            assert security["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
            writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
            assert "/tmp" in writable, f"{workload['metadata']['name']}: Python needs a writable /tmp"
            if container["args"] in (["serve"], ["worker"]):
                assert config["MLECS_STATE_DIR"] in writable, "the blob store must be writable"


def test_the_migration_job_runs_the_coordinators_migrate_command():
    job = _one(_rendered(), "Job", "mlecs-migrate")
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    deployment = _one(_rendered(), "Deployment", "mlecs-coordinator")
    assert container["image"] == deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    for args in (container["args"], ["serve"]):
        result = subprocess.run([sys.executable, "-m", "server", *args, "--help"], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, f"`mlecs-coordinator {' '.join(args)}` is no command: {result.stderr}"


def test_cloud_workers_run_as_their_own_deployment_on_the_coordinators_database_blobs_and_data():
    objects = _rendered()
    coordinator = _one(objects, "Deployment", "mlecs-coordinator")
    worker = _one(objects, "Deployment", "mlecs-worker")
    (serve,) = _containers(coordinator)
    (work,) = _containers(worker)
    assert work["args"] == ["worker"] and work["image"] == serve["image"]
    assert work["envFrom"] == serve["envFrom"] and worker["spec"]["replicas"] >= 1
    assert {e["name"] for e in work["env"]} == {"MLECS_DATABASE_URL"}  # the same queue and state as the replicas
    # Not behind the coordinator's Services or disruption budget: no Service selects the workers.
    labels = worker["spec"]["template"]["metadata"]["labels"]
    for selector in [o["spec"]["selector"] for o in objects if o["kind"] == "Service"] + [
            _one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]]:
        assert not selector.items() <= labels.items()
    config = _one(objects, "ConfigMap")["data"]
    assert config["MLECS_WORKER_INPROCESS"] == "false", "the replicas would run cloud jobs themselves"
    port = int(config["MLECS_WORKER_METRICS_PORT"])
    ports = {p["name"]: p["containerPort"] for p in work["ports"]}
    assert ports == {"metrics": port}
    assert worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    for probe in ("startupProbe", "livenessProbe"):
        assert work[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
    mounts = {m["mountPath"]: m["name"] for m in work["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in _pod_spec(worker)["volumes"] if "persistentVolumeClaim" in v}  # type: ignore[index]
    served = {m["mountPath"]: m["name"] for m in serve["volumeMounts"]}
    served_claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                     for v in _pod_spec(coordinator)["volumes"] if "persistentVolumeClaim" in v}  # type: ignore[index]
    for path in (config["MLECS_STATE_DIR"], "/data"):  # the blob store and the data, as the replicas see them
        assert claims[mounts[path]] == served_claims[served[path]], path
    result = subprocess.run([sys.executable, "-m", "server", "worker", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "cloud" in result.stdout.lower(), result.stderr
