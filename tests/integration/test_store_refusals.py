"""SqlStore refusals on SQLite and PostgreSQL: recorded as given, listed newest first, narrowed by filters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from server.domain.errors import InvalidRequestError
from server.domain.models import Refusal
from server.persistence.sql_store import SqlStore

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _refusal(minute: int, **fields: str | None) -> Refusal:
    values: dict = {"method": "UploadUpdate", "reason": "checksum", "detail": f"refusal at minute {minute}",
                    "federation_id": "f1", "device_id": "d1", "round_id": "r1"}
    values.update(fields)
    return Refusal(at=T0 + timedelta(minutes=minute), **values)


def test_a_refusal_reads_back_equal_with_the_id_the_database_gave_it(store: SqlStore) -> None:
    stored = store.add_refusal(_refusal(0, detail="update rejected (checksum): sha256 differs"))
    assert stored.id is not None
    assert store.list_refusals() == [stored]
    assert stored.detail == "update rejected (checksum): sha256 differs" and stored.at == T0


def test_a_refusal_may_name_ids_that_do_not_exist_or_none_at_all(store: SqlStore) -> None:
    # No foreign keys: an unknown round or device can be the very reason a request was refused.
    store.add_refusal(_refusal(0, federation_id=None, device_id=None, round_id="no-such-round",
                               method="Enrol", reason="rate_limited"))
    [listed] = store.list_refusals(round_id="no-such-round")
    assert (listed.federation_id, listed.device_id, listed.method) == (None, None, "Enrol")


def test_refusals_are_listed_newest_first(store: SqlStore) -> None:
    for minute in (2, 0, 1):
        store.add_refusal(_refusal(minute))
    assert [r.at for r in store.list_refusals()] == [T0 + timedelta(minutes=m) for m in (2, 1, 0)]
    # Refusals made in the same instant come out in the reverse order they were written.
    a, b = store.add_refusal(_refusal(5, detail="a")), store.add_refusal(_refusal(5, detail="b"))
    assert [r.id for r in store.list_refusals(limit=2)] == [b.id, a.id]


def test_refusals_are_narrowed_by_round_device_and_federation_together(store: SqlStore) -> None:
    store.add_refusal(_refusal(0))
    store.add_refusal(_refusal(1, round_id="r2"))
    store.add_refusal(_refusal(2, device_id="d2"))
    store.add_refusal(_refusal(3, federation_id="f2", device_id="d3", round_id="r3"))

    def minutes(**filters: str) -> list[int]:
        return [int((r.at - T0).total_seconds() // 60) for r in store.list_refusals(**filters)]

    assert minutes(round_id="r1") == [2, 0]
    assert minutes(device_id="d1") == [1, 0]
    assert minutes(device_id="d1", round_id="r2") == [1]
    assert minutes(federation_id="f1") == [2, 1, 0]
    assert minutes(federation_id="f2") == [3]
    assert minutes(device_id="nobody") == []


def test_the_limit_caps_the_listing_and_must_be_sensible(store: SqlStore) -> None:
    for minute in range(5):
        store.add_refusal(_refusal(minute))
    assert len(store.list_refusals(limit=3)) == 3
    assert store.list_refusals(limit=1)[0].at == T0 + timedelta(minutes=4)
    for bad in (0, -1, 1001):
        with pytest.raises(InvalidRequestError, match="limit must be between 1 and 1000"):
            store.list_refusals(limit=bad)
