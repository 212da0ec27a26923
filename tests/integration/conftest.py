"""Backend-parametrised store fixtures: each test using them runs once on SQLite and once on PostgreSQL.

    database_url  (function, params sqlite|postgres)  URL of an empty database migrated to head
    store         (function)  a SqlStore on ``database_url``
    seed          (function)  a Seed that adds related records (federation, device, version, round)
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from server.domain.federation_config import FederationConfig
from server.domain.models import Device, Federation, ModelVersion, Round
from server.persistence.database import create_engine_for
from server.persistence.sql_store import SqlStore
from server.persistence.tables import metadata

T0 = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    url = str(request.getfixturevalue("migrated_postgres_url"))
    # One migrated database serves the session; emptying it is far cheaper than migrating per test.
    engine = create_engine_for(url)
    try:
        with engine.begin() as connection:
            names = ", ".join(f'"{table.name}"' for table in metadata.sorted_tables)
            connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()
    return url


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    store = SqlStore.from_url(database_url)
    yield store
    store.close()


class Seed:
    """Adds valid, related records to a store with as few arguments as a test needs."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store

    def federation(self, name: str = "fed", **fields: Any) -> Federation:
        federation = Federation(name=name, config=FederationConfig(min_updates=2, model={"dim": 8}), **fields)
        self.store.add_federation(federation)
        return federation

    def device(self, federation: Federation, name: str = "dev", **fields: Any) -> Device:
        device = Device(federation_id=federation.id, name=name, modalities=frozenset({"image", "audio"}),
                        secret_hash="0" * 64, **fields)
        self.store.add_device(device)
        return device

    def version(self, federation: Federation, round_number: int = 0, **fields: Any) -> ModelVersion:
        fields.setdefault("created_at", T0 + timedelta(minutes=round_number))
        version = ModelVersion(federation_id=federation.id, round_number=round_number, codec="fp32",
                               adapter_key="a" * 64, adapter_sha256="a" * 64, adapter_size=10, **fields)
        self.store.add_version(version)
        return version

    def round(self, federation: Federation, number: int = 1, **fields: Any) -> Round:
        fields.setdefault("created_at", T0 + timedelta(minutes=number))
        round_ = Round(federation_id=federation.id, number=number, **fields)
        self.store.add_round(round_)
        return round_


@pytest.fixture
def seed(store: SqlStore) -> Seed:
    return Seed(store)
