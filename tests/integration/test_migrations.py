"""The Alembic migrations on SQLite and PostgreSQL: up, down, up again, and no drift from tables.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from server.domain.federation_config import FederationConfig
from server.domain.models import Device, Federation, Round, Update
from server.persistence.database import (
    MIGRATIONS_DIR_ENV,
    create_engine_for,
    current_revision,
    downgrade,
    migrate,
    migrations_dir,
)
from server.persistence.sql_store import SqlStore
from server.persistence.tables import metadata

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLES = {"federations", "devices", "model_versions", "rounds", "updates", "device_reports", "leases",
          "enrolment_tokens", "admin_tokens", "audit_log", "refusals"}
HEAD = "0007"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    make_postgres_database: Callable[[], str] = request.getfixturevalue("make_postgres_database")
    return make_postgres_database()


def _tables(url: str) -> set[str]:
    engine = create_engine_for(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _schema_diff(url: str) -> list:
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def test_migrating_up_down_and_up_again_leaves_every_table_in_place(empty_database_url: str) -> None:
    migrate(empty_database_url)
    assert _tables(empty_database_url) == TABLES
    assert current_revision(empty_database_url) == HEAD

    downgrade(empty_database_url)
    assert _tables(empty_database_url) == set()
    assert current_revision(empty_database_url) is None

    migrate(empty_database_url)
    assert _tables(empty_database_url) == TABLES


def test_the_migrated_schema_matches_the_orm_metadata_exactly(empty_database_url: str) -> None:
    migrate(empty_database_url)
    assert _schema_diff(empty_database_url) == []


def test_the_schema_comparison_does_notice_a_difference(empty_database_url: str) -> None:
    migrate(empty_database_url)
    engine = create_engine_for(empty_database_url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP INDEX ix_rounds_state")
    finally:
        engine.dispose()
    assert [entry[0] for entry in _schema_diff(empty_database_url)] == ["add_index"]


def test_migrating_an_up_to_date_database_again_changes_nothing(empty_database_url: str) -> None:
    migrate(empty_database_url)
    migrate(empty_database_url)
    assert current_revision(empty_database_url) == HEAD


def test_migrate_accepts_an_engine_and_leaves_it_usable(tmp_path: Path) -> None:
    engine = create_engine_for(f"sqlite:///{tmp_path / 'engine.db'}")
    try:
        migrate(engine)
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_the_migrations_directory_can_be_given_by_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MIGRATIONS_DIR_ENV, str(REPO_ROOT / "migrations"))
    assert migrations_dir() == REPO_ROOT / "migrations"
    migrate(f"sqlite:///{tmp_path / 'env.db'}")
    assert _tables(f"sqlite:///{tmp_path / 'env.db'}") == TABLES


def test_a_missing_migrations_directory_is_reported_with_the_variable_to_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MIGRATIONS_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=MIGRATIONS_DIR_ENV):
        migrate(f"sqlite:///{tmp_path / 'x.db'}")


def test_the_alembic_command_line_config_migrates_the_database_named_in_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("MLECS_DATABASE_URL", url)
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.attributes["configure_logging"] = False  # keep pytest's logging as it is
    command.upgrade(config, "head")
    assert _tables(url) == TABLES


def test_updates_survive_the_fused_ids_revision_down_and_up(empty_database_url: str) -> None:
    """0002 adds updates.fused_sample_ids; rows accepted before it keep everything and read as []."""
    migrate(empty_database_url)
    store = SqlStore.from_url(empty_database_url)
    try:
        federation = Federation(name="fed", config=FederationConfig())
        store.add_federation(federation)
        device = Device(federation_id=federation.id, name="dev", modalities=frozenset({"image"}), secret_hash="0" * 64)
        store.add_device(device)
        round_ = Round(federation_id=federation.id, number=1)
        store.add_round(round_)
        update = Update(round_id=round_.id, device_id=device.id, upload_id="upload-1", codec="fp16", declared_size=10,
                        sha256="a" * 64, modalities=frozenset({"image"}), public_samples=5, private_samples=7,
                        fused_sample_ids=[3, 9])
        store.add_update(update)
        assert store.list_updates(round_.id)[0].fused_sample_ids == [3, 9]
    finally:
        store.close()

    downgrade(empty_database_url, "0001")
    migrate(empty_database_url)
    store = SqlStore.from_url(empty_database_url)
    try:
        [restored] = store.list_updates(round_.id)
    finally:
        store.close()
    assert (restored.id, restored.upload_id, restored.public_samples, restored.private_samples) == (
        update.id, "upload-1", 5, 7)
    assert restored.fused_sample_ids == []
