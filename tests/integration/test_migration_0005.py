"""Revision 0005 pins federations created before private-data AMT to the rules they were created under,
on SQLite and PostgreSQL; the downgrade gives an older coordinator rows it can read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text

from server.persistence.database import create_engine_for, current_revision, downgrade, migrate
from server.persistence.sql_store import SqlStore
from tests.integration.migration_helpers import database_at, insert_federation

OLD_CONFIG = {"min_updates": 2, "public_epochs": 5, "model": {"backbone": "tiny"}}
NEW_CONFIG = {"min_updates": 1, "upload_stage": "private", "model": {"backbone": "tiny", "fused_skip": True}}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_at_0004(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = database_at(request, tmp_path, "0004")
    insert_federation(url, "f-old", "old", json.dumps(OLD_CONFIG))
    return url


def _config(url: str, federation_id: str) -> dict:
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            stored = connection.execute(text("SELECT config FROM federations WHERE id = :id"),
                                        {"id": federation_id}).scalar_one()
    finally:
        engine.dispose()
    return json.loads(stored) if isinstance(stored, str) else dict(stored)


def test_a_federation_from_before_keeps_the_public_upload_and_the_head_it_had(database_at_0004: str) -> None:
    migrate(database_at_0004, "0005")

    assert current_revision(database_at_0004) == "0005"
    assert _config(database_at_0004, "f-old") == {**OLD_CONFIG, "upload_stage": "public",
                                                  "model": {"backbone": "tiny", "fused_skip": False}}
    store = SqlStore.from_url(database_at_0004)
    try:
        federation = store.get_federation("f-old")
        assert federation.config.upload_stage == "public"
        assert federation.config.model == {"backbone": "tiny", "fused_skip": False}
    finally:
        store.close()


def test_the_downgrade_gives_the_older_coordinator_the_config_it_wrote(database_at_0004: str) -> None:
    migrate(database_at_0004)
    insert_federation(database_at_0004, "f-new", "new", json.dumps(NEW_CONFIG))

    downgrade(database_at_0004, "0004")

    assert _config(database_at_0004, "f-old") == OLD_CONFIG
    assert _config(database_at_0004, "f-new") == NEW_CONFIG  # the new rules stay: older code refuses them by name
