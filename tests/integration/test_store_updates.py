"""SqlStore updates, model versions and device reports on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from server.domain.errors import ConflictError, NotFoundError
from server.domain.models import DeviceReport, ModelVersion, Update, UpdateState
from server.persistence.sql_store import SqlStore

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _update(round_id: str, device_id: str, upload_id: str = "upload-0001", **fields) -> Update:
    return Update(round_id=round_id, device_id=device_id, upload_id=upload_id, codec="fp16", declared_size=1000,
                  sha256="c" * 64, modalities=frozenset({"image", "audio"}), public_samples=64,
                  private_samples=32, **fields)


@pytest.fixture
def round_and_device(seed):
    federation = seed.federation()
    return seed.round(federation), seed.device(federation)


def test_an_update_reads_back_equal_by_id_triple_and_in_its_round(store: SqlStore, round_and_device) -> None:
    round_, device = round_and_device
    update = _update(round_.id, device.id, created_at=T0, metrics={"personal_accuracy": 0.5})
    store.add_update(update)

    assert store.find_update(round_.id, device.id, "upload-0001") == update
    assert store.find_update(round_.id, device.id, "upload-0002") is None
    assert store.list_updates(round_.id) == [update]


def test_saving_an_accepted_update_persists_progress_and_blob(store: SqlStore, round_and_device) -> None:
    round_, device = round_and_device
    update = _update(round_.id, device.id)
    store.add_update(update)
    update.state, update.received_bytes = UpdateState.ACCEPTED, 1000
    update.blob_key, update.accepted_at = "d" * 64, T0
    store.save_update(update)
    assert store.find_update(round_.id, device.id, update.upload_id) == update


def test_saving_a_rejected_update_keeps_its_reason(store: SqlStore, round_and_device) -> None:
    round_, device = round_and_device
    update = _update(round_.id, device.id)
    store.add_update(update)
    update.state, update.rejection_reason = UpdateState.REJECTED, "checksum"
    store.save_update(update)
    stored = store.list_updates(round_.id)[0]
    assert (stored.state, stored.rejection_reason) == (UpdateState.REJECTED, "checksum")


def test_reusing_an_upload_id_for_the_same_device_and_round_conflicts(store: SqlStore, round_and_device) -> None:
    round_, device = round_and_device
    store.add_update(_update(round_.id, device.id))
    with pytest.raises(ConflictError, match="'upload-0001'"):
        store.add_update(_update(round_.id, device.id))


def test_an_update_for_an_unknown_round_is_not_found(store: SqlStore, round_and_device) -> None:
    _, device = round_and_device
    with pytest.raises(NotFoundError, match="round nope"):
        store.add_update(_update("nope", device.id))


def test_saving_an_update_that_was_never_added_raises_not_found(store: SqlStore, round_and_device) -> None:
    round_, device = round_and_device
    with pytest.raises(NotFoundError, match="update"):
        store.save_update(_update(round_.id, device.id))


def test_updates_are_listed_in_arrival_order(store: SqlStore, seed, round_and_device) -> None:
    round_, device = round_and_device
    for minute, upload in ((2, "upload-late"), (0, "upload-early"), (1, "upload-middle")):
        store.add_update(_update(round_.id, device.id, upload, created_at=T0 + timedelta(minutes=minute)))
    assert [u.upload_id for u in store.list_updates(round_.id)] == ["upload-early", "upload-middle", "upload-late"]


def test_a_model_version_reads_back_equal_with_and_without_anchors(store: SqlStore, seed) -> None:
    federation = seed.federation()
    plain = ModelVersion(federation_id=federation.id, round_number=0, codec="fp32", adapter_key="a" * 64,
                         adapter_sha256="a" * 64, adapter_size=123, created_at=T0, metrics={"accuracy": 0.1})
    anchored = ModelVersion(federation_id=federation.id, round_number=1, codec="fp32", adapter_key="b" * 64,
                            adapter_sha256="b" * 64, adapter_size=456, anchors_key="e" * 64,
                            anchors_sha256="e" * 64, anchors_size=78, created_at=T0 + timedelta(seconds=1))
    store.add_version(plain)
    store.add_version(anchored)
    assert store.get_version(plain.id) == plain
    assert store.get_version(anchored.id) == anchored


def test_versions_are_listed_oldest_first(store: SqlStore, seed) -> None:
    federation = seed.federation()
    for number in (2, 0, 1):
        seed.version(federation, number)
    seed.version(seed.federation("other"), 5)
    assert [v.round_number for v in store.list_versions(federation.id)] == [0, 1, 2]


def test_getting_an_unknown_version_raises_not_found(store: SqlStore) -> None:
    with pytest.raises(NotFoundError, match="model version v9 not found"):
        store.get_version("v9")


def test_adding_a_version_twice_conflicts(store: SqlStore, seed) -> None:
    version = seed.version(seed.federation())
    with pytest.raises(ConflictError, match=version.id):
        store.add_version(version)


def test_device_reports_are_kept_per_round_in_reporting_order(store: SqlStore, seed, round_and_device) -> None:
    round_, device = round_and_device
    other_round = seed.round(seed.federation("other"), 1)
    store.add_device_report(DeviceReport(round_.id, device.id, {"acc": 0.9}, reported_at=T0 + timedelta(seconds=1)))
    store.add_device_report(DeviceReport(round_.id, device.id, {"acc": 0.8}, reported_at=T0))
    store.add_device_report(DeviceReport(other_round.id, device.id, {"acc": 0.1}, reported_at=T0))

    reports = store.list_device_reports(round_.id)
    assert [r.metrics["acc"] for r in reports] == [0.8, 0.9]
    assert reports[0] == DeviceReport(round_.id, device.id, {"acc": 0.8}, reported_at=T0)


def test_a_report_for_an_unknown_device_is_not_found(store: SqlStore, round_and_device) -> None:
    round_, _ = round_and_device
    with pytest.raises(NotFoundError):
        store.add_device_report(DeviceReport(round_.id, "nobody", {"acc": 1.0}))


def test_the_task_view_reads_the_federation_its_latest_round_and_the_devices_acceptance(store: SqlStore,
                                                                                         seed) -> None:
    federation = seed.federation()
    device, other = seed.device(federation), seed.device(federation, name="other")
    empty = store.task_view(federation.id, device.id)
    assert (empty.federation, empty.latest_round, empty.accepted) == (federation, None, False)

    earlier = seed.round(federation, number=1)
    latest = seed.round(federation, number=2)
    in_earlier = _update(earlier.id, device.id, upload_id="upload-0003", state=UpdateState.ACCEPTED)
    store.add_update(in_earlier)  # accepted in an earlier round: says nothing about the latest one
    pending, accepted = _update(latest.id, device.id), _update(latest.id, other.id, upload_id="upload-0002")
    store.add_update(pending)
    store.add_update(accepted)
    accepted.state, accepted.received_bytes, accepted.blob_key = UpdateState.ACCEPTED, 1000, "d" * 64
    store.save_update(accepted)

    view = store.task_view(federation.id, device.id)
    assert view.latest_round == latest and view.accepted is False  # a partial upload is not an acceptance
    assert store.task_view(federation.id, other.id).accepted is True
    with pytest.raises(NotFoundError, match="federation"):
        store.task_view("no-such-federation", device.id)
