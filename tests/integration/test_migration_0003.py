"""Revision 0003 (round targets, anchor agreement, one upload id per device, leases) down to 0002 and up again,
on SQLite and PostgreSQL, with rows written before the downgrade."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from server.domain.errors import ConflictError
from server.domain.federation_config import FederationConfig
from server.domain.models import Device, Federation, ModelVersion, Round, Update, UpdateState
from server.domain.rounds import RoundState
from server.persistence.database import create_engine_for, current_revision, downgrade, migrate
from server.persistence.sql_store import SqlStore

T0 = datetime(2025, 1, 1, tzinfo=UTC)
BEFORE = "0002"
HEAD = "0003"
UPLOAD_UNIQUE = "uq_updates_device_id_upload_id"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    make_postgres_database: Callable[[], str] = request.getfixturevalue("make_postgres_database")
    return make_postgres_database()


@dataclass
class Written:
    federation: Federation
    device: Device
    version: ModelVersion
    round_: Round
    update: Update


@pytest.fixture
def written(empty_database_url: str) -> Iterator[Written]:
    """A database at head holding one row of each kind, using every column 0003 added, and a lease."""
    migrate(empty_database_url)
    store = SqlStore.from_url(empty_database_url)
    try:
        federation = Federation(name="fed", config=FederationConfig(min_updates=1), created_at=T0)
        store.add_federation(federation)
        device = Device(federation_id=federation.id, name="dev", modalities=frozenset({"image"}),
                        secret_hash="0" * 64, enrolled_at=T0)
        store.add_device(device)
        version = ModelVersion(federation_id=federation.id, round_number=0, codec="fp32", adapter_key="a" * 64,
                               adapter_sha256="a" * 64, adapter_size=10, created_at=T0)
        store.add_version(version)
        round_ = Round(federation_id=federation.id, number=1, state=RoundState.COLLECTING, participants=[device.id],
                       target_updates=3, created_at=T0, base_version_id=version.id)
        store.add_round(round_)
        update = Update(round_id=round_.id, device_id=device.id, upload_id="upload-1", codec="fp16",
                        declared_size=10, sha256="b" * 64, modalities=frozenset({"image"}), public_samples=5,
                        private_samples=7, state=UpdateState.ACCEPTED, received_bytes=10, blob_key="b" * 64,
                        base_version_id=version.id, fused_sample_ids=[3, 9], anchor_agreement=0.8,
                        created_at=T0, accepted_at=T0 + timedelta(minutes=1))
        store.add_update(update)
        assert store.acquire_lease("scheduler", "replica-a", 300) is not None
        assert store.get_round(round_.id).target_updates == 3
        assert store.list_updates(round_.id)[0].anchor_agreement == pytest.approx(0.8)
    finally:
        store.close()
    yield Written(federation, device, version, round_, update)


def _columns(url: str, table: str) -> set[str]:
    engine = create_engine_for(url)
    try:
        return {column["name"] for column in inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine_for(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _unique_constraints(url: str, table: str) -> set[str]:
    engine = create_engine_for(url)
    try:
        return {constraint["name"] for constraint in inspect(engine).get_unique_constraints(table)}
    finally:
        engine.dispose()


def _rows(url: str, sql: str) -> list[tuple]:
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql))]
    finally:
        engine.dispose()


def test_downgrading_0003_keeps_every_row_and_drops_only_what_it_added(
        empty_database_url: str, written: Written) -> None:
    url = empty_database_url
    downgrade(url, BEFORE)

    assert current_revision(url) == BEFORE
    assert "leases" not in _tables(url)
    assert {"federations", "devices", "model_versions", "rounds", "updates", "device_reports"} <= _tables(url)
    assert "target_updates" not in _columns(url, "rounds")
    assert "anchor_agreement" not in _columns(url, "updates")
    assert UPLOAD_UNIQUE not in _unique_constraints(url, "updates")

    assert _rows(url, "SELECT id, name FROM federations") == [(written.federation.id, "fed")]
    assert _rows(url, "SELECT id, name FROM devices") == [(written.device.id, "dev")]
    assert _rows(url, "SELECT id, round_number FROM model_versions") == [(written.version.id, 0)]
    assert _rows(url, "SELECT id, number, state, base_version_id FROM rounds") == [
        (written.round_.id, 1, "collecting", written.version.id)]
    assert _rows(url, "SELECT id, round_id, device_id, upload_id, state, public_samples, private_samples, blob_key "
                      "FROM updates") == [
        (written.update.id, written.round_.id, written.device.id, "upload-1", "accepted", 5, 7, "b" * 64)]


def test_upgrading_again_restores_the_0003_schema_with_defaults_for_old_rows(
        empty_database_url: str, written: Written) -> None:
    url = empty_database_url
    downgrade(url, BEFORE)
    migrate(url, HEAD)

    assert current_revision(url) == HEAD
    assert "leases" in _tables(url)
    assert {"target_updates"} <= _columns(url, "rounds")
    assert {"anchor_agreement"} <= _columns(url, "updates")
    assert UPLOAD_UNIQUE in _unique_constraints(url, "updates")
    assert _rows(url, "SELECT * FROM leases") == []

    migrate(url)  # the rest of the way: the store reads the newest schema
    store = SqlStore.from_url(url)
    try:
        restored_round = store.get_round(written.round_.id)
        [restored_update] = store.list_updates(written.round_.id)
        assert store.get_federation(written.federation.id).name == "fed"
        assert store.get_version(written.version.id) == written.version
        # The lease table starts afresh: the first claim gets token 1 again.
        fence = store.acquire_lease("scheduler", "replica-b", 30)
    finally:
        store.close()

    assert restored_round.target_updates == 0
    expected_round = Round(**{**vars(written.round_), "target_updates": 0})
    assert restored_round == expected_round
    assert restored_update.anchor_agreement is None
    expected_update = Update(**{**vars(written.update), "anchor_agreement": None})
    assert restored_update == expected_update
    assert fence is not None and fence.token == 1


def test_after_the_round_trip_one_upload_id_per_device_is_enforced_again(
        empty_database_url: str, written: Written) -> None:
    downgrade(empty_database_url, BEFORE)
    migrate(empty_database_url)
    store = SqlStore.from_url(empty_database_url)
    try:
        later = Round(federation_id=written.federation.id, number=2, created_at=T0)
        store.add_round(later)
        duplicate = Update(**{**vars(written.update), "id": "another-id", "round_id": later.id,
                              "state": UpdateState.PARTIAL, "anchor_agreement": None})
        with pytest.raises(ConflictError):
            store.add_update(duplicate)
    finally:
        store.close()
