"""The edge install must stay light: no web framework, ORM or Redis client on a device."""

import contextlib
import re
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = {"fastapi", "sqlalchemy", "redis", "uvicorn", "alembic", "psycopg", "starlette"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _closure(requirements: list[str]) -> set[str]:
    """Every distribution reachable from the requirements, following installed metadata."""
    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        if "extra ==" in req:
            continue
        name = _name(req)
        if name in seen:
            continue
        seen.add(name)
        with contextlib.suppress(metadata.PackageNotFoundError):
            todo.extend(metadata.requires(name) or [])
    return seen


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _expand(extra: str) -> list[str]:
    project = _project()
    out = list(project["dependencies"])
    for req in project["optional-dependencies"][extra]:
        if _name(req) == "mlecs":
            inner = re.search(r"\[(.*)\]", req)
            assert inner is not None
            for sub in inner.group(1).split(","):
                out += project["optional-dependencies"][sub.strip()]
        else:
            out.append(req)
    return out


def test_the_edge_extra_pulls_no_server_packages_even_transitively():
    pulled = _closure(_expand("edge"))
    assert "torch" in pulled and "peft" in pulled
    assert not pulled & SERVER_ONLY, f"edge install would pull {sorted(pulled & SERVER_ONLY)}"


def test_the_server_extra_has_what_the_coordinator_imports():
    pulled = _closure(_expand("server"))
    assert {"fastapi", "sqlalchemy", "redis", "alembic", "prometheus-client"} <= pulled


def test_extras_server_edge_and_dev_exist():
    assert {"server", "edge", "dev"} <= set(_project()["optional-dependencies"])
