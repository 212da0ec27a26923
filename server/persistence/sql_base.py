"""What every part of the SQL store shares: the engine, short transactions that translate database errors
into domain errors (see ``server.persistence.sql_store``), and small row helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Self, TypeVar, cast

from sqlalchemy import Connection, Engine, Row, Table
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.orm import Session, sessionmaker

from server.domain.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    UnavailableError,
)
from server.persistence import statements
from server.persistence.causes import logged_cause
from server.persistence.database import create_engine_for
from server.persistence.tables import (
    AdminTokenRow,
    DeviceRow,
    FederationRow,
    ModelVersionRow,
    RoundRow,
    UpdateRow,
)

IDS_PER_QUERY = 500
"""Ids per IN (...) list: well under SQLite's limit on bound parameters."""

RowT = TypeVar("RowT", FederationRow, DeviceRow, RoundRow, UpdateRow, ModelVersionRow, AdminTokenRow)


class SqlBase:
    """The engine and the transactions of a store on a migrated SQLite or PostgreSQL database."""

    def __init__(self, engine: Engine, *, owns_engine: bool = False) -> None:
        self._engine = engine
        self._owns_engine = owns_engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def from_url(cls, url: str) -> Self:
        """A store on its own engine for ``url`` (the schema must already be migrated); ``close`` it."""
        return cls(create_engine_for(url), owns_engine=True)

    def close(self) -> None:
        """Releases the connection pool if this store created the engine."""
        if self._owns_engine:
            self._engine.dispose()

    @contextmanager
    def _transaction(self, *, clash: str = "a row with the same key already exists",
                     missing: str = "a referenced row does not exist") -> Iterator[Session]:
        """An ORM session whose transaction commits on success; database errors come out as domain errors."""
        with self._translated(clash, missing), self._sessions.begin() as session:
            yield session

    @contextmanager
    def _connection(self, *, clash: str = "a row with the same key already exists",
                    missing: str = "a referenced row does not exist") -> Iterator[Connection]:
        """A Core connection whose transaction commits on success, for the hot paths (see the module doc)."""
        with self._translated(clash, missing), self._engine.begin() as connection:
            yield connection

    @contextmanager
    def _translated(self, clash: str, missing: str) -> Iterator[None]:
        """Turns database errors into domain errors (see the module doc)."""
        try:
            yield
        except sa_exc.IntegrityError as exc:
            if _is_unique_violation(exc):
                raise ConflictError(clash) from exc
            if _is_foreign_key_violation(exc):
                raise NotFoundError(missing) from exc
            raise
        except sa_exc.DataError as exc:  # a value the database cannot hold, e.g. a NUL byte in PostgreSQL text
            raise InvalidRequestError(
                f"the {self._engine.dialect.name} database cannot hold a value of this request (a NUL character, "
                f"or a number or text too large); nothing was stored [ref {logged_cause(exc)}]") from exc
        except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
            ref = logged_cause(exc)
            dialect = self._engine.dialect.name
            raise UnavailableError(f"the {dialect} database is unavailable; retry later [ref {ref}]") from exc


def get_row(session: Session, row_type: type[RowT], key: str, what: str) -> RowT:
    row = session.get(row_type, key)
    if row is None:
        raise NotFoundError(f"{what} {key} not found")
    return row


def fetch_row(connection: Connection, table: Table, key: str, what: str) -> Row[Any]:
    row = connection.execute(statements.BY_ID[table], {"key": key}).first()
    if row is None:
        raise NotFoundError(f"{what} {key} not found")
    return row


def save_row(executor: Session | Connection, table: Table, values: dict[str, Any], what: str) -> None:
    result = executor.execute(statements.save_by_id(table), {**without_id(values), "row_key": values["id"]})
    if rowcount(result) == 0:
        raise NotFoundError(f"{what} {values['id']} not found")


def without_id(values: dict[str, Any]) -> dict[str, Any]:
    # Primary keys never change; leaving them out of SET spares PostgreSQL its foreign-key re-checks.
    return {key: value for key, value in values.items() if key != "id"}


def rowcount(result: Result[Any]) -> int:
    return cast(CursorResult[Any], result).rowcount


def _is_unique_violation(exc: sa_exc.IntegrityError) -> bool:
    # psycopg exposes the SQLSTATE; sqlite3 (Python >= 3.11) the extended result code name.
    return (getattr(exc.orig, "sqlstate", None) == "23505"
            or getattr(exc.orig, "sqlite_errorname", None) in ("SQLITE_CONSTRAINT_UNIQUE",
                                                                "SQLITE_CONSTRAINT_PRIMARYKEY"))


def _is_foreign_key_violation(exc: sa_exc.IntegrityError) -> bool:
    return (getattr(exc.orig, "sqlstate", None) == "23503"
            or getattr(exc.orig, "sqlite_errorname", None) == "SQLITE_CONSTRAINT_FOREIGNKEY")
