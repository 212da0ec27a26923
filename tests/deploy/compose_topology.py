"""docker-compose.yml read as data, for the static checks and for running its topology as local processes.

Only what this repository's compose file uses is understood: ``${VAR:-default}`` interpolation, short
volume syntax (``source:target[:ro]``), list commands and the ENTRYPOINT/CMD of our own Dockerfiles.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` with ``env`` (default: none set, so defaults apply)."""
    env = env or {}
    return _VARIABLE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def load() -> dict[str, Any]:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(compose, dict), "docker-compose.yml is not a mapping"
    return compose


@dataclass(frozen=True)
class Mount:
    source: str
    """A named volume, or a host path relative to the repository root."""
    target: PurePosixPath
    read_only: bool

    @property
    def is_named_volume(self) -> bool:
        return not self.source.startswith((".", "/"))


def mounts(service: dict[str, Any]) -> list[Mount]:
    result = []
    for spec in service.get("volumes", []):
        parts = interpolate(spec).split(":")
        assert len(parts) in (2, 3), f"unexpected volume syntax {spec!r}"
        result.append(Mount(parts[0], PurePosixPath(parts[1]), len(parts) == 3 and parts[2] == "ro"))
    return result


def host_path(service: dict[str, Any], container_path: str, volume_dirs: dict[str, Path]) -> Path | None:
    """Where ``container_path`` of ``service`` lies on this machine: named volumes are the directories
    in ``volume_dirs``, bind mounts are resolved from the repository root; None if nothing is mounted there."""
    path = PurePosixPath(container_path)
    best: Mount | None = None
    for mount in mounts(service):
        if (path == mount.target or mount.target in path.parents) and (
                best is None or len(mount.target.parts) > len(best.target.parts)):
            best = mount
    if best is None:
        return None
    base = volume_dirs[best.source] if best.is_named_volume else (ROOT / best.source).resolve()
    return base.joinpath(*path.relative_to(best.target).parts)


def dockerfile(service: dict[str, Any], compose: dict[str, Any]) -> Path:
    """The Dockerfile that builds the service's image (directly, or by another service with that image)."""
    build = service.get("build") or next(
        (s["build"] for s in compose["services"].values() if s.get("image") == service.get("image") and "build" in s),
        None)
    assert build is not None, f"no service builds image {service.get('image')}"
    return ROOT / build["context"] / build["dockerfile"]


def _instruction(path: Path, name: str) -> list[str]:
    for line in reversed(path.read_text().splitlines()):
        if line.startswith(f"{name} "):
            value = line[len(name) + 1:].strip()
            return list(json.loads(value)) if value.startswith("[") else shlex.split(value)
    return []


def image_env(path: Path) -> dict[str, str]:
    """The ENV of a Dockerfile (``ENV A=1 B=2`` lines, continuation lines joined)."""
    text = path.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for item in shlex.split(line[4:]):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def argv(service: dict[str, Any], compose: dict[str, Any]) -> list[str]:
    """The process the container runs: entrypoint and command, each from the service or else the image."""
    path = dockerfile(service, compose)
    entrypoint = service.get("entrypoint") or _instruction(path, "ENTRYPOINT")
    command = service.get("command") or ([] if "entrypoint" in service else _instruction(path, "CMD"))
    return [*entrypoint, *command]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "use the mapping form of environment"
    return {key: interpolate(str(value)) for key, value in env.items()}


def is_one_shot(name: str, compose: dict[str, Any]) -> bool:
    """A service others wait on to finish (``service_completed_successfully``)."""
    return any(dep.get("condition") == "service_completed_successfully"
               for s in compose["services"].values() for n, dep in (s.get("depends_on") or {}).items() if n == name)


def start_order(compose: dict[str, Any]) -> list[str]:
    """Services in an order compose may start them (each after everything it depends on)."""
    order: list[str] = []
    pending = dict(compose["services"])
    while pending:
        ready = [n for n, s in pending.items() if set(s.get("depends_on") or {}) <= set(order)]
        assert ready, f"dependency cycle among {sorted(pending)}"
        order.extend(sorted(ready))
        for name in ready:
            del pending[name]
    return order


def os_environ_without_mlecs() -> dict[str, str]:
    """This process's environment minus MLECS_* (so that a developer's settings do not leak in)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MLECS_")}


def container_root(service: dict[str, Any], volume_dirs: dict[str, Path], root: Path) -> Path:
    """A directory standing for the service's filesystem: each mount target is a symlink to its named
    volume's directory (or bind-mounted host path), so that ``root / container_path`` finds what the
    container would see there."""
    for mount in mounts(service):
        link = root.joinpath(*mount.target.parts[1:])
        link.parent.mkdir(parents=True, exist_ok=True)
        source = volume_dirs[mount.source] if mount.is_named_volume else (ROOT / mount.source).resolve()
        link.symlink_to(source, target_is_directory=source.is_dir())
    return root


def in_root(root: Path, container_path: str) -> str:
    return str(root.joinpath(*PurePosixPath(container_path).parts[1:]))
