"""Alembic environment for the coordinator's schema.

The database comes from the caller, in this order: a connection in ``config.attributes["connection"]``
(what ``server.persistence.database.migrate`` passes), the ``sqlalchemy.url`` option, or the
``MLECS_DATABASE_URL`` environment variable (for the ``alembic`` command line).
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from server.persistence.database import create_engine_for
from server.persistence.tables import metadata

config = context.config

# Only the command line has an ini file; programmatic runs must not reset the application's logging.
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _database_url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("MLECS_DATABASE_URL")
    if not url:
        raise RuntimeError("no database to migrate: set sqlalchemy.url or MLECS_DATABASE_URL")
    return url


# Any fixed number: coordinators that start together take turns instead of racing the same DDL.
_MIGRATION_LOCK_ID = 0x6D6C6563


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Held until the migration transaction ends (SQLite serialises writers by itself).
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_ID})
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    """Writes the SQL to stdout instead of executing it (``alembic upgrade --sql``)."""
    url = _database_url()
    context.configure(url=url, target_metadata=metadata, literal_binds=True,
                      render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine_for(_database_url())
    try:
        with engine.begin() as owned:
            _run(owned)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
