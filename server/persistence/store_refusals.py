"""The SQL store's refusals: requests the coordinator turned down, by reason (``server.domain.ports.RefusalStore``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select

from server.domain.errors import (
    InvalidRequestError,
)
from server.domain.models import (
    Refusal,
)
from server.domain.ports import RefusalStore
from server.persistence import mapping
from server.persistence.sql_base import (
    SqlBase,
)
from server.persistence.tables import (
    RefusalRow,
)

MAX_REFUSALS_LISTED = 1000
"""The most refusals one ``list_refusals`` call returns."""


class SqlRefusals(SqlBase):
    """``RefusalStore`` on SQLAlchemy."""

    # ---- refusals ---------------------------------------------------------------------------

    def add_refusal(self, refusal: Refusal) -> Refusal:
        """Appends the refusal; returns it with the id the database gave it."""
        with self._transaction() as session:
            row = RefusalRow(**mapping.refusal_values(refusal))
            session.add(row)
            session.flush()
            return mapping.to_refusal(row)

    def list_refusals(self, round_id: str | None = None, device_id: str | None = None,
                      federation_id: str | None = None, limit: int = 100) -> list[Refusal]:
        """Newest first, narrowed by whichever of round, device and federation are given."""
        if not 1 <= limit <= MAX_REFUSALS_LISTED:
            raise InvalidRequestError(f"limit must be between 1 and {MAX_REFUSALS_LISTED}, got {limit}")
        statement = select(RefusalRow)
        if round_id is not None:
            statement = statement.where(RefusalRow.round_id == round_id)
        if device_id is not None:
            statement = statement.where(RefusalRow.device_id == device_id)
        if federation_id is not None:
            statement = statement.where(RefusalRow.federation_id == federation_id)
        statement = statement.order_by(RefusalRow.at.desc(), RefusalRow.id.desc()).limit(limit)
        with self._transaction() as session:
            return [mapping.to_refusal(row) for row in session.scalars(statement)]


if TYPE_CHECKING:  # mypy proves the class satisfies the port it implements
    _implements_port: type[RefusalStore] = SqlRefusals
