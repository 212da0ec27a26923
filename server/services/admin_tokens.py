"""Admin bearer tokens: issuing (plaintext shown once), authenticating, authorising by scope, revoking.

Tokens are ``mlecs_at_`` + 256 random bits, so a plain sha256 digest is what is stored and looked up (no
password stretching needed, and the prefix lets secret scanners recognise a leaked one). Every request
reads the token's row: revocation and expiry take effect on the next request, on every replica.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from server.domain.errors import ConflictError, InsufficientScopeError, InvalidRequestError, UnauthenticatedError
from server.domain.models import AdminScope, AdminToken, utcnow
from server.domain.ports import AdminStore

TOKEN_PREFIX = "mlecs_at_"
MAX_NAME_LENGTH = 100
TOUCH_INTERVAL = timedelta(seconds=60)
"""last_used_at is written at most this often per token: an admin polling a round does not write on every GET."""


def hash_token(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    """A new token's record and its plaintext, which exists nowhere else: show it once."""

    token: AdminToken
    plaintext: str


def parse_scopes(values: Iterable[str]) -> frozenset[AdminScope]:
    """Scope names (read, operate, admin) as a set; InvalidRequestError names an unknown or missing one."""
    names = [value.strip().lower() for value in values]
    known = {scope.value for scope in AdminScope}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InvalidRequestError(f"unknown scope(s) {', '.join(map(repr, unknown))}: use read, operate or admin")
    if not names:
        raise InvalidRequestError("a token needs at least one scope: read, operate or admin")
    return frozenset(AdminScope(name) for name in names)


class AdminTokenService:
    def __init__(self, store: AdminStore, clock: Callable[[], datetime] = utcnow) -> None:
        self._revoking = threading.Lock()  # two revocations at once cannot each leave the other as the last
        self._store = store
        self._clock = clock

    def create(self, name: str, scopes: Iterable[str], expires_in: timedelta | None, created_by: str) -> IssuedToken:
        """Issues a token; ``expires_in`` None means it lasts until revoked."""
        name = name.strip()
        # ASCII only: names are printed in tables and logs, where control or look-alike characters would mislead.
        if not name or len(name) > MAX_NAME_LENGTH or not (name.isascii() and name.isprintable()):
            raise InvalidRequestError(f"token name must be 1-{MAX_NAME_LENGTH} printable ASCII characters")
        parsed = parse_scopes(scopes)
        if expires_in is not None and expires_in <= timedelta(0):
            raise InvalidRequestError("a token's lifetime must be positive (or unset: until revoked)")
        now = self._clock()
        plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = AdminToken(name=name, token_hash=hash_token(plaintext), scopes=parsed, created_by=created_by[:200],
                           created_at=now, expires_at=None if expires_in is None else now + expires_in)
        self._store.add_admin_token(token)
        return IssuedToken(token=token, plaintext=plaintext)

    def identify(self, plaintext: str) -> AdminToken | None:
        """The token this plaintext is, whatever its state (for naming the actor of a refused request)."""
        if not plaintext.startswith(TOKEN_PREFIX):
            return None
        return self._store.find_admin_token_by_hash(hash_token(plaintext))

    def authenticate(self, plaintext: str) -> AdminToken:
        """The token's record; UnauthenticatedError says whether it is unknown, expired or revoked."""
        return self.check(self.identify(plaintext), None)

    def authorise(self, plaintext: str, scope: AdminScope) -> AdminToken:
        """The token's record if it is valid and grants ``scope``; InsufficientScopeError names the scope."""
        return self.check(self.identify(plaintext), scope)

    def check(self, token: AdminToken | None, scope: AdminScope | None) -> AdminToken:
        """``authorise`` on a token already looked up with ``identify`` (None: an unknown one)."""
        if token is None:
            raise UnauthenticatedError("unknown admin token")
        now = self._clock()
        if token.revoked_at is not None:
            raise UnauthenticatedError(f"admin token {token.name!r} was revoked at {token.revoked_at.isoformat()}")
        if token.expires_at is not None and token.expires_at <= now:
            raise UnauthenticatedError(f"admin token {token.name!r} expired at {token.expires_at.isoformat()}")
        if scope is not None and not token.grants(scope):
            held = ", ".join(sorted(s.value for s in token.scopes)) or "none"
            raise InsufficientScopeError(scope.value, f"this operation needs the {scope.value!r} scope; admin token "
                                                      f"{token.name!r} has {held}")
        if token.last_used_at is None or now - token.last_used_at >= TOUCH_INTERVAL:
            self._store.touch_admin_token(token.id, now)
            token.last_used_at = now
        return token

    def list_all(self) -> list[AdminToken]:
        return self._store.list_admin_tokens()

    def revoke(self, token_id: str, *, allow_last_admin: bool = False) -> AdminToken:
        """Revokes a token (its next request is refused); revoking it again changes nothing. Through the API
        the last live token with the ``admin`` scope is not revoked: nobody could then manage tokens except on
        the database. The database CLI (``allow_last_admin``), which can also create tokens, may."""
        with self._revoking:
            token = self._store.get_admin_token(token_id)
            if token.revoked_at is None:
                now = self._clock()
                if not allow_last_admin and AdminScope.ADMIN in token.scopes and not any(
                        other.id != token.id and AdminScope.ADMIN in other.scopes and self._live(other, now)
                        for other in self._store.list_admin_tokens()):
                    raise ConflictError(f"admin token {token.name!r} is the last live token with the admin scope; "
                                        "create another admin token first, then revoke this one")
                token.revoked_at = now
                self._store.save_admin_token(token)
            return token

    @staticmethod
    def _live(token: AdminToken, now: datetime) -> bool:
        return token.revoked_at is None and (token.expires_at is None or token.expires_at > now)
