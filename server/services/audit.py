"""The audit log of admin actions: who did what, when, and how it ended (refusals included)."""

from __future__ import annotations

from datetime import datetime

from server.domain.errors import InvalidRequestError
from server.domain.models import AdminToken, AuditEntry, AuditOutcome
from server.domain.ports import AdminStore

ANONYMOUS = "anonymous"
MAX_LIST = 1000
MAX_DETAIL = 2000


class AuditService:
    def __init__(self, store: AdminStore) -> None:
        self._store = store

    def record(self, *, actor: AdminToken | None, action: str, method: str, path: str, status: int,
               detail: str | None = None) -> AuditEntry:
        """Appends one entry; ``actor`` None is a caller that presented no token the coordinator knows."""
        entry = AuditEntry(actor_id=None if actor is None else actor.id,
                           actor_name=ANONYMOUS if actor is None else actor.name,
                           action=_storable(action)[:200], method=_storable(method)[:16], path=_storable(path),
                           status=status, outcome=AuditOutcome.of_status(status),
                           detail=None if detail is None else _storable(detail)[:MAX_DETAIL])
        return self._store.add_audit_entry(entry)

    def list(self, *, actor: str | None = None, action: str | None = None, since: datetime | None = None,
             limit: int = 100) -> list[AuditEntry]:
        """Newest first; ``actor`` is a token id or name, ``action`` an action (``rounds.launch``) or a group
        (``rounds``)."""
        if not 1 <= limit <= MAX_LIST:
            raise InvalidRequestError(f"limit must be between 1 and {MAX_LIST}")
        return self._store.list_audit_entries(actor=actor, action=action, since=since, limit=limit)


def _storable(text: str) -> str:
    # A refused request is still recorded, whatever it carried: PostgreSQL text cannot hold a NUL byte.
    return text.replace("\x00", "\\x00")
