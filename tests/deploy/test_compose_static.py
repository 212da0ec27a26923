"""docker-compose.yml checked without a Docker engine: a compose implementation's own validation, then the
images, settings, ports, files, health checks and secrets it refers to."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from edge_agent.config import AgentSettings
from server.config import CoordinatorSettings
from tests.deploy import compose_topology as topo

ROOT = topo.ROOT
COORDINATOR_SETTINGS = {f"MLECS_{name.upper()}" for name in CoordinatorSettings.model_fields}
SCRIPTS = ROOT / "deploy" / "docker" / "compose"


def _settings(env: dict[str, str]) -> CoordinatorSettings:
    """The coordinator's settings from these MLECS_* variables only (not this process's environment)."""
    return CoordinatorSettings.model_validate({k[6:].lower(): v for k, v in env.items() if k in COORDINATOR_SETTINGS})


def _agents(compose: dict[str, Any]) -> dict[str, tuple[dict[str, Any], AgentSettings]]:
    """Each agent service and its config file, validated as the agent validates it (minus reading the TLS
    files, which exist only once the certs service ran: see test_the_certs_service_writes_every_tls_file)."""
    agents = {}
    for name, service in compose["services"].items():
        if service["image"].startswith("mlecs-") and topo.dockerfile(service, compose).name == "agent.Dockerfile":
            config = topo.host_path(service, "/etc/mlecs/agent.toml", {})
            assert config is not None and config.is_file(), f"{name}: no agent config mounted"
            agents[name] = (service, AgentSettings.model_validate(tomllib.loads(config.read_text())))
    return agents


def _docker_compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker-compose", "-f", str(path), "-p", "mlecs", "config", "-q"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=topo.os_environ_without_mlecs())


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose (Debian package docker-compose) not installed")
def test_a_compose_implementation_accepts_the_file_and_rejects_a_broken_copy(tmp_path):
    result = _docker_compose_config(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stderr
    broken = topo.load()
    broken["services"]["coordinator"]["depends_on"]["migrate"]["condition"] = "service_finished"
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken))
    result = _docker_compose_config(tmp_path / "docker-compose.yml")
    assert result.returncode != 0 and "condition" in result.stderr


def test_every_built_image_has_its_dockerfile_cpu_only_non_root_and_copies_only_existing_paths():
    compose = topo.load()
    for name, service in compose["services"].items():
        if not service["image"].startswith("mlecs-"):
            assert ":" in service["image"] and not service["image"].endswith(":latest"), f"{name}: pin the image"
            continue
        dockerfile = topo.dockerfile(service, compose)
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        text = dockerfile.read_text()
        for line in text.splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"
        assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text, f"{dockerfile.name}: CPU torch"
        assert re.search(r"^USER mlecs$", text, re.M) and "--uid 10001" in text, f"{dockerfile.name}: uid 10001"
        assert topo.argv(service, compose), f"{name} runs nothing"


def test_every_environment_variable_a_service_sets_is_read_by_what_it_runs():
    compose = topo.load()
    for name, service in compose["services"].items():
        env = topo.environment(service)
        if not service["image"].startswith("mlecs-"):
            continue
        scripts = [SCRIPTS / PurePosixPath(a).name for a in topo.argv(service, compose) if a.endswith(".sh")]
        script_vars = {v for s in scripts for v in re.findall(r"\$\{?(MLECS_\w+)", s.read_text())}
        cli_vars = {"MLECS_ADMIN_URL"} if scripts else set()  # the `mlecs` admin CLI the scripts call
        unknown = set(env) - COORDINATOR_SETTINGS - script_vars - cli_vars
        assert not unknown, f"{name}: nothing reads {sorted(unknown)}"
        if "MLECS_DATABASE_URL" in env:
            settings = _settings(env)
            assert settings.tls_enabled and not settings.allow_plaintext and not settings.open_enrolment, name
            host = re.search(r"@([\w-]+):(\d+)/", env["MLECS_DATABASE_URL"])
            assert host and host.group(1) in compose["services"], f"{name}: database host is no service"
            assert env["MLECS_REDIS_URL"].startswith("redis://redis:6379/")
    for name, (_, agent) in _agents(compose).items():
        assert agent.tls is not None and not agent.allow_plaintext, f"{name}: mutual TLS"
        assert agent.enrolment_token_file is not None, f"{name}: enrols with a one-time token"


def test_ports_are_unique_and_match_the_settings_and_the_agents_targets():
    compose = topo.load()
    published = [p.split(":")[0] for s in compose["services"].values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), f"a host port is published twice: {published}"
    coordinator = compose["services"]["coordinator"]
    env = topo.environment(coordinator)
    image_env = topo.image_env(topo.dockerfile(coordinator, compose))
    settings = _settings({**image_env, **env})
    assert settings.grpc_host == settings.admin_host == "0.0.0.0", "the coordinator must listen beyond loopback"
    container_ports = {int(p.split(":")[1]) for p in coordinator["ports"]}
    assert settings.heartbeat_port is not None
    assert container_ports == {settings.grpc_port, settings.heartbeat_port, settings.admin_port}
    # Published on the same host port: agents send heartbeats to their coordinator address with this port.
    assert f"{settings.heartbeat_port}:{settings.heartbeat_port}" in coordinator["ports"]
    expose = re.search(r"^EXPOSE (.+)$", topo.dockerfile(coordinator, compose).read_text(), re.M)
    assert expose and {int(p) for p in expose.group(1).split()} == container_ports
    for name, (_, agent) in _agents(compose).items():
        assert agent.coordinator == f"coordinator:{settings.grpc_port}", name
    assert topo.environment(compose["services"]["bootstrap"])["MLECS_ADMIN_URL"] == \
        f"http://coordinator:{settings.admin_port}"
    assert "http://127.0.0.1:8080/readyz" in str(coordinator["healthcheck"]["test"]) and settings.admin_port == 8080


def test_volumes_are_declared_and_every_mounted_host_file_exists():
    compose = topo.load()
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in compose["services"].items():
        for mount in topo.mounts(service):
            if mount.is_named_volume:
                assert mount.source in declared, f"{name} uses undeclared volume {mount.source}"
                used.add(mount.source)
            else:
                assert mount.read_only, f"{name}: bind mount {mount.source} must be read-only"
                assert (ROOT / mount.source).exists(), f"{name} mounts missing {mount.source}"
        targets = [m.target for m in topo.mounts(service)]
        assert len(targets) == len(set(targets)), f"{name} mounts two things at one path"
    assert used == declared, f"declared but unused volumes: {declared - used}"


def test_prometheus_scrapes_the_coordinator_and_grafana_reads_the_mounted_dashboards():
    compose = topo.load()
    prometheus = compose["services"]["prometheus"]
    config_path = topo.host_path(prometheus, "/etc/prometheus/prometheus.yml", {})
    assert config_path is not None and config_path.is_file(), "deploy/prometheus/prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    assert "coordinator:8080" in targets, f"Prometheus scrapes {targets}, not the coordinator"
    heartbeat_metrics = topo.environment(compose["services"]["coordinator"]).get("MLECS_HEARTBEAT_METRICS_PORT")
    assert heartbeat_metrics and f"coordinator:{heartbeat_metrics}" in targets, "the heartbeat process is not scraped"
    grafana = compose["services"]["grafana"]
    providers = topo.host_path(grafana, "/etc/grafana/provisioning/dashboards/mlecs.yml", {})
    assert providers is not None and providers.is_file()
    for provider in yaml.safe_load(providers.read_text())["providers"]:
        folder = topo.host_path(grafana, provider["options"]["path"], {})
        assert folder is not None and list(folder.glob("*.json")), f"no dashboards at {provider['options']['path']}"
    datasources = topo.host_path(grafana, "/etc/grafana/provisioning/datasources/prometheus.yml", {})
    assert datasources is not None
    urls = {d.get("url") for d in yaml.safe_load(datasources.read_text())["datasources"]}
    assert "http://prometheus:9090" in urls, f"Grafana's datasource is {urls}"


def test_services_start_in_dependency_order_on_health_and_completion():
    compose = topo.load()
    services = compose["services"]
    order = topo.start_order(compose)
    assert order.index("certs") < order.index("migrate") < order.index("coordinator") < order.index("bootstrap")
    assert all(order.index("bootstrap") < order.index(agent) for agent in _agents(compose))
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}'s missing healthcheck"
            else:
                assert condition == "service_completed_successfully", f"{name}: {condition}"
                assert "ports" not in services[dependency] and "restart" not in services[dependency]
        if not topo.is_one_shot(name, compose):
            assert "healthcheck" in service, f"{name} has no healthcheck"
    for name, (service, agent) in _agents(compose).items():  # healthy: enrolled, identity stored
        assert f"'{agent.state_dir}/identity.json'" in service["healthcheck"]["test"][-1], name


def test_agents_read_their_own_exported_device_folder_of_the_federations_task():
    compose = topo.load()
    agents = _agents(compose)
    assert len(agents) >= 3
    settings = [s for _, s in agents.values()]
    assert len({s.federation for s in settings}) == 1 and len({s.device_name for s in settings}) == len(settings)
    assert all(s.partition is None for s in settings), "compose agents read dataset directories, not a partition"
    export = compose["services"]["fleet-data"]
    out = export["command"][export["command"].index("--out") + 1]
    devices = int(export["command"][export["command"].index("--devices") + 1])
    assert devices == len(settings)
    volumes = {name: Path("/volumes") / name for name in compose["volumes"]}
    written = topo.host_path(export, out, volumes)
    for name, (service, agent) in agents.items():
        assert agent.data.dataset is not None and agent.data.task is not None, name
        # What the agent reads lies in the volume the export wrote, at the device folder it wrote.
        folder = topo.host_path(service, str(agent.data.dataset), volumes)
        assert folder is not None and written is not None and folder.parent == written, name
        assert topo.host_path(service, agent.data.task, volumes) == written / "task.toml", name
        assert agent.data.public is None, f"{name}: compose agents download their public shard from the coordinator"
    assert sorted(str(s.data.dataset).rsplit("/", 1)[-1] for s in settings) == [f"device-{k}" for k in range(devices)]
    federation = tomllib.loads((SCRIPTS / "federation.toml").read_text())
    assert federation["task"] == "avmnist" and federation["min_updates"] <= len(settings)
    coordinator = compose["services"]["coordinator"]
    task_data = json.loads(topo.environment(coordinator)["MLECS_TASK_DATA"])
    assert topo.host_path(coordinator, task_data["avmnist"], volumes) == written, "the coordinator's public/test"


def test_the_certs_and_bootstrap_services_cover_every_device_and_the_certs_service_writes_every_tls_file(
        tmp_path):
    """Runs the certs service's script with each named volume as a directory, then finds every file the
    coordinator and the agents are configured to read in the volumes they mount."""
    compose = topo.load()
    volumes = {name: tmp_path / name for name in compose["volumes"]}
    for directory in volumes.values():
        directory.mkdir()
    certs = compose["services"]["certs"]
    env = {**topo.os_environ_without_mlecs(), **topo.environment(certs), "MLECS_TLS_OWNER": "",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    root = topo.container_root(certs, volumes, tmp_path / "certs-root")
    env = {k: topo.in_root(root, v) if k in ("MLECS_PKI_DIR", "MLECS_TLS_ROOT") else v for k, v in env.items()}
    argv = topo.argv(certs, compose)
    script = SCRIPTS / PurePosixPath(argv[0]).name
    result = subprocess.run([str(script), *argv[1:]], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    agents = _agents(compose)
    devices = sorted(s.device_name for _, s in agents.values())
    assert sorted(argv[1:]) == devices
    assert sorted(compose["services"]["bootstrap"]["command"][2:]) == devices
    coordinator = compose["services"]["coordinator"]
    for key in ("MLECS_TLS_CERT_FILE", "MLECS_TLS_KEY_FILE", "MLECS_TLS_CLIENT_CA_FILE"):
        path = topo.host_path(coordinator, topo.environment(coordinator)[key], volumes)
        assert path is not None and path.is_file(), f"coordinator: {key} is not written by the certs service"
    assert not list(volumes["coordinator-tls"].glob("ca.key")), "the CA key must stay in the pki volume"
    for name, (service, settings) in agents.items():
        assert settings.tls is not None
        for path in (settings.tls.ca_file, settings.tls.cert_file, settings.tls.key_file):
            local = topo.host_path(service, str(path), volumes)
            assert local is not None and local.is_file(), f"{name}: {path} is not written by the certs service"
        token = topo.host_path(service, str(settings.enrolment_token_file), volumes)
        bootstrap_view = topo.host_path(compose["services"]["bootstrap"],
                                        f"/srv/mlecs/tls/{settings.device_name}/enrolment.token", volumes)
        assert token == bootstrap_view, f"{name} reads its token where bootstrap does not write it"
        assert topo.host_path(service, str(settings.state_dir), volumes) is not None, f"{name}: state not in a volume"
        assert local is not None and not list(local.parent.glob("ca.key")), f"{name}: the CA key reached a device"


def test_no_secret_is_baked_into_an_image_or_committed():
    compose = topo.load()
    for dockerfile in (ROOT / "deploy" / "docker").glob("*.Dockerfile"):
        text = dockerfile.read_text()
        assert not re.search(r"PASSWORD|TOKEN|SECRET|\.key\b|\.pem\b", text, re.I), dockerfile.name
    grafana = compose["services"]["grafana"]
    assert topo.environment(grafana)["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in topo.environment(grafana)
    secret_file = topo.interpolate(compose["secrets"]["grafana_admin_password"]["file"])
    ignored = subprocess.run(["git", "check-ignore", "-q", secret_file], cwd=ROOT, timeout=30)
    assert ignored.returncode == 0, f"{secret_file} must be git-ignored"
    dockerignore = ROOT / ".dockerignore"
    assert dockerignore.is_file() and "secrets" in dockerignore.read_text(), "keep secrets/ out of build contexts"
