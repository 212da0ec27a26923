"""SqlStore devices on SQLite and PostgreSQL: enrolment records, name clashes and last-seen times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from server.domain.errors import ConflictError, NotFoundError
from server.domain.models import Device
from server.persistence.sql_store import SqlStore

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def test_a_device_reads_back_equal_including_its_modalities(store: SqlStore, seed) -> None:
    federation = seed.federation()
    device = Device(federation_id=federation.id, name="pi-1", modalities=frozenset({"image"}),
                    secret_hash="f" * 64, enrolled_at=T0)
    store.add_device(device)

    assert store.get_device(device.id) == device
    assert store.find_device_by_name(federation.id, "pi-1") == device
    assert store.find_device_by_name(federation.id, "pi-2") is None


def test_two_devices_with_one_name_in_one_federation_conflict(store: SqlStore, seed) -> None:
    federation = seed.federation()
    seed.device(federation, "pi")
    with pytest.raises(ConflictError, match="'pi'"):
        seed.device(federation, "pi")


def test_the_same_device_name_may_be_used_in_another_federation(store: SqlStore, seed) -> None:
    seed.device(seed.federation("a"), "pi")
    other = seed.federation("b")
    seed.device(other, "pi")
    assert [d.name for d in store.list_devices(other.id)] == ["pi"]


def test_a_device_of_an_unknown_federation_is_not_found(store: SqlStore) -> None:
    device = Device(federation_id="missing", name="pi", modalities=frozenset({"image"}), secret_hash="x")
    with pytest.raises(NotFoundError, match="federation missing"):
        store.add_device(device)


def test_getting_an_unknown_device_raises_not_found(store: SqlStore) -> None:
    with pytest.raises(NotFoundError, match="device nope not found"):
        store.get_device("nope")


def test_devices_are_listed_by_name_within_their_federation(store: SqlStore, seed) -> None:
    federation = seed.federation("a")
    for name in ("c", "a", "b"):
        seed.device(federation, name)
    seed.device(seed.federation("other"), "z")
    assert [d.name for d in store.list_devices(federation.id)] == ["a", "b", "c"]


def test_saving_a_device_persists_revocation_secret_and_modalities(store: SqlStore, seed) -> None:
    device = seed.device(seed.federation())
    device.revoked = True
    device.secret_hash = "1" * 64
    device.modalities = frozenset({"audio"})
    store.save_device(device)
    assert store.get_device(device.id) == device


def test_touching_devices_records_last_seen_and_ignores_unknown_ids(store: SqlStore, seed) -> None:
    federation = seed.federation()
    first, second, untouched = (seed.device(federation, name) for name in ("a", "b", "c"))
    store.touch_devices({first.id: T0, second.id: T0 + timedelta(seconds=5), "unknown": T0})

    assert store.get_device(first.id).last_seen_at == T0
    assert store.get_device(second.id).last_seen_at == T0 + timedelta(seconds=5)
    assert store.get_device(untouched.id).last_seen_at is None


def test_touching_a_device_never_moves_its_last_seen_time_back(store: SqlStore, seed) -> None:
    device = seed.device(seed.federation())
    store.touch_devices({device.id: T0 + timedelta(minutes=1)})
    store.touch_devices({device.id: T0})
    assert store.get_device(device.id).last_seen_at == T0 + timedelta(minutes=1)


def test_touching_no_devices_does_nothing(store: SqlStore, seed) -> None:
    device = seed.device(seed.federation())
    store.touch_devices({device.id: T0})
    store.touch_devices({})
    assert store.get_device(device.id).last_seen_at == T0


def test_devices_are_read_by_ids_in_batches_and_unknown_ids_are_left_out(store: SqlStore, seed) -> None:
    federation = seed.federation()
    devices = [seed.device(federation, f"pi-{i}") for i in range(3)]
    wanted = [devices[2].id, "no-such-device", devices[0].id, devices[0].id]
    assert sorted(store.get_devices(wanted), key=lambda d: d.name) == [devices[0], devices[2]]
    assert store.get_devices([]) == []
    # More ids than one IN list holds: the store splits them.
    many = [f"missing-{i}" for i in range(1200)] + [devices[1].id]
    assert store.get_devices(many) == [devices[1]]
