"""The SQL store's federations and their global versions (``server.domain.ports.FederationStore``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy import update as sql_update

from server.domain.errors import (
    ConflictError,
    NotFoundError,
)
from server.domain.models import (
    Federation,
    FederationState,
    ModelVersion,
)
from server.domain.ports import FederationStore
from server.persistence import mapping, statements
from server.persistence.sql_base import (
    SqlBase,
    fetch_row,
    rowcount,
    save_row,
)
from server.persistence.tables import (
    FederationRow,
    ModelVersionRow,
)


class SqlFederations(SqlBase):
    """``FederationStore`` on SQLAlchemy."""

    # ---- federations ------------------------------------------------------------------------

    def add_federation(self, federation: Federation) -> None:
        with self._transaction(clash=f"a federation named {federation.name!r} (or id {federation.id}) "
                                     "already exists") as session:
            session.add(FederationRow(**mapping.federation_values(federation)))

    def get_federation(self, federation_id: str) -> Federation:
        with self._connection() as connection:
            return mapping.to_federation(fetch_row(connection, statements.FEDERATIONS, federation_id, "federation"))

    def find_federation_by_name(self, name: str) -> Federation | None:
        with self._transaction() as session:
            row = session.scalar(select(FederationRow).where(FederationRow.name == name))
            return None if row is None else mapping.to_federation(row)

    def list_federations(self) -> list[Federation]:
        with self._connection() as connection:
            rows = connection.execute(statements.ALL_FEDERATIONS)
            return [mapping.to_federation(row) for row in rows]

    def save_federation(self, federation: Federation) -> None:
        with self._transaction(clash=f"a federation named {federation.name!r} already exists") as session:
            save_row(session, statements.FEDERATIONS, mapping.federation_values(federation), "federation")

    def set_federation_state(self, federation_id: str, state: FederationState) -> Federation:
        """Writes the state column alone, so a round committing at the same moment keeps the current version
        it sets. A stopped or completed federation stays so (ConflictError), decided in the same statement."""
        final = [s.value for s in FederationState if s.is_final]
        with self._transaction() as session:
            changed = session.execute(
                sql_update(FederationRow)
                .where(FederationRow.id == federation_id, FederationRow.state.notin_(final))
                .values(state=state.value))
            row = session.get(FederationRow, federation_id)
            if row is None:
                raise NotFoundError(f"federation {federation_id} not found")
            if rowcount(changed) == 0:
                raise ConflictError(f"federation {row.name!r} is {row.state} for good; create a new one")
            return mapping.to_federation(row)

    def set_current_version(self, federation_id: str, version_id: str) -> Federation:
        """Writes the current-version column alone (a promotion or roll-back); the state is left as it is.
        The version must be one of this federation's (there is no foreign key to say so)."""
        with self._transaction() as session:
            version = session.get(ModelVersionRow, version_id)
            if version is None or version.federation_id != federation_id:
                raise NotFoundError(f"version {version_id} of federation {federation_id} not found")
            changed = session.execute(sql_update(FederationRow).where(FederationRow.id == federation_id)
                                      .values(current_version_id=version_id))
            if rowcount(changed) == 0:
                raise NotFoundError(f"federation {federation_id} not found")
            row = session.get(FederationRow, federation_id)
            assert row is not None
            return mapping.to_federation(row)

    # ---- versions ---------------------------------------------------------------------------

    def add_version(self, version: ModelVersion) -> None:
        with self._transaction(clash=f"model version {version.id} already exists",
                               missing=f"federation {version.federation_id} not found") as session:
            session.add(ModelVersionRow(**mapping.version_values(version)))

    def get_version(self, version_id: str) -> ModelVersion:
        with self._connection() as connection:
            return mapping.to_version(fetch_row(connection, statements.VERSIONS, version_id, "model version"))

    def list_versions(self, federation_id: str) -> list[ModelVersion]:
        with self._transaction() as session:
            rows = session.scalars(select(ModelVersionRow).where(ModelVersionRow.federation_id == federation_id)
                                   .order_by(ModelVersionRow.created_at, ModelVersionRow.round_number))
            return [mapping.to_version(row) for row in rows]


if TYPE_CHECKING:  # mypy proves the class satisfies the port it implements
    _implements_port: type[FederationStore] = SqlFederations
