"""What the migration tests share: a database at a revision, on SQLite or PostgreSQL, and raw SQL on it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from server.persistence.database import create_engine_for, migrate


def database_at(request: pytest.FixtureRequest, tmp_path: Path, revision: str) -> str:
    """A fresh database (``request.param``: sqlite or postgres) migrated to ``revision``; its URL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fresh.db'}"
    else:
        make_postgres_database: Callable[[], str] = request.getfixturevalue("make_postgres_database")
        url = make_postgres_database()
    migrate(url, revision)
    return url


def execute(url: str, sql: str, **params: object) -> None:
    """Runs one statement in its own transaction, as an older coordinator would have written the row."""
    engine = create_engine_for(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(sql), params)
    finally:
        engine.dispose()


def insert_federation(url: str, federation_id: str, name: str, config_json: str) -> None:
    execute(url, "INSERT INTO federations (id, name, state, config, created_at) "
                 "VALUES (:id, :name, 'active', :config, CURRENT_TIMESTAMP)",
            id=federation_id, name=name, config=config_json)
