"""AdminTokenService on a real store (SQLite and PostgreSQL) with a hand-driven clock: issuing, the scope
hierarchy, expiry to the microsecond, revocation, and the throttled last-used write."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from server.domain.errors import (
    ConflictError,
    InsufficientScopeError,
    InvalidRequestError,
    NotFoundError,
    UnauthenticatedError,
)
from server.domain.models import AdminScope
from server.persistence.sql_store import SqlStore
from server.services.admin_tokens import TOKEN_PREFIX, TOUCH_INTERVAL, AdminTokenService


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tokens(store: SqlStore, clock: Clock) -> AdminTokenService:
    return AdminTokenService(store, clock)


def test_a_token_is_issued_once_and_only_its_digest_is_stored(tokens: AdminTokenService, store: SqlStore) -> None:
    issued = tokens.create("  ci  ", ["Operate"], timedelta(days=1), "cli:me")

    assert issued.plaintext.startswith(TOKEN_PREFIX) and len(issued.plaintext) >= len(TOKEN_PREFIX) + 43
    stored = store.get_admin_token(issued.token.id)
    assert stored.token_hash == hashlib.sha256(issued.plaintext.encode()).hexdigest()
    assert (stored.name, stored.scopes, stored.created_by) == ("ci", frozenset({AdminScope.OPERATE}), "cli:me")
    assert issued.plaintext not in repr(stored)
    assert tokens.create("ci", ["read"], None, "x").plaintext != issued.plaintext


@pytest.mark.parametrize(("held", "allowed"), [
    ("read", {"read"}), ("operate", {"read", "operate"}), ("admin", {"read", "operate", "admin"})])
def test_scopes_nest_admin_over_operate_over_read(tokens: AdminTokenService, held: str, allowed: set[str]) -> None:
    plaintext = tokens.create(f"holder-{held}", [held], None, "t").plaintext
    for scope in AdminScope:
        if scope.value in allowed:
            assert tokens.authorise(plaintext, scope).name == f"holder-{held}"
        else:
            with pytest.raises(InsufficientScopeError, match=f"needs the '{scope.value}' scope; admin token "
                                                              f"'holder-{held}' has {held}") as caught:
                tokens.authorise(plaintext, scope)
            assert caught.value.scope == scope.value


def test_unknown_expired_and_revoked_tokens_each_say_why(tokens: AdminTokenService, clock: Clock) -> None:
    with pytest.raises(UnauthenticatedError, match="unknown admin token"):
        tokens.authenticate(TOKEN_PREFIX + "made-up")
    with pytest.raises(UnauthenticatedError, match="unknown admin token"):
        tokens.authenticate("not even the prefix")

    short = tokens.create("short", ["read"], timedelta(hours=1), "t")
    clock.now += timedelta(hours=1) - timedelta(microseconds=1)
    assert tokens.authenticate(short.plaintext).id == short.token.id
    clock.now += timedelta(microseconds=1)
    with pytest.raises(UnauthenticatedError, match="'short' expired at 2026-01-01T01:00:00"):
        tokens.authenticate(short.plaintext)

    tokens.create("another admin", ["admin"], None, "t")
    kept = tokens.create("kept", ["admin"], None, "t")
    first = tokens.revoke(kept.token.id)
    clock.now += timedelta(minutes=5)
    assert tokens.revoke(kept.token.id).revoked_at == first.revoked_at  # revoking again changes nothing
    with pytest.raises(UnauthenticatedError, match="'kept' was revoked at"):
        tokens.authorise(kept.plaintext, AdminScope.READ)
    with pytest.raises(NotFoundError):
        tokens.revoke("nope")


def test_last_use_is_written_at_most_once_per_interval(tokens: AdminTokenService, store: SqlStore,
                                                       clock: Clock) -> None:
    issued = tokens.create("poller", ["read"], None, "t")
    assert store.get_admin_token(issued.token.id).last_used_at is None
    start = clock.now
    tokens.authenticate(issued.plaintext)
    clock.now += TOUCH_INTERVAL - timedelta(seconds=1)
    tokens.authenticate(issued.plaintext)
    assert store.get_admin_token(issued.token.id).last_used_at == start
    clock.now += timedelta(seconds=1)
    tokens.authenticate(issued.plaintext)
    assert store.get_admin_token(issued.token.id).last_used_at == clock.now


@pytest.mark.parametrize(("name", "scopes", "lifetime", "message"), [
    ("", ["read"], None, "token name must be 1-100 printable ASCII"),
    ("x" * 101, ["read"], None, "token name must be"),
    ("tab\there", ["read"], None, "token name must be"),
    ("jörg", ["read"], None, "token name must be"),
    ("ok", [], None, "at least one scope"),
    ("ok", ["read", "root"], None, "unknown scope\\(s\\) 'root'"),
    ("ok", ["read"], timedelta(0), "lifetime must be positive"),
])
def test_an_invalid_token_request_is_refused_naming_the_problem(
        tokens: AdminTokenService, store: SqlStore, name: str, scopes: list[str], lifetime: timedelta | None,
        message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        tokens.create(name, scopes, lifetime, "t")
    assert store.list_admin_tokens() == []


def test_the_last_live_admin_token_is_not_revoked_except_from_the_database_cli(tokens: AdminTokenService,
                                                                               clock: Clock) -> None:
    first = tokens.create("first", ["admin"], None, "t")
    expiring = tokens.create("expiring", ["admin"], timedelta(minutes=1), "t")
    tokens.create("reader", ["read", "operate"], None, "t")
    assert tokens.revoke(first.token.id).revoked_at is not None  # "expiring" is still live

    clock.now += timedelta(minutes=2)  # ... and now it is not: "last" is the only live admin token
    last = tokens.create("last", ["admin"], None, "t")
    with pytest.raises(ConflictError, match="'last' is the last live token with the admin scope; create another"):
        tokens.revoke(last.token.id)
    assert tokens.authorise(last.plaintext, AdminScope.ADMIN).id == last.token.id
    assert expiring.token.id != last.token.id

    assert tokens.revoke(last.token.id, allow_last_admin=True).revoked_at is not None
