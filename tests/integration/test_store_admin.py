"""SqlStore admin tokens and the audit log on SQLite and PostgreSQL: round-trips, lookups, filters, ordering."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from server.domain.errors import ConflictError, InvalidRequestError, NotFoundError
from server.domain.models import AdminScope, AdminToken, AuditEntry, AuditOutcome
from server.persistence.sql_store import SqlStore

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _token(name: str = "ops", digest: str = "a" * 64, **fields) -> AdminToken:
    fields.setdefault("created_at", T0)
    fields.setdefault("scopes", frozenset({AdminScope.OPERATE}))
    return AdminToken(name=name, token_hash=digest, created_by="cli", **fields)


def _entry(action: str = "federations.stop", actor: str = "ops", at: datetime = T0, status: int = 200) -> AuditEntry:
    return AuditEntry(actor_id=f"id-{actor}", actor_name=actor, action=action, method="POST",
                      path="/v1/federations/f/stop", status=status, outcome=AuditOutcome.of_status(status),
                      detail=None if status < 400 else "no", at=at)


def test_an_admin_token_reads_back_equal_by_id_and_by_digest(store: SqlStore) -> None:
    token = _token(scopes=frozenset({AdminScope.READ, AdminScope.ADMIN}), expires_at=T0 + timedelta(days=3))
    store.add_admin_token(token)

    assert store.get_admin_token(token.id) == token
    assert store.find_admin_token_by_hash("a" * 64) == token
    assert store.find_admin_token_by_hash("b" * 64) is None


def test_an_unknown_admin_token_id_is_not_found(store: SqlStore) -> None:
    with pytest.raises(NotFoundError, match="admin token nope not found"):
        store.get_admin_token("nope")


def test_two_tokens_with_the_same_digest_conflict(store: SqlStore) -> None:
    store.add_admin_token(_token("one"))
    with pytest.raises(ConflictError):
        store.add_admin_token(_token("two"))
    assert [t.name for t in store.list_admin_tokens()] == ["one"]


def test_tokens_are_listed_oldest_first_and_saved_revocations_stick(store: SqlStore) -> None:
    late = _token("late", "b" * 64, created_at=T0 + timedelta(hours=1))
    early = _token("early", "c" * 64)
    store.add_admin_token(late)
    store.add_admin_token(early)
    early.revoked_at = T0 + timedelta(hours=2)
    store.save_admin_token(early)

    assert [(t.name, t.revoked_at) for t in store.list_admin_tokens()] == [
        ("early", T0 + timedelta(hours=2)), ("late", None)]


def test_touching_a_token_sets_last_used_without_undoing_a_revocation(store: SqlStore) -> None:
    token = _token()
    store.add_admin_token(token)
    stale_copy = store.get_admin_token(token.id)
    token.revoked_at = T0 + timedelta(minutes=5)
    store.save_admin_token(token)

    store.touch_admin_token(stale_copy.id, T0 + timedelta(minutes=6))

    stored = store.get_admin_token(token.id)
    assert stored.revoked_at == T0 + timedelta(minutes=5)
    assert stored.last_used_at == T0 + timedelta(minutes=6)


def test_audit_entries_get_ascending_ids_and_list_newest_first(store: SqlStore) -> None:
    first = store.add_audit_entry(_entry(at=T0))
    second = store.add_audit_entry(_entry("rounds.launch", at=T0 + timedelta(seconds=1), status=409))

    assert first.id is not None and second.id is not None and second.id > first.id
    listed = store.list_audit_entries()
    assert listed == [second, first]
    assert listed[0].outcome is AuditOutcome.REFUSED and listed[0].detail == "no"


def test_audit_entries_filter_by_actor_action_since_and_limit(store: SqlStore) -> None:
    store.add_audit_entry(_entry("federations.create", actor="alice", at=T0))
    store.add_audit_entry(_entry("federations.stop", actor="bob", at=T0 + timedelta(minutes=1)))
    store.add_audit_entry(_entry("rounds.launch", actor="alice", at=T0 + timedelta(minutes=2)))
    store.add_audit_entry(_entry("federations_x.odd", actor="alice", at=T0 + timedelta(minutes=3)))

    def actions(**filters) -> list[str]:
        return [e.action for e in store.list_audit_entries(**filters)]

    assert actions(actor="alice") == ["federations_x.odd", "rounds.launch", "federations.create"]
    assert actions(actor="id-bob") == ["federations.stop"]
    assert actions(action="federations") == ["federations.stop", "federations.create"]  # a prefix, not a LIKE
    assert actions(action="rounds.launch") == ["rounds.launch"]
    assert actions(since=T0 + timedelta(minutes=1), action="federations") == ["federations.stop"]
    assert actions(limit=2) == ["federations_x.odd", "rounds.launch"]
    assert actions(actor="alice", action="federations", since=T0, limit=1) == ["federations.create"]


def test_a_value_the_database_cannot_hold_is_an_invalid_request_not_a_crash(store: SqlStore,
                                                                            database_url: str) -> None:
    if database_url.startswith("sqlite"):  # SQLite stores a NUL byte; there is nothing to refuse
        with pytest.raises(NotFoundError):
            store.get_federation("a\x00b")
        return
    with pytest.raises(InvalidRequestError, match=r"postgresql database cannot hold a value .*\[ref [0-9a-f]{12}\]") \
            as caught:
        store.get_federation("a\x00b")
    assert "0x00" not in str(caught.value)  # the driver's own text stays in the log
    with pytest.raises(InvalidRequestError):
        store.add_audit_entry(_entry(actor="nul\x00"))
    assert store.list_audit_entries() == []
