"""Revision 0007 moves the cloud's work off the round's commit, on SQLite and PostgreSQL: versions stored before
it owe nothing, federations created before it keep opening a round only once the previous round's anchors are
ready (``anchors = "wait"``), and the downgrade gives the older coordinator back what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text

from server.domain.models import CloudState
from server.persistence.database import create_engine_for, current_revision, downgrade, migrate
from server.persistence.sql_store import SqlStore
from tests.integration.migration_helpers import database_at, execute, insert_federation

OLD_CONFIG = {"seed": 7, "upload_stage": "private", "model": {"backbone": "tiny"}}
CHOSEN_CONFIG = {**OLD_CONFIG, "anchors": "latest"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_at_0006(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = database_at(request, tmp_path, "0006")
    insert_federation(url, "f-old", "old", json.dumps(OLD_CONFIG))
    insert_federation(url, "f-chosen", "chosen", json.dumps(CHOSEN_CONFIG))
    execute(url, "INSERT INTO model_versions (id, federation_id, round_number, codec, adapter_key, adapter_sha256, "
                 "adapter_size, anchors_key, anchors_sha256, anchors_size, metrics, created_at) VALUES ('v0', 'f-old', "
                 "0, 'fp32', :key, :key, 10, :key, :key, 20, '{\"accuracy\": 0.5}', CURRENT_TIMESTAMP)", key="a" * 64)
    return url


def test_existing_federations_wait_for_anchors_and_existing_versions_owe_nothing(database_at_0006: str) -> None:
    migrate(database_at_0006)

    assert current_revision(database_at_0006) == "0007"
    store = SqlStore.from_url(database_at_0006)
    try:
        assert store.get_federation("f-old").config.anchors == "wait"
        assert store.get_federation("f-chosen").config.anchors == "latest"  # a value already there is kept
        version = store.get_version("v0")
        assert version.cloud_state is CloudState.NONE and version.cloud_attempts == 0
        assert version.generated_anchors is None and version.fused_key is None
        assert version.metrics == {"accuracy": 0.5} and store.owed_cloud_work() == []
    finally:
        store.close()


def test_the_downgrade_removes_the_new_key_and_columns(database_at_0006: str) -> None:
    migrate(database_at_0006)
    downgrade(database_at_0006, "0006")

    assert current_revision(database_at_0006) == "0006"
    execute(database_at_0006, "SELECT id, anchors_key FROM model_versions")  # the old columns are intact
    assert "anchors" not in _raw_config(database_at_0006, "f-chosen")
    assert _raw_config(database_at_0006, "f-old") == OLD_CONFIG


def _raw_config(url: str, federation_id: str) -> dict:
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            value = connection.execute(text("SELECT config FROM federations WHERE id = :id"),
                                       {"id": federation_id}).scalar_one()
    finally:
        engine.dispose()
    return value if isinstance(value, dict) else json.loads(value)
