"""SqlStore's record of versions' cloud work, on SQLite and PostgreSQL: what is owed, redelivery claimed by one
caller, attempts counted, the outcome written once, and the newest generated anchors."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from server.domain.models import BlobRef, CloudOutcome, CloudState, Round
from server.domain.rounds import RoundState
from server.persistence.sql_store import SqlStore

T0 = datetime(2025, 1, 1, tzinfo=UTC)
OLD = BlobRef("b" * 64, "b" * 64, 40)
NEW = BlobRef("c" * 64, "c" * 64, 41)


def _committed_round(store: SqlStore, seed, federation, version_id: str) -> Round:
    round_ = Round(federation_id=federation.id, number=1, state=RoundState.COMMITTED, version_id=version_id,
                   metrics={"participants": 2.0})
    store.add_round(round_)
    return round_


def test_a_version_round_trips_every_cloud_field(store: SqlStore, seed) -> None:
    federation = seed.federation()
    version = seed.version(federation, 1, cloud_state=CloudState.FAILED, cloud_attempts=3, cloud_enqueued_at=T0,
                           cloud_finished_at=T0 + timedelta(seconds=5), cloud_error="boom", fused_key="f" * 64,
                           generated_anchors=NEW)
    assert store.get_version(version.id) == version


def test_only_pending_versions_are_owed_oldest_first(store: SqlStore, seed) -> None:
    one, two = seed.federation("one"), seed.federation("two")
    seed.version(one, 0)
    later = seed.version(one, 2, cloud_state=CloudState.PENDING)
    earlier = seed.version(two, 1, cloud_state=CloudState.PENDING)
    seed.version(two, 3, cloud_state=CloudState.DONE)
    assert [v.id for v in store.owed_cloud_work()] == [earlier.id, later.id]
    assert [v.id for v in store.owed_cloud_work(one.id)] == [later.id]


def test_one_caller_claims_a_stale_redelivery(store: SqlStore, seed) -> None:
    version = seed.version(seed.federation(), 1, cloud_state=CloudState.PENDING, cloud_enqueued_at=T0)
    cutoff, now = T0 + timedelta(minutes=10), T0 + timedelta(minutes=20)
    assert not store.claim_redelivery(version.id, now, queued_before=T0 - timedelta(seconds=1))  # not stale yet
    assert store.claim_redelivery(version.id, now, queued_before=cutoff)
    assert not store.claim_redelivery(version.id, now, queued_before=cutoff)  # the second caller: already queued
    assert store.get_version(version.id).cloud_enqueued_at == now


def test_a_settled_version_is_never_redelivered_nor_counted(store: SqlStore, seed) -> None:
    version = seed.version(seed.federation(), 1, cloud_state=CloudState.DONE, cloud_enqueued_at=T0)
    assert not store.claim_redelivery(version.id, T0 + timedelta(hours=1), queued_before=T0 + timedelta(hours=1))
    assert store.start_cloud_attempt(version.id).cloud_attempts == 0


def test_attempts_count_up_while_pending(store: SqlStore, seed) -> None:
    version = seed.version(seed.federation(), 1, cloud_state=CloudState.PENDING)
    assert store.start_cloud_attempt(version.id).cloud_attempts == 1
    assert store.start_cloud_attempt(version.id).cloud_attempts == 2


def test_the_outcome_is_written_once_with_metrics_merged_into_version_and_round(store: SqlStore, seed) -> None:
    federation = seed.federation()
    version = seed.version(federation, 1, cloud_state=CloudState.PENDING, metrics={"kept": 1.0})
    round_ = _committed_round(store, seed, federation, version.id)
    done = CloudOutcome(CloudState.DONE, generated_anchors=NEW, anchors_if_unset=NEW,
                        version_metrics={"accuracy": 0.5, "odd": math.nan}, round_metrics={"global_accuracy": 0.5},
                        finished_at=T0)
    assert store.finish_cloud_work(version.id, done)
    assert not store.finish_cloud_work(version.id, CloudOutcome(CloudState.FAILED, error="late"))

    stored = store.get_version(version.id)
    assert (stored.cloud_state, stored.cloud_error, stored.cloud_finished_at) == (CloudState.DONE, None, T0)
    assert stored.generated_anchors == NEW
    assert (stored.anchors_key, stored.anchors_sha256, stored.anchors_size) == (NEW.key, NEW.sha256, NEW.size)
    assert stored.metrics["kept"] == 1.0 and stored.metrics["accuracy"] == 0.5 and math.isnan(stored.metrics["odd"])
    assert store.get_round(round_.id).metrics == {"participants": 2.0, "global_accuracy": 0.5}


def test_anchors_a_version_already_carries_are_kept(store: SqlStore, seed) -> None:
    version = seed.version(seed.federation(), 1, cloud_state=CloudState.PENDING, anchors_key=OLD.key,
                           anchors_sha256=OLD.sha256, anchors_size=OLD.size)
    store.finish_cloud_work(version.id, CloudOutcome(CloudState.DONE, generated_anchors=NEW, anchors_if_unset=NEW))
    stored = store.get_version(version.id)
    assert stored.anchors_key == OLD.key and stored.generated_anchors == NEW


def test_a_failed_version_waiting_for_anchors_gets_the_fallback(store: SqlStore, seed) -> None:
    version = seed.version(seed.federation(), 1, cloud_state=CloudState.PENDING)
    store.finish_cloud_work(version.id, CloudOutcome(CloudState.FAILED, anchors_if_unset=OLD, error="x" * 900))
    stored = store.get_version(version.id)
    assert stored.cloud_state is CloudState.FAILED and stored.generated_anchors is None
    assert stored.anchors_key == OLD.key and stored.cloud_error == "x" * 500


def test_the_newest_generated_anchors_are_those_of_the_latest_version_that_has_any(store: SqlStore, seed) -> None:
    federation, other = seed.federation("one"), seed.federation("two")
    assert store.newest_generated_anchors(federation.id) is None
    seed.version(federation, 0, generated_anchors=OLD)
    seed.version(federation, 1, generated_anchors=NEW)
    seed.version(federation, 2, cloud_state=CloudState.PENDING)
    seed.version(other, 5, generated_anchors=OLD)
    assert store.newest_generated_anchors(federation.id) == NEW


def test_a_running_job_reported_by_its_worker_is_not_redelivered(store: SqlStore, seed) -> None:
    version = seed.version(seed.federation(), 1, cloud_state=CloudState.PENDING, cloud_enqueued_at=T0)
    started = store.start_cloud_attempt(version.id)
    assert started.cloud_enqueued_at is not None and started.cloud_enqueued_at > T0  # starting counts as heard of
    later = datetime.now(UTC) + timedelta(minutes=5)
    store.touch_cloud_work(version.id, later)
    assert not store.claim_redelivery(version.id, later, queued_before=later - timedelta(seconds=1))
    assert store.claim_redelivery(version.id, later + timedelta(minutes=1), queued_before=later)
