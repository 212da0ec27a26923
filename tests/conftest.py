"""Fixtures for tests that need the real PostgreSQL and Redis servers (CI starts both).

Every test owns what it touches: databases are created under unique ``mlecs_test_<hex>`` names and
dropped afterwards, Redis keys live under a unique prefix and are deleted afterwards. An unreachable
server fails the test with a message saying how to start it; it is never skipped.

    postgres_server_url       (session)  URL of the maintenance database; fails if PostgreSQL is down
    make_postgres_database    (function) callable -> URL of a new, empty database, dropped after the test
    migrated_postgres_url     (session)  URL of one database migrated to head, shared by the session
    migrated_sqlite_template  (session)  path of a SQLite file migrated to head (copy it, don't write it)
    sqlite_url                (function) URL of a fresh SQLite file migrated to head
    redis_client              (session)  a redis.Redis on the test server; fails if Redis is down
    redis_prefix              (function) a unique key prefix whose keys are deleted after the test
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy.engine import make_url

from server.persistence.database import migrate

POSTGRES_URL = os.environ.get("MLECS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
"""Maintenance database of the test PostgreSQL server; test databases are created through it."""
REDIS_URL = os.environ.get("MLECS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _admin(url: str) -> psycopg.Connection:
    # CREATE/DROP DATABASE cannot run inside a transaction.
    return psycopg.connect(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False),
                           autocommit=True, connect_timeout=5)


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    try:
        with _admin(POSTGRES_URL) as connection:
            connection.execute("SELECT 1")
        problem = None
    except psycopg.OperationalError as exc:
        problem = exc
    if problem is not None:  # failed outside the handler, so the report shows only this message
        pytest.fail(
            f"PostgreSQL is not reachable at {make_url(POSTGRES_URL)!r}: {problem}\n"
            "These tests need a real server: start PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres) "
            "or point MLECS_TEST_POSTGRES_URL at one.",
            pytrace=False,
        )
    return POSTGRES_URL


def _create_database(server_url: str) -> str:
    name = f"mlecs_test_{uuid.uuid4().hex[:12]}"
    with _admin(server_url) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def _drop_database(server_url: str, url: str) -> None:
    name = make_url(url).database
    with _admin(server_url) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def make_postgres_database(postgres_server_url: str) -> Iterator[Callable[[], str]]:
    created: list[str] = []

    def create() -> str:
        created.append(_create_database(postgres_server_url))
        return created[-1]

    yield create
    for url in created:
        _drop_database(postgres_server_url, url)


@pytest.fixture(scope="session")
def migrated_postgres_url(postgres_server_url: str) -> Iterator[str]:
    url = _create_database(postgres_server_url)
    try:
        migrate(url)
        yield url
    finally:
        _drop_database(postgres_server_url, url)


@pytest.fixture(scope="session")
def migrated_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    migrate(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(migrated_sqlite_template: Path, tmp_path: Path) -> str:
    # Copying a migrated file is much faster than running the migrations for every test.
    path = tmp_path / "coordinator.db"
    shutil.copyfile(migrated_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
        problem = None
    except redis.RedisError as exc:
        problem = exc
    if problem is not None:
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL}: {problem}\n"
            "These tests need a real server: start Redis on 127.0.0.1:6379 or point MLECS_TEST_REDIS_URL at one.",
            pytrace=False,
        )
    yield client
    client.close()


@pytest.fixture
def redis_prefix(redis_client: redis.Redis) -> Iterator[str]:
    prefix = f"mlecs_test_{uuid.uuid4().hex[:12]}"
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}:*"))
    if keys:
        redis_client.delete(*keys)
