"""RefusalRecorder on a real store: every refusal counted, rows written off the caller's thread, floods
thinned, and a slow or dead database never delays or breaks the refusal itself."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from prometheus_client import REGISTRY
from sqlalchemy.engine import make_url

from server.domain.errors import (
    LateUpdateError,
    PermissionDeniedError,
    RateLimitedError,
    UnavailableError,
    UpdateRejectedError,
)
from server.persistence.database import migrate
from server.persistence.sql_store import SqlStore
from server.services.refusals import MAX_DETAIL_CHARS, RefusalRecorder, refusal_reason


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_refusal_is_counted_by_method_and_reason_and_recorded_with_its_ids(store: SqlStore) -> None:
    recorder = RefusalRecorder(store)
    before = _count("mlecs_refusals_total", method="UploadUpdate", reason="checksum")
    error = UpdateRejectedError("checksum", "sha256 of the received bytes differs from the header")
    assert recorder.refused("UploadUpdate", error, device_id="d1", federation_id="f1", round_id="r1") == "checksum"
    assert recorder.flush()
    [row] = store.list_refusals()
    assert (row.method, row.reason, row.device_id, row.federation_id, row.round_id) == (
        "UploadUpdate", "checksum", "d1", "f1", "r1")
    assert row.detail == str(error)
    assert _count("mlecs_refusals_total", method="UploadUpdate", reason="checksum") == before + 1
    recorder.close()


def test_reasons_are_bounded_codes_and_a_dependency_outage_is_no_refusal(store: SqlStore) -> None:
    assert refusal_reason(LateUpdateError("round 3 is committed")) == "late"
    assert refusal_reason(PermissionDeniedError("device is revoked")) == "permission_denied"
    assert refusal_reason(UpdateRejectedError("Not A Code! {x}", "forged")) == "other"  # never a free-form label
    recorder = RefusalRecorder(store)
    before = _count("mlecs_refusals_total", method="GetTask", reason="unavailable")
    assert recorder.refused("GetTask", UnavailableError("the database is down")) is None
    assert recorder.flush()
    assert store.list_refusals() == []
    assert _count("mlecs_refusals_total", method="GetTask", reason="unavailable") == before
    recorder.close()


def test_a_flood_of_rate_limited_refusals_is_counted_in_full_but_recorded_once_per_interval(store: SqlStore) -> None:
    clock = Clock()
    recorder = RefusalRecorder(store, record_interval_s=10.0, clock=clock)
    counted = _count("mlecs_refusals_total", method="Heartbeat", reason="rate_limited")
    thinned = _count("mlecs_refusals_unrecorded_total", cause="thinned")
    flood = RateLimitedError("device d1 exceeded its rate limit", retry_after_s=0.2)
    for _ in range(50):
        recorder.refused("Heartbeat", flood, caller="d1", device_id="d1")
    recorder.refused("Heartbeat", flood, caller="d2", device_id="d2")  # another device has its own allowance
    clock.now += 10.0
    recorder.refused("Heartbeat", flood, caller="d1", device_id="d1")
    assert recorder.flush()
    assert sorted(r.device_id or "" for r in store.list_refusals()) == ["d1", "d1", "d2"]
    assert _count("mlecs_refusals_total", method="Heartbeat", reason="rate_limited") == counted + 52
    assert _count("mlecs_refusals_unrecorded_total", cause="thinned") == thinned + 49
    recorder.close()


def test_what_a_device_sent_cannot_overflow_the_columns(store: SqlStore) -> None:
    recorder = RefusalRecorder(store)
    claimed = "r" * 500
    recorder.refused("UploadUpdate", UpdateRejectedError("schema", f"unexpected tensor {'x' * 5000!r}"),
                     device_id="d1", round_id=claimed)
    assert recorder.flush()
    [row] = store.list_refusals()
    assert row.round_id is None and len(row.detail) == MAX_DETAIL_CHARS
    recorder.close()


def test_an_unreachable_database_never_turns_a_refusal_into_an_error() -> None:
    dead = SqlStore.from_url("postgresql://postgres@127.0.0.1:1/nowhere")  # nothing listens on port 1
    recorder = RefusalRecorder(dead)
    failed = _count("mlecs_refusals_unrecorded_total", cause="store_error")
    assert recorder.refused("UploadUpdate", UpdateRejectedError("size", "too many bytes"), device_id="d") == "size"
    assert recorder.flush()
    assert _count("mlecs_refusals_unrecorded_total", cause="store_error") == failed + 1
    recorder.close()
    dead.close()


@pytest.mark.postgres
def test_a_blocked_database_never_blocks_the_caller_and_the_queue_stays_bounded(
        make_postgres_database) -> None:
    url = make_postgres_database()
    migrate(url)
    store = SqlStore.from_url(url)
    recorder = RefusalRecorder(store, queue_size=2)
    locker = psycopg.connect(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False))
    locker.execute("LOCK TABLE refusals IN ACCESS EXCLUSIVE MODE")  # every insert now waits for this transaction
    full = _count("mlecs_refusals_unrecorded_total", cause="queue_full")
    try:
        started = time.perf_counter()
        for k in range(20):
            recorder.refused("UploadUpdate", UpdateRejectedError("codec", f"refusal {k}"), device_id="d")
        assert time.perf_counter() - started < 0.5  # the caller did not wait for the database
        # At most three rows are held: one by the writer (blocked on the lock, if it took one yet) and two
        # queued; the rest were dropped at once.
        dropped = _count("mlecs_refusals_unrecorded_total", cause="queue_full") - full
        assert 17 <= dropped <= 18
    finally:
        threading.Timer(0.2, locker.rollback).start()
    assert recorder.flush()
    assert len(store.list_refusals()) == 20 - dropped
    recorder.close()
    locker.close()
    store.close()
