"""SqlStore federations on SQLite and PostgreSQL: round-trips, lookups, ordering and conflicts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from server.domain.errors import ConflictError, NotFoundError
from server.domain.federation_config import FederationConfig
from server.domain.models import Federation, FederationState
from server.persistence.sql_store import SqlStore

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def test_a_federation_reads_back_equal_to_what_was_added(store: SqlStore) -> None:
    config = FederationConfig(aggregation="fedavg", clients_per_round=3, upload_codec="int8",
                              model={"layers": [1, 2], "name": "tiny"})
    federation = Federation(name="alpha", config=config, created_at=T0)
    store.add_federation(federation)

    assert store.get_federation(federation.id) == federation
    assert store.find_federation_by_name("alpha") == federation


def test_finding_an_unknown_federation_name_returns_none(store: SqlStore) -> None:
    assert store.find_federation_by_name("nobody") is None


def test_getting_an_unknown_federation_raises_not_found_naming_it(store: SqlStore) -> None:
    with pytest.raises(NotFoundError, match="federation nope not found"):
        store.get_federation("nope")


def test_a_second_federation_with_the_same_name_is_a_conflict(store: SqlStore, seed) -> None:
    seed.federation("alpha")
    with pytest.raises(ConflictError, match="'alpha'"):
        seed.federation("alpha")
    assert [f.name for f in store.list_federations()] == ["alpha"]


def test_federations_are_listed_oldest_first(store: SqlStore, seed) -> None:
    seed.federation("later", created_at=T0 + timedelta(hours=1))
    seed.federation("earlier", created_at=T0)
    assert [f.name for f in store.list_federations()] == ["earlier", "later"]


def test_saving_a_federation_persists_its_state_and_current_version(store: SqlStore, seed) -> None:
    federation = seed.federation()
    version = seed.version(federation)
    federation.current_version_id = version.id
    federation.state = FederationState.STOPPED
    store.save_federation(federation)

    stored = store.get_federation(federation.id)
    assert stored.state is FederationState.STOPPED
    assert stored.current_version_id == version.id


def test_saving_a_federation_that_was_never_added_raises_not_found(store: SqlStore) -> None:
    with pytest.raises(NotFoundError):
        store.save_federation(Federation(name="ghost", config=FederationConfig()))


def test_renaming_a_federation_onto_another_name_is_a_conflict(store: SqlStore, seed) -> None:
    seed.federation("alpha")
    beta = seed.federation("beta")
    beta.name = "alpha"
    with pytest.raises(ConflictError):
        store.save_federation(beta)


def test_setting_the_state_leaves_a_current_version_written_meanwhile(store: SqlStore, seed) -> None:
    federation = seed.federation()  # a caller holding this copy is about to pause it
    version = seed.version(federation)
    store.set_current_version(federation.id, version.id)  # a round commits in between

    paused = store.set_federation_state(federation.id, FederationState.PAUSED)

    assert paused.state is FederationState.PAUSED
    assert store.get_federation(federation.id).current_version_id == version.id


@pytest.mark.parametrize("final", [FederationState.STOPPED, FederationState.COMPLETED])
def test_a_stopped_or_completed_federation_stays_so(store: SqlStore, seed, final: FederationState) -> None:
    federation = seed.federation()
    store.set_federation_state(federation.id, final)
    for state in (FederationState.PAUSED, FederationState.ACTIVE, FederationState.STOPPED,
                  FederationState.COMPLETED):
        with pytest.raises(ConflictError, match=f"{final.value} for good"):
            store.set_federation_state(federation.id, state)
    assert store.get_federation(federation.id).state is final


def test_state_and_version_writes_name_what_is_missing(store: SqlStore, seed) -> None:
    with pytest.raises(NotFoundError):
        store.set_federation_state("no-such-federation", FederationState.PAUSED)
    with pytest.raises(NotFoundError):
        store.set_current_version("no-such-federation", "no-such-version")
    federation = seed.federation()
    with pytest.raises(NotFoundError):
        store.set_current_version(federation.id, "no-such-version")


def test_promoting_a_version_keeps_the_state(store: SqlStore, seed) -> None:
    federation = seed.federation()
    version = seed.version(federation)
    store.set_federation_state(federation.id, FederationState.PAUSED)
    promoted = store.set_current_version(federation.id, version.id)
    assert (promoted.state, promoted.current_version_id) == (FederationState.PAUSED, version.id)
