"""Engines and error translation: SQLite settings, URL rewriting and an unreachable database."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.domain.errors import UnavailableError
from server.persistence.database import (
    SQLITE_BUSY_TIMEOUT_MS,
    create_engine_for,
    default_sqlite_url,
    normalise_url,
)
from server.persistence.sql_store import SqlStore


def test_plain_postgresql_urls_use_the_psycopg_driver() -> None:
    assert normalise_url("postgresql://u@h:5432/db").drivername == "postgresql+psycopg"
    assert normalise_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("sqlite:///x.db").drivername == "sqlite"


def test_the_default_sqlite_url_points_into_the_data_dir(tmp_path: Path) -> None:
    assert default_sqlite_url(tmp_path) == f"sqlite:///{tmp_path.resolve()}/coordinator.db"


def test_sqlite_connections_use_wal_foreign_keys_and_a_busy_timeout(tmp_path: Path) -> None:
    engine = create_engine_for(default_sqlite_url(tmp_path))
    try:
        with engine.connect() as connection:
            pragmas = {name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                       for name in ("journal_mode", "foreign_keys", "busy_timeout")}
        assert pragmas["journal_mode"] == "wal"
        assert pragmas["foreign_keys"] == 1
        assert pragmas["busy_timeout"] == SQLITE_BUSY_TIMEOUT_MS
    finally:
        engine.dispose()


def test_an_unreachable_postgresql_server_raises_unavailable() -> None:
    store = SqlStore.from_url("postgresql://postgres@127.0.0.1:1/none?connect_timeout=2")
    try:
        with pytest.raises(UnavailableError, match="postgresql database is unavailable") as caught:
            store.get_federation("x")
        assert caught.value.retryable
        assert "127.0.0.1" not in str(caught.value) and "[ref " in str(caught.value)  # the driver's text is logged
    finally:
        store.close()


def test_an_unopenable_sqlite_file_raises_unavailable(tmp_path: Path) -> None:
    store = SqlStore.from_url(f"sqlite:///{tmp_path}/missing-dir/db.sqlite")
    try:
        with pytest.raises(UnavailableError, match="sqlite database is unavailable"):
            store.list_federations()
    finally:
        store.close()
