"""Engines for the coordinator's database and programmatic schema migrations (Alembic).

``create_engine_for`` accepts SQLite and PostgreSQL URLs (``postgresql://`` is rewritten to the
psycopg 3 driver); ``migrate`` / ``downgrade`` run the Alembic revisions in ``migrations/``.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.pool import ConnectionPoolEntry

MIGRATIONS_DIR_ENV = "MLECS_MIGRATIONS_DIR"
"""Environment variable naming the Alembic script directory when the repository layout is absent."""

SQLITE_BUSY_TIMEOUT_MS = 10_000
"""How long a SQLite writer waits for another writer's lock before giving up."""

_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_sqlite_url(data_dir: Path) -> str:
    """The URL of the embedded database file under ``data_dir``."""
    return f"sqlite:///{(Path(data_dir) / 'coordinator.db').resolve()}"


def normalise_url(url: str | URL) -> URL:
    """Parses ``url`` and selects the psycopg 3 driver for plain PostgreSQL URLs."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def create_engine_for(url: str | URL, **kwargs: Any) -> Engine:
    """An engine configured for the coordinator: SQLite in WAL mode with foreign keys, or PostgreSQL."""
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, connect_args={"check_same_thread": False}, **kwargs)
        _configure_sqlite(engine)
        return engine
    # A pool big enough for every thread that talks to the database (the default executor, the gRPC
    # control threads, the scheduler), so connections are reused instead of opened per call (each one
    # is a PostgreSQL backend process). No pre-ping: it would add a round trip to every transaction;
    # after a database restart the first call on a dead connection fails as UnavailableError (devices
    # retry) and SQLAlchemy then replaces the whole pool.
    kwargs.setdefault("pool_size", 16)
    kwargs.setdefault("max_overflow", 16)
    return create_engine(parsed, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
        # Take transaction control from pysqlite (which would not wrap DDL and delays BEGIN) so that
        # SQLAlchemy's own BEGIN below makes every transaction, migrations included, atomic.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if engine.url.database not in (None, "", ":memory:"):
                # WAL lets readers proceed while one writer commits.
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # IMMEDIATE takes the write lock up front. A deferred transaction that reads and then writes,
        # after another connection committed in between, fails at once with SQLITE_BUSY_SNAPSHOT (WAL)
        # instead of waiting out busy_timeout; taking the lock first makes it wait its turn instead.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def migrations_dir(script_location: Path | str | None = None) -> Path:
    """The Alembic script directory: the argument, else ``$MLECS_MIGRATIONS_DIR``, else the repository's."""
    chosen = script_location or os.environ.get(MIGRATIONS_DIR_ENV) or _REPO_ROOT / "migrations"
    path = Path(chosen)
    if not (path / "env.py").is_file():
        raise FileNotFoundError(
            f"no Alembic environment at {path}: set {MIGRATIONS_DIR_ENV} to the 'migrations' directory "
            "of the mlecs source tree"
        )
    return path


def alembic_config(script_location: Path | str | None = None) -> Config:
    """An Alembic configuration for the coordinator's migrations, built without reading alembic.ini."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir(script_location)))
    return config


def migrate(url_or_engine: str | URL | Engine, revision: str = "head", *,
            script_location: Path | str | None = None) -> None:
    """Upgrades the database to ``revision`` (default: the newest schema) in one transaction."""
    _run(url_or_engine, script_location, lambda config: command.upgrade(config, revision))


def downgrade(url_or_engine: str | URL | Engine, revision: str = "base", *,
              script_location: Path | str | None = None) -> None:
    """Downgrades the database to ``revision``; ``base`` drops every coordinator table."""
    _run(url_or_engine, script_location, lambda config: command.downgrade(config, revision))


def head_revision() -> str | None:
    """The newest revision this code's migrations know."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(url_or_engine: str | URL | Engine) -> str | None:
    """The revision the database is at, or None for an unmigrated database."""
    engine, owned = _engine(url_or_engine)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        if owned:
            engine.dispose()


def _run(url_or_engine: str | URL | Engine, script_location: Path | str | None, action: Any) -> None:
    config = alembic_config(script_location)
    engine, owned = _engine(url_or_engine)
    try:
        # env.py uses this connection, so the engine's SQLite settings apply and the whole
        # migration commits or rolls back as one transaction.
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            action(config)
    finally:
        if owned:
            engine.dispose()


def _engine(url_or_engine: str | URL | Engine) -> tuple[Engine, bool]:
    if isinstance(url_or_engine, Engine):
        return url_or_engine, False
    return create_engine_for(url_or_engine), True
