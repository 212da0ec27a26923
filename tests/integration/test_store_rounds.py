"""SqlStore rounds on SQLite and PostgreSQL: round-trips, ordering, unfinished rounds, lifecycle guard."""

from __future__ import annotations

import math
import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest

from server.domain.errors import ConflictError, InvalidTransitionError, NotFoundError
from server.domain.models import Round
from server.domain.rounds import RoundState
from server.persistence.sql_store import SqlStore

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _open(store: SqlStore, round_: Round) -> Round:
    round_.state = RoundState.OPEN
    round_.opened_at = T0
    round_.deadline_at = T0 + timedelta(minutes=10)
    store.save_round(round_)
    return round_


def test_a_round_reads_back_equal_with_every_field_set(store: SqlStore, seed) -> None:
    federation = seed.federation()
    base, made = seed.version(federation, 0), seed.version(federation, 1)
    round_ = Round(federation_id=federation.id, number=1, state=RoundState.COMMITTED, participants=["b", "a"],
                   created_at=T0, opened_at=T0, deadline_at=T0 + timedelta(minutes=5),
                   closed_at=T0 + timedelta(minutes=4), failure_reason=None, base_version_id=base.id,
                   version_id=made.id, metrics={"participants": 2.0, "global_accuracy": 0.75})
    store.add_round(round_)
    assert store.get_round(round_.id) == round_


