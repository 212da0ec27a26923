"""The SQL store's admin tokens and the audit log (``server.domain.ports.AdminStore``)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, cast

from sqlalchemy import Table, or_, select
from sqlalchemy import update as sql_update

from server.domain.models import (
    AdminToken,
    AuditEntry,
)
from server.domain.ports import AdminStore
from server.persistence import mapping, statements
from server.persistence.sql_base import (
    SqlBase,
    get_row,
    save_row,
)
from server.persistence.tables import (
    AdminTokenRow,
    AuditEntryRow,
)


class SqlAdmin(SqlBase):
    """``AdminStore`` on SQLAlchemy."""

    # ---- admin tokens and the audit log ------------------------------------------------------

    def add_admin_token(self, token: AdminToken) -> None:
        with self._transaction(clash=f"an admin token with id {token.id} or the same digest already exists") as session:
            session.add(AdminTokenRow(**mapping.admin_token_values(token)))

    def get_admin_token(self, token_id: str) -> AdminToken:
        with self._transaction() as session:
            return mapping.to_admin_token(get_row(session, AdminTokenRow, token_id, "admin token"))

    def find_admin_token_by_hash(self, token_hash: str) -> AdminToken | None:
        with self._connection() as connection:
            row = connection.execute(statements.ADMIN_TOKEN_BY_HASH, {"token_hash": token_hash}).first()
            return None if row is None else mapping.to_admin_token(row)

    def list_admin_tokens(self) -> list[AdminToken]:
        with self._transaction() as session:
            rows = session.scalars(select(AdminTokenRow).order_by(AdminTokenRow.created_at, AdminTokenRow.id))
            return [mapping.to_admin_token(row) for row in rows]

    def save_admin_token(self, token: AdminToken) -> None:
        with self._transaction() as session:
            save_row(session, cast(Table, AdminTokenRow.__table__), mapping.admin_token_values(token), "admin token")

    def touch_admin_token(self, token_id: str, at: datetime) -> None:
        """Sets last_used_at alone, so it can never write over a revocation made meanwhile."""
        with self._transaction() as session:
            session.execute(sql_update(AdminTokenRow).where(AdminTokenRow.id == token_id).values(last_used_at=at))

    def add_audit_entry(self, entry: AuditEntry) -> AuditEntry:
        """Appends the entry; returns it with the id the database gave it."""
        with self._transaction() as session:
            row = AuditEntryRow(**mapping.audit_values(entry))
            session.add(row)
            session.flush()
            return mapping.to_audit_entry(row)

    def list_audit_entries(self, *, actor: str | None = None, action: str | None = None,
                           since: datetime | None = None, limit: int = 100) -> list[AuditEntry]:
        """Newest first. ``actor`` matches a token id or name; ``action`` an action or its prefix before a dot
        (``federations`` matches ``federations.stop``); ``since`` is inclusive."""
        statement = select(AuditEntryRow)
        if actor is not None:
            statement = statement.where(or_(AuditEntryRow.actor_id == actor, AuditEntryRow.actor_name == actor))
        if action is not None:
            statement = statement.where(or_(AuditEntryRow.action == action,
                                            AuditEntryRow.action.startswith(f"{action}.", autoescape=True)))
        if since is not None:
            statement = statement.where(AuditEntryRow.at >= since)
        statement = statement.order_by(AuditEntryRow.id.desc()).limit(max(0, limit))
        with self._transaction() as session:
            return [mapping.to_audit_entry(row) for row in session.scalars(statement)]


if TYPE_CHECKING:  # mypy proves the class satisfies the port it implements
    _implements_port: type[AdminStore] = SqlAdmin
