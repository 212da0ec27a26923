"""SqlStore leases with fencing tokens and atomic update acceptance, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from server.domain.errors import AlreadyAcceptedError, ConflictError, LateUpdateError, LeaseLostError
from server.domain.models import Fence, ModelVersion, Round, Update, UpdateState
from server.domain.rounds import RoundState
from server.persistence.sql_store import SqlStore

T0 = datetime(2025, 1, 1, tzinfo=UTC)
LEASE = "scheduler"


def _update(round_id: str, device_id: str, upload_id: str = "upload-0001", **fields) -> Update:
    return Update(round_id=round_id, device_id=device_id, upload_id=upload_id, codec="fp16", declared_size=1000,
                  sha256="c" * 64, modalities=frozenset({"image", "audio"}), public_samples=64,
                  private_samples=32, created_at=T0, **fields)


def _arrived(store: SqlStore, round_id: str, device_id: str, upload_id: str = "upload-0001") -> Update:
    """An update whose bytes all arrived and passed validation: stored partial, ready for accept_update."""
    update = _update(round_id, device_id, upload_id)
    store.add_update(update)
    update.state = UpdateState.ACCEPTED
    update.received_bytes = update.declared_size
    update.blob_key = "b" * 64
    update.accepted_at = T0 + timedelta(minutes=1)
    return update


def _new_version(round_: Round) -> ModelVersion:
    return ModelVersion(federation_id=round_.federation_id, round_number=round_.number, codec="fp32",
                        adapter_key="n" * 64, adapter_sha256="n" * 64, adapter_size=20,
                        created_at=T0 + timedelta(hours=1))


def _committed(round_: Round, version: ModelVersion) -> Round:
    round_.state = RoundState.COMMITTED
    round_.version_id = version.id
    round_.closed_at = T0 + timedelta(hours=1)
    return round_


def _taken_over(store: SqlStore) -> tuple[Fence, Fence]:
    """(stale fence of replica a, current fence of replica b, which took the expired lease over)."""
    now = datetime.now(UTC)
    stale = store.acquire_lease(LEASE, "replica-a", 30, now=now)
    current = store.acquire_lease(LEASE, "replica-b", 30, now=now + timedelta(seconds=31))
    assert stale is not None and current is not None
    return stale, current


# ---------------------------------------------------------------------------------------------------
# Leases


def test_the_first_holder_of_a_lease_gets_token_one(store: SqlStore) -> None:
    assert store.acquire_lease(LEASE, "replica-a", 30) == Fence(LEASE, "replica-a", 1)


def test_the_holder_renewing_its_lease_keeps_its_token(store: SqlStore) -> None:
    now = datetime.now(UTC)
    store.acquire_lease(LEASE, "replica-a", 30, now=now)
    assert store.acquire_lease(LEASE, "replica-a", 30, now=now + timedelta(seconds=20)) == Fence(LEASE, "replica-a", 1)
    # Renewal also extends the lease: 45 s after the first claim it would have expired without it.
    assert store.acquire_lease(LEASE, "replica-b", 30, now=now + timedelta(seconds=45)) is None


def test_a_restarted_holder_reclaims_its_unexpired_lease_at_once_with_the_next_token(store: SqlStore,
                                                                                     seed) -> None:
    now = datetime.now(UTC)
    before = store.acquire_lease(LEASE, "replica-a", 30, now=now)
    again = store.acquire_lease(LEASE, "replica-a", 30, now=now + timedelta(seconds=1), reclaim=True)
    assert before == Fence(LEASE, "replica-a", 1) and again == Fence(LEASE, "replica-a", 2)
    assert before is not None
    round_ = seed.round(seed.federation(), state=RoundState.OPEN)
    round_.state = RoundState.COLLECTING
    with pytest.raises(LeaseLostError, match="token 1"):  # what its earlier life still runs is fenced out
        store.save_round(round_, before)
    # Reclaiming is for one's own lease: another holder still waits for it to expire.
    assert store.acquire_lease(LEASE, "replica-b", 30, now=now + timedelta(seconds=2), reclaim=True) is None


def test_a_renewal_after_expiry_by_the_same_holder_keeps_its_token(store: SqlStore) -> None:
    now = datetime.now(UTC)
    store.acquire_lease(LEASE, "replica-a", 30, now=now)
    assert store.acquire_lease(LEASE, "replica-a", 30, now=now + timedelta(minutes=5)) == Fence(LEASE, "replica-a", 1)


def test_another_holder_is_refused_while_the_lease_is_unexpired_and_takes_it_over_after(store: SqlStore) -> None:
    now = datetime.now(UTC)
    store.acquire_lease(LEASE, "replica-a", 30, now=now)
    assert store.acquire_lease(LEASE, "replica-b", 30, now=now + timedelta(seconds=29)) is None
    assert store.acquire_lease(LEASE, "replica-b", 30, now=now + timedelta(seconds=31)) == Fence(LEASE, "replica-b", 2)
    # ... and now the first holder is the one refused.
    assert store.acquire_lease(LEASE, "replica-a", 30, now=now + timedelta(seconds=40)) is None


def test_releasing_a_lease_lets_another_holder_take_it_over_at_once_with_the_next_token(store: SqlStore) -> None:
    fence = store.acquire_lease(LEASE, "replica-a", 300)
    assert fence is not None
    assert store.acquire_lease(LEASE, "replica-b", 300) is None
    store.release_lease(fence)
    assert store.acquire_lease(LEASE, "replica-b", 300) == Fence(LEASE, "replica-b", 2)


def test_releasing_a_stale_fence_leaves_the_new_holders_lease_alone(store: SqlStore) -> None:
    stale, current = _taken_over(store)
    store.release_lease(stale)
    assert store.acquire_lease(LEASE, "replica-c", 30) is None
    assert store.acquire_lease(LEASE, "replica-b", 30) == current


def test_leases_with_different_names_are_independent(store: SqlStore) -> None:
    assert store.acquire_lease("federation-1", "replica-a", 30) == Fence("federation-1", "replica-a", 1)
    assert store.acquire_lease("federation-2", "replica-b", 30) == Fence("federation-2", "replica-b", 1)


# ---------------------------------------------------------------------------------------------------
# Fenced writes


def test_committing_with_a_stale_fence_writes_nothing(store: SqlStore, seed) -> None:
    federation = seed.federation()
    base = seed.version(federation)
    federation.current_version_id = base.id
    store.save_federation(federation)
    round_ = seed.round(federation, state=RoundState.AGGREGATING, base_version_id=base.id)
    stale, _ = _taken_over(store)
    version = _new_version(round_)

    with pytest.raises(LeaseLostError, match="replica-b"):
        store.commit_round(_committed(store.get_round(round_.id), version), version, fence=stale)

    assert [v.id for v in store.list_versions(federation.id)] == [base.id]
    assert store.get_federation(federation.id).current_version_id == base.id
    stored = store.get_round(round_.id)
    assert (stored.state, stored.version_id) == (RoundState.AGGREGATING, None)


def test_committing_with_the_current_fence_writes_version_federation_and_round(store: SqlStore, seed) -> None:
    federation = seed.federation()
    base = seed.version(federation)
    round_ = seed.round(federation, state=RoundState.AGGREGATING, base_version_id=base.id)
    _, current = _taken_over(store)
    version = _new_version(round_)

    store.commit_round(_committed(store.get_round(round_.id), version), version, fence=current)

    assert [v.id for v in store.list_versions(federation.id)] == [base.id, version.id]
    assert store.get_version(version.id) == version
    assert store.get_federation(federation.id).current_version_id == version.id
    stored = store.get_round(round_.id)
    assert (stored.state, stored.version_id) == (RoundState.COMMITTED, version.id)


def test_saving_a_round_with_a_stale_fence_is_refused_and_changes_nothing(store: SqlStore, seed) -> None:
    round_ = seed.round(seed.federation(), state=RoundState.COLLECTING)
    stale, current = _taken_over(store)
    failing = store.get_round(round_.id)
    failing.state, failing.failure_reason = RoundState.FAILED, "deadline passed"

    with pytest.raises(LeaseLostError, match="token 1"):
        store.save_round(failing, fence=stale)
    assert store.get_round(round_.id).state is RoundState.COLLECTING

    store.save_round(failing, fence=current)
    assert store.get_round(round_.id).state is RoundState.FAILED


def test_a_fence_for_a_lease_nobody_ever_held_is_refused(store: SqlStore, seed) -> None:
    round_ = seed.round(seed.federation(), state=RoundState.OPEN)
    with pytest.raises(LeaseLostError, match="nobody"):
        store.save_round(round_, fence=Fence("never-claimed", "replica-a", 1))


# ---------------------------------------------------------------------------------------------------
# Accepting updates


def test_accepting_an_update_in_an_open_round_stores_it_and_moves_the_round_to_collecting(
        store: SqlStore, seed) -> None:
    federation = seed.federation()
    round_ = seed.round(federation, state=RoundState.OPEN, base_version_id=seed.version(federation).id)
    update = _arrived(store, round_.id, seed.device(federation).id)

    returned = store.accept_update(update)

    assert (returned.round.id, returned.round.state, returned.accepted) == (round_.id, RoundState.COLLECTING, 1)
    assert store.get_round(round_.id).state is RoundState.COLLECTING
    assert store.list_updates(round_.id) == [update]


def test_accepting_an_update_in_a_collecting_round_keeps_it_collecting(store: SqlStore, seed) -> None:
    federation = seed.federation()
    round_ = seed.round(federation, state=RoundState.COLLECTING)
    first = _arrived(store, round_.id, seed.device(federation, "d1").id)
    second = _arrived(store, round_.id, seed.device(federation, "d2").id)

    assert store.accept_update(first).accepted == 1
    acceptance = store.accept_update(second)
    assert (acceptance.round.state, acceptance.accepted) == (RoundState.COLLECTING, 2)
    assert [u.state for u in store.list_updates(round_.id)] == [UpdateState.ACCEPTED, UpdateState.ACCEPTED]


def test_accepting_the_same_update_again_is_harmless(store: SqlStore, seed) -> None:
    federation = seed.federation()
    round_ = seed.round(federation, state=RoundState.OPEN)
    update = _arrived(store, round_.id, seed.device(federation).id)
    store.accept_update(update)
    again = store.accept_update(update)
    assert (again.round.state, again.accepted) == (RoundState.COLLECTING, 1)  # counted once
    assert store.list_updates(round_.id) == [update]


@pytest.mark.parametrize("state", [RoundState.AGGREGATING, RoundState.COMMITTED, RoundState.FAILED])
def test_an_update_for_a_closed_round_is_late_and_stays_partial(store: SqlStore, seed, state: RoundState) -> None:
    federation = seed.federation()
    round_ = seed.round(federation, state=state)
    update = _arrived(store, round_.id, seed.device(federation).id)

    with pytest.raises(LateUpdateError, match=f"round 1 is {state.value}"):
        store.accept_update(update)

    [stored] = store.list_updates(round_.id)
    assert (stored.state, stored.blob_key, stored.accepted_at) == (UpdateState.PARTIAL, None, None)
    assert store.get_round(round_.id).state is state


def test_a_second_accepted_update_from_one_device_in_one_round_conflicts(store: SqlStore, seed) -> None:
    federation = seed.federation()
    round_ = seed.round(federation, state=RoundState.OPEN)
    device = seed.device(federation)
    first = _arrived(store, round_.id, device.id, "upload-1")
    second = _arrived(store, round_.id, device.id, "upload-2")
    store.accept_update(first)

    with pytest.raises(ConflictError, match="already accepted"):
        store.accept_update(second)

    states = {u.upload_id: u.state for u in store.list_updates(round_.id)}
    assert states == {"upload-1": UpdateState.ACCEPTED, "upload-2": UpdateState.PARTIAL}


def test_an_update_is_found_by_device_and_upload_id_whatever_its_round(store: SqlStore, seed) -> None:
    federation = seed.federation()
    device, other = seed.device(federation, "d1"), seed.device(federation, "d2")
    seed.round(federation, 1)
    later = seed.round(federation, 2)
    update = _update(later.id, device.id, "upload-7")
    store.add_update(update)

    assert store.find_update_by_upload(device.id, "upload-7") == update
    assert store.find_update_by_upload(device.id, "upload-8") is None
    assert store.find_update_by_upload(other.id, "upload-7") is None


def test_the_upload_view_reads_the_upload_and_the_named_round_together(store: SqlStore, seed) -> None:
    federation = seed.federation()
    device = seed.device(federation)
    first, second = seed.round(federation, 1), seed.round(federation, 2)
    update = _update(first.id, device.id, "upload-7")
    store.add_update(update)

    view = store.upload_view(device.id, "upload-7", second.id)  # a retry names a later round: still found
    assert view.existing == update and view.round == store.get_round(second.id)
    view = store.upload_view(device.id, "upload-8", "no-such-round")
    assert view.existing is None and view.round is None


def test_no_new_update_is_added_for_a_device_whose_update_the_round_accepted(store: SqlStore, seed) -> None:
    federation = seed.federation()
    round_, later = seed.round(federation, 1, state=RoundState.OPEN), seed.round(federation, 2)
    device, other = seed.device(federation, "d1"), seed.device(federation, "d2")
    store.accept_update(_arrived(store, round_.id, device.id, "upload-1"))

    with pytest.raises(AlreadyAcceptedError, match="already accepted"):
        store.add_update(_update(round_.id, device.id, "upload-2"))
    store.add_update(_update(later.id, device.id, "upload-3"))  # another round: fine
    store.add_update(_update(round_.id, other.id, "upload-4"))  # another device: fine
    assert {u.upload_id for u in store.list_updates(round_.id)} == {"upload-1", "upload-4"}


def test_one_upload_id_of_one_device_in_two_rounds_conflicts(store: SqlStore, seed) -> None:
    federation = seed.federation()
    device = seed.device(federation)
    first, second = seed.round(federation, 1), seed.round(federation, 2)
    store.add_update(_update(first.id, device.id, "upload-1"))

    with pytest.raises(ConflictError, match="upload 'upload-1'"):
        store.add_update(_update(second.id, device.id, "upload-1"))
    assert store.list_updates(second.id) == []


def test_two_devices_may_use_the_same_upload_id(store: SqlStore, seed) -> None:
    federation = seed.federation()
    round_ = seed.round(federation)
    for name in ("d1", "d2"):
        store.add_update(_update(round_.id, seed.device(federation, name).id, "upload-1"))
    assert len(store.list_updates(round_.id)) == 2


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_an_update_racing_the_move_to_aggregating_is_either_counted_or_refused_as_late(
        store: SqlStore, seed) -> None:
    """Row locking on PostgreSQL: an acknowledged update is always seen by the aggregator that closed the round."""
    federation = seed.federation()
    device = seed.device(federation)
    for number in range(1, 21):
        round_ = seed.round(federation, number, state=RoundState.COLLECTING)
        update = _arrived(store, round_.id, device.id, f"upload-{number}")
        closing = store.get_round(round_.id)
        closing.state = RoundState.AGGREGATING
        barrier = threading.Barrier(2)
        result: dict[str, object] = {}

        def accept(update: Update = update, barrier: threading.Barrier = barrier,
                   result: dict[str, object] = result) -> None:
            barrier.wait()
            try:
                store.accept_update(update)
                result["accept"] = "accepted"
            except LateUpdateError:
                result["accept"] = "late"
            except Exception as exc:  # any other outcome is a failure reported below
                result["accept"] = repr(exc)

        def close(closing: Round = closing, barrier: threading.Barrier = barrier,
                  result: dict[str, object] = result) -> None:
            barrier.wait()
            try:
                store.save_round(closing)
                # What the aggregator lists right after its transition is what it will average.
                result["seen"] = [u.id for u in store.list_updates(closing.id) if u.state is UpdateState.ACCEPTED]
            except Exception as exc:
                result["seen"] = repr(exc)

        threads = [threading.Thread(target=accept), threading.Thread(target=close)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in threads), f"round {number}: a thread hung"

        assert result["accept"] in ("accepted", "late"), f"round {number}: accept_update raised {result['accept']}"
        assert isinstance(result["seen"], list), f"round {number}: the move to aggregating raised {result['seen']}"
        stored = store.find_update_by_upload(device.id, f"upload-{number}")
        assert stored is not None
        assert store.get_round(round_.id).state is RoundState.AGGREGATING
        if result["accept"] == "late":
            assert stored.state is UpdateState.PARTIAL, f"round {number}: refused as late but stored accepted"
            assert result["seen"] == [], f"round {number}: refused as late but aggregated"
        else:
            assert stored.state is UpdateState.ACCEPTED, f"round {number}: acknowledged but not stored accepted"
            assert result["seen"] == [update.id], f"round {number}: acknowledged but left out of the aggregate"
