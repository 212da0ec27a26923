"""The SQL store's devices and their enrolment tokens (``server.domain.ports.DeviceStore``)."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, or_, select
from sqlalchemy import update as sql_update

from server.domain.errors import (
    NotFoundError,
    PermissionDeniedError,
)
from server.domain.models import (
    Device,
    EnrolmentToken,
    utcnow,
)
from server.domain.ports import DeviceStore
from server.persistence import mapping, statements
from server.persistence.sql_base import (
    IDS_PER_QUERY,
    SqlBase,
    fetch_row,
    get_row,
    rowcount,
    save_row,
    without_id,
)
from server.persistence.tables import (
    DeviceRow,
    EnrolmentTokenRow,
)


class SqlDevices(SqlBase):
    """``DeviceStore`` on SQLAlchemy."""

    # ---- devices ----------------------------------------------------------------------------

    def add_device(self, device: Device) -> None:
        with self._transaction(
            clash=f"a device named {device.name!r} (or id {device.id}) already exists in federation "
                  f"{device.federation_id}",
            missing=f"federation {device.federation_id} not found",
        ) as session:
            session.add(DeviceRow(**mapping.device_values(device)))

    def get_device(self, device_id: str) -> Device:
        with self._connection() as connection:
            return mapping.to_device(fetch_row(connection, statements.DEVICES, device_id, "device"))

    def get_devices(self, device_ids: Collection[str]) -> list[Device]:
        """The devices of these ids that exist, in no particular order (one query per 500 ids)."""
        ids = list(dict.fromkeys(device_ids))
        with self._transaction() as session:
            return [mapping.to_device(row) for start in range(0, len(ids), IDS_PER_QUERY)
                    for row in session.scalars(select(DeviceRow).where(
                        DeviceRow.id.in_(ids[start:start + IDS_PER_QUERY])))]

    def find_device_by_name(self, federation_id: str, name: str) -> Device | None:
        with self._transaction() as session:
            row = session.scalar(select(DeviceRow).where(DeviceRow.federation_id == federation_id,
                                                         DeviceRow.name == name))
            return None if row is None else mapping.to_device(row)

    def list_devices(self, federation_id: str) -> list[Device]:
        with self._transaction() as session:
            rows = session.scalars(select(DeviceRow).where(DeviceRow.federation_id == federation_id)
                                   .order_by(DeviceRow.name))
            return [mapping.to_device(row) for row in rows]

    def save_device(self, device: Device) -> None:
        with self._transaction(
            clash=f"a device named {device.name!r} already exists in federation {device.federation_id}",
            missing=f"federation {device.federation_id} not found",
        ) as session:
            save_row(session, statements.DEVICES, mapping.device_values(device), "device")

    def touch_devices(self, seen: dict[str, datetime]) -> None:
        """Records last-seen times in one statement; unknown ids are ignored and times never go back."""
        if not seen:
            return
        devices = statements.DEVICES
        statement = (
            sql_update(devices)
            .where(devices.c.id == bindparam("device_id"),
                   or_(devices.c.last_seen_at.is_(None), devices.c.last_seen_at < bindparam("seen_at")))
            .values(last_seen_at=bindparam("seen_at"))
        )
        with self._transaction() as session:
            session.execute(statement, [{"device_id": key, "seen_at": at} for key, at in seen.items()])

    def enrol_device(self, device: Device, *, new: bool, token: EnrolmentToken | None = None) -> bool:
        """In one transaction: marks ``token`` used by the device, then adds (``new``) or saves the device.

        Returns False, writing nothing, when the token was used or expired since it was checked: of two
        enrolments racing with one token exactly one succeeds (the token's row is locked while it is
        checked, ``FOR UPDATE`` on PostgreSQL, the write lock on SQLite). On success ``token`` is updated.
        Re-enrolling a device revoked meanwhile raises PermissionDeniedError: a revocation is never undone.
        """
        with self._transaction(
            clash=f"a device named {device.name!r} (or id {device.id}) already exists in federation "
                  f"{device.federation_id}",
            missing=f"federation {device.federation_id} or device {device.id} not found",
        ) as session:
            now = utcnow()
            if token is not None:
                row = session.scalar(select(EnrolmentTokenRow).where(EnrolmentTokenRow.id == token.id)
                                     .with_for_update())
                if row is None or row.used_at is not None or row.expires_at <= now:
                    return False
                row.used_at = now
                row.used_by_device_id = device.id
            if new:
                session.add(DeviceRow(**mapping.device_values(device)))
            else:
                values = without_id(mapping.device_values(device)) | {"revoked": False}
                result = session.execute(sql_update(DeviceRow).where(DeviceRow.id == device.id,
                                                                     DeviceRow.revoked.is_(False)).values(**values))
                if rowcount(result) == 0:
                    get_row(session, DeviceRow, device.id, "device")
                    raise PermissionDeniedError(f"device revoked: {device.name!r} may not enrol again")
            session.flush()  # a clashing device name fails here, inside the transaction that used the token
        if token is not None:
            token.used_at, token.used_by_device_id = now, device.id
        return True

    def revoke_device(self, device_id: str) -> Device:
        """Marks the device revoked (only that column, so no concurrent save can undo it); returns it."""
        with self._transaction() as session:
            if rowcount(session.execute(sql_update(DeviceRow).where(DeviceRow.id == device_id)
                                         .values(revoked=True))) == 0:
                raise NotFoundError(f"device {device_id} not found")
            return mapping.to_device(get_row(session, DeviceRow, device_id, "device"))

    # ---- enrolment tokens -------------------------------------------------------------------

    def add_enrolment_token(self, token: EnrolmentToken) -> None:
        with self._transaction(clash="an enrolment token with the same id or digest already exists",
                               missing=f"federation {token.federation_id} not found") as session:
            session.add(EnrolmentTokenRow(**mapping.enrolment_token_values(token)))

    def find_enrolment_token_by_hash(self, token_hash: str) -> EnrolmentToken | None:
        with self._transaction() as session:
            row = session.scalar(select(EnrolmentTokenRow).where(EnrolmentTokenRow.token_hash == token_hash))
            return None if row is None else mapping.to_enrolment_token(row)

    def list_enrolment_tokens(self, federation_id: str) -> list[EnrolmentToken]:
        with self._transaction() as session:
            rows = session.scalars(select(EnrolmentTokenRow).where(EnrolmentTokenRow.federation_id == federation_id)
                                   .order_by(EnrolmentTokenRow.created_at, EnrolmentTokenRow.id))
            return [mapping.to_enrolment_token(row) for row in rows]


if TYPE_CHECKING:  # mypy proves the class satisfies the port it implements
    _implements_port: type[DeviceStore] = SqlDevices
