"""Revision 0006 brings stored federation configs inside the bounds now enforced when a config is built,
on SQLite and PostgreSQL: a federation that an older coordinator accepted with a value that could only
break it loads again, and one inside the bounds is left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.domain.federation_config import CONFIG_BOUNDS, FederationConfig
from server.persistence.database import current_revision, downgrade, migrate
from server.persistence.sql_store import SqlStore
from tests.integration.migration_helpers import database_at, insert_federation

BROKEN = {"seed": 2**80 + 7, "round_deadline_s": 1e308, "batch_size": 2**70, "public_epochs": 2**62,
          "clients_per_round": 3, "min_updates": 5, "upload_stage": "private", "model": {"backbone": "tiny"}}
SOUND = {"seed": 42, "round_deadline_s": 900.0, "min_updates": 2, "upload_stage": "private",
         "model": {"backbone": "tiny"}}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_at_0005(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = database_at(request, tmp_path, "0005")
    for federation_id, config in (("f-broken", BROKEN), ("f-sound", SOUND)):
        insert_federation(url, federation_id, federation_id, json.dumps(config))
    return url


def _load(url: str, federation_id: str) -> FederationConfig:
    store = SqlStore.from_url(url)
    try:
        return store.get_federation(federation_id).config
    finally:
        store.close()


def test_before_the_migration_the_broken_config_cannot_be_loaded(database_at_0005: str) -> None:
    with pytest.raises(ValueError, match=r"seed must be in \[0, 4294967295\]"):
        _load(database_at_0005, "f-broken")


def test_values_beyond_their_bounds_move_to_the_nearest_bound_and_the_federation_loads(database_at_0005: str) -> None:
    migrate(database_at_0005, "0006")

    assert current_revision(database_at_0005) == "0006"
    config = _load(database_at_0005, "f-broken")
    assert config.seed == (2**80 + 7) % 2**32
    assert config.round_deadline_s == CONFIG_BOUNDS["round_deadline_s"].high
    assert config.batch_size == int(CONFIG_BOUNDS["batch_size"].high)
    assert isinstance(config.batch_size, int)
    assert config.public_epochs == 1000
    assert config.min_updates == 3  # a quorum no round of 3 could reach becomes the round size


def test_a_config_inside_the_bounds_is_left_as_it_was(database_at_0005: str) -> None:
    migrate(database_at_0005, "0006")

    config = _load(database_at_0005, "f-sound")
    assert (config.seed, config.round_deadline_s, config.min_updates) == (42, 900.0, 2)


def test_the_downgrade_keeps_the_bounded_values(database_at_0005: str) -> None:
    migrate(database_at_0005, "0006")
    downgrade(database_at_0005, "0005")

    assert current_revision(database_at_0005) == "0005"
    assert _load(database_at_0005, "f-broken").seed == (2**80 + 7) % 2**32
