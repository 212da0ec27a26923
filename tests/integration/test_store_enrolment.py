"""SqlStore enrolment on SQLite and PostgreSQL: one-time tokens used up in the transaction that enrols the
device, racing uses of one token, and revocations that no concurrent save undoes."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from server.domain.errors import ConflictError, NotFoundError, PermissionDeniedError
from server.domain.models import Device, EnrolmentToken, utcnow
from server.persistence.sql_store import SqlStore

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _token(federation_id: str, digest: str = "a" * 64, **fields) -> EnrolmentToken:
    fields.setdefault("expires_at", utcnow() + timedelta(hours=1))
    return EnrolmentToken(federation_id=federation_id, token_hash=digest, created_by="tests", **fields)


def _device(federation_id: str, name: str = "cam") -> Device:
    return Device(federation_id=federation_id, name=name, modalities=frozenset({"image"}), secret_hash="s" * 64)


def test_a_token_reads_back_equal_by_digest_and_in_its_federations_list(store: SqlStore, seed) -> None:
    federation, other = seed.federation("a"), seed.federation("b")
    token = _token(federation.id, device_name="cam-1", created_at=T0)
    store.add_enrolment_token(token)
    store.add_enrolment_token(_token(other.id, "b" * 64))

    assert store.find_enrolment_token_by_hash("a" * 64) == token
    assert store.find_enrolment_token_by_hash("c" * 64) is None
    assert store.list_enrolment_tokens(federation.id) == [token]


def test_a_token_of_an_unknown_federation_is_not_found_and_digests_are_unique(store: SqlStore, seed) -> None:
    with pytest.raises(NotFoundError, match="federation missing"):
        store.add_enrolment_token(_token("missing"))
    federation = seed.federation()
    store.add_enrolment_token(_token(federation.id))
    with pytest.raises(ConflictError, match="digest"):
        store.add_enrolment_token(_token(federation.id))


def test_enrolling_with_a_token_adds_the_device_and_uses_the_token_up(store: SqlStore, seed) -> None:
    federation = seed.federation()
    token = _token(federation.id)
    store.add_enrolment_token(token)
    device = _device(federation.id)

    assert store.enrol_device(device, new=True, token=token) is True
    assert store.get_device(device.id) == device
    stored = store.find_enrolment_token_by_hash(token.token_hash)
    assert stored is not None and stored.used_by_device_id == device.id and stored.used_at is not None
    assert (token.used_by_device_id, token.used_at) == (device.id, stored.used_at)

    # Used once: a second enrolment with it writes nothing.
    again = _device(federation.id, "cam-2")
    assert store.enrol_device(again, new=True, token=_token(federation.id, id=token.id)) is False
    assert store.find_device_by_name(federation.id, "cam-2") is None


def test_an_expired_token_enrols_nothing(store: SqlStore, seed) -> None:
    federation = seed.federation()
    token = _token(federation.id, expires_at=utcnow() - timedelta(seconds=1))
    store.add_enrolment_token(token)
    assert store.enrol_device(_device(federation.id), new=True, token=token) is False
    assert store.list_devices(federation.id) == []
    stored = store.find_enrolment_token_by_hash(token.token_hash)
    assert stored is not None and stored.used_at is None


def test_a_device_name_clash_leaves_the_token_unused(store: SqlStore, seed) -> None:
    federation = seed.federation()
    seed.device(federation, "cam")
    token = _token(federation.id)
    store.add_enrolment_token(token)
    with pytest.raises(ConflictError, match="'cam'"):
        store.enrol_device(_device(federation.id, "cam"), new=True, token=token)
    stored = store.find_enrolment_token_by_hash(token.token_hash)
    assert stored is not None and stored.used_at is None  # rolled back with the device


def test_of_two_enrolments_racing_with_one_token_exactly_one_wins(store: SqlStore, seed) -> None:
    federation = seed.federation()
    token = _token(federation.id)
    store.add_enrolment_token(token)
    barrier = threading.Barrier(4)
    results: list[bool] = []

    def enrol(name: str) -> None:
        barrier.wait()
        results.append(store.enrol_device(_device(federation.id, name), new=True,
                                          token=_token(federation.id, id=token.id)))

    threads = [threading.Thread(target=enrol, args=(f"cam-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(results) == [False, False, False, True]
    assert len(store.list_devices(federation.id)) == 1


def test_re_enrolling_replaces_the_secret_but_never_undoes_a_revocation(store: SqlStore, seed) -> None:
    federation = seed.federation()
    device = seed.device(federation, "cam")
    device.secret_hash = "1" * 64
    assert store.enrol_device(device, new=False) is True
    assert store.get_device(device.id).secret_hash == "1" * 64

    revoked = store.revoke_device(device.id)
    assert revoked.revoked and revoked.secret_hash == "1" * 64
    stale = store.get_device(device.id)
    stale.revoked = False  # a copy read before the revocation, as a racing re-enrolment holds it
    stale.secret_hash = "2" * 64
    token = _token(federation.id, device_name="cam")
    store.add_enrolment_token(token)
    with pytest.raises(PermissionDeniedError, match="revoked"):
        store.enrol_device(stale, new=False, token=token)
    assert store.get_device(device.id).revoked and store.get_device(device.id).secret_hash == "1" * 64
    stored = store.find_enrolment_token_by_hash(token.token_hash)
    assert stored is not None and stored.used_at is None


def test_revoking_an_unknown_device_is_not_found(store: SqlStore) -> None:
    with pytest.raises(NotFoundError, match="device nope"):
        store.revoke_device("nope")