def test_timestamps_come_back_in_utc_whatever_zone_they_were_written_in(store: SqlStore, seed) -> None:
    tokyo = timezone(timedelta(hours=9))
    round_ = seed.round(seed.federation(), created_at=datetime(2025, 1, 1, 9, 0, 0, 123456, tzinfo=tokyo))

    stored = store.get_round(round_.id)
    assert stored.created_at == datetime(2025, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    assert stored.created_at.tzinfo == UTC


def test_non_finite_metrics_survive_a_round_trip(store: SqlStore, seed) -> None:
    round_ = seed.round(seed.federation(), metrics={"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "x": 1.5})
    metrics = store.get_round(round_.id).metrics
    assert math.isnan(metrics["nan"])
    assert (metrics["inf"], metrics["ninf"], metrics["x"]) == (math.inf, -math.inf, 1.5)


def test_two_rounds_with_one_number_in_one_federation_conflict(store: SqlStore, seed) -> None:
    federation = seed.federation()
    seed.round(federation, 1)
    with pytest.raises(ConflictError, match="round 1"):
        seed.round(federation, 1)


def test_a_round_referring_to_an_unknown_version_is_not_found(store: SqlStore, seed) -> None:
    with pytest.raises(NotFoundError):
        seed.round(seed.federation(), base_version_id="no-such-version")


def test_getting_an_unknown_round_raises_not_found_naming_it(store: SqlStore) -> None:
    with pytest.raises(NotFoundError, match="round r-1 not found"):
        store.get_round("r-1")


def test_rounds_are_listed_by_number_and_the_latest_is_the_highest(store: SqlStore, seed) -> None:
    federation = seed.federation()
    for number in (2, 10, 1):
        seed.round(federation, number)
    seed.round(seed.federation("other"), 99)

    assert [r.number for r in store.list_rounds(federation.id)] == [1, 2, 10]
    latest = store.latest_round(federation.id)
    assert latest is not None and latest.number == 10


def test_a_federation_without_rounds_has_no_latest_round(store: SqlStore, seed) -> None:
    assert store.latest_round(seed.federation().id) is None


def test_unfinished_rounds_are_those_neither_committed_nor_failed(store: SqlStore, seed) -> None:
    federation = seed.federation()
    for number, state in enumerate(RoundState, start=1):
        seed.round(federation, number, state=state)

    unfinished = {r.state for r in store.list_unfinished_rounds()}
    assert unfinished == {RoundState.CREATED, RoundState.OPEN, RoundState.COLLECTING, RoundState.AGGREGATING}


def test_saving_a_round_along_its_lifecycle_persists_each_step(store: SqlStore, seed) -> None:
    federation = seed.federation()
    version = seed.version(federation)
    round_ = _open(store, seed.round(federation, participants=["d1"]))
    for state in (RoundState.COLLECTING, RoundState.AGGREGATING, RoundState.COMMITTED):
        round_.state = state
        store.save_round(round_)
    round_.version_id = version.id
    round_.metrics = {"participants": 1.0}
    round_.closed_at = T0 + timedelta(minutes=3)
    round_.state = RoundState.COMMITTED

    with pytest.raises(InvalidTransitionError):  # committed already: the fields above may not change
        store.save_round(round_)
    assert store.get_round(round_.id).version_id is None


def test_a_round_may_be_saved_several_lifecycle_steps_ahead(store: SqlStore, seed) -> None:
    round_ = _open(store, seed.round(seed.federation()))
    round_.state = RoundState.AGGREGATING  # open -> collecting -> aggregating, saved once
    store.save_round(round_)
    assert store.get_round(round_.id).state is RoundState.AGGREGATING


def test_a_round_may_be_saved_again_in_the_same_unfinished_state(store: SqlStore, seed) -> None:
    round_ = _open(store, seed.round(seed.federation()))
    round_.participants = ["d1", "d2"]
    store.save_round(round_)
    assert store.get_round(round_.id).participants == ["d1", "d2"]


def test_saving_a_finished_round_again_unchanged_is_harmless(store: SqlStore, seed) -> None:
    round_ = _open(store, seed.round(seed.federation(), metrics={"x": math.nan}))
    round_.state, round_.failure_reason = RoundState.FAILED, "deadline passed"
    store.save_round(round_)
    store.save_round(round_)  # a retry after a lost reply
    assert store.get_round(round_.id).failure_reason == "deadline passed"


def test_a_stale_copy_cannot_overwrite_a_round_another_writer_failed(store: SqlStore, seed) -> None:
    round_ = _open(store, seed.round(seed.federation()))
    stale = store.get_round(round_.id)
    fresh = store.get_round(round_.id)
    fresh.state, fresh.failure_reason = RoundState.FAILED, "federation stopped"
    store.save_round(fresh)

    stale.state = RoundState.COLLECTING
    with pytest.raises(InvalidTransitionError, match="is failed in the database"):
        store.save_round(stale)
    assert store.get_round(round_.id).state is RoundState.FAILED


def test_a_stale_copy_cannot_move_a_round_back_in_its_lifecycle(store: SqlStore, seed) -> None:
    round_ = _open(store, seed.round(seed.federation()))
    stale = store.get_round(round_.id)
    round_.state = RoundState.COLLECTING
    store.save_round(round_)

    with pytest.raises(InvalidTransitionError):
        store.save_round(stale)  # still says OPEN
    assert store.get_round(round_.id).state is RoundState.COLLECTING


def test_saving_a_round_that_was_never_added_raises_not_found(store: SqlStore, seed) -> None:
    with pytest.raises(NotFoundError):
        store.save_round(Round(federation_id=seed.federation().id, number=1))


def test_of_two_concurrent_saves_finishing_a_round_differently_exactly_one_wins(store: SqlStore, seed) -> None:
    """Two writers read the same aggregating round at once; one commits it while the other fails it."""
    federation = seed.federation()
    for number in range(1, 6):  # a few repetitions give the interleavings a chance to vary
        round_ = seed.round(federation, number, state=RoundState.AGGREGATING)
        barrier = threading.Barrier(2)
        outcomes: dict[RoundState, str] = {}

        def writer(target: RoundState, round_id: str = round_.id, barrier: threading.Barrier = barrier,
                   outcomes: dict[RoundState, str] = outcomes) -> None:
            mine = store.get_round(round_id)
            mine.state = target
            barrier.wait()
            try:
                store.save_round(mine)
                outcomes[target] = "saved"
            except InvalidTransitionError:
                outcomes[target] = "refused"

        threads = [threading.Thread(target=writer, args=(state,))
                   for state in (RoundState.COMMITTED, RoundState.FAILED)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert sorted(outcomes.values()) == ["refused", "saved"]
        assert outcomes[store.get_round(round_.id).state] == "saved"
