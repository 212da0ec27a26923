"""docker-compose.yml checked without a Docker engine: images, settings and files it refers to exist."""

from __future__ import annotations

from pathlib import Path

import yaml

from edge_agent.config import load_settings
from server.config import CoordinatorSettings

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def test_every_built_service_has_its_dockerfile_and_copies_only_existing_paths():
    for name, service in _compose()["services"].items():
        if "build" not in service:
            continue
        dockerfile = ROOT / service["build"]["context"] / service["build"]["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"
        assert "torch==2.13.0" in dockerfile.read_text() and "/cpu" in dockerfile.read_text(), "CPU-only torch"


def test_the_coordinator_environment_names_only_real_settings():
    known = {f"MLECS_{name.upper()}" for name in CoordinatorSettings.model_fields}
    for name in ("migrate", "coordinator"):
        env = _compose()["services"][name]["environment"]
        assert set(env) <= known, f"{name}: unknown settings {set(env) - known}"
        assert env["MLECS_DATABASE_URL"].startswith("postgresql://") and env["MLECS_REDIS_URL"].startswith("redis://")


def test_services_start_in_dependency_order_with_health_conditions():
    services = _compose()["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["coordinator"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"


def test_agents_hold_different_modality_sets_and_distinct_shards_of_one_partition():
    services = _compose()["services"]
    agents = {n: s for n, s in services.items() if n.startswith("agent-")}
    assert len(agents) >= 3
    settings = []
    for name, service in agents.items():
        mount = next(v for v in service["volumes"] if v.endswith(":/etc/mlecs/agent.toml:ro"))
        config = load_settings(ROOT / mount.split(":")[0])
        assert config.coordinator == "coordinator:50051", name
        settings.append(config)
    assert len({tuple(s.modalities) for s in settings}) >= 3
    assert sorted(s.partition.client_index for s in settings) == list(range(len(settings)))
    assert {s.partition.num_clients for s in settings} == {len(settings)}
    assert len({s.federation for s in settings}) == 1
    # No secret is baked into an image: the database password comes from the environment.
    for dockerfile in (ROOT / "deploy" / "docker").glob("*.Dockerfile"):
        assert "PASSWORD" not in dockerfile.read_text()


def test_every_named_volume_is_declared():
    compose = _compose()
    declared = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in declared, f"{name} uses undeclared volume {source}"
