"""The SQL store's updates: uploads in progress, their acceptance into a round (``server.domain.ports.UpdateStore``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select

from server.domain.errors import (
    AlreadyAcceptedError,
    LateUpdateError,
    NotFoundError,
)
from server.domain.models import (
    Acceptance,
    Update,
    UploadView,
)
from server.domain.ports import UpdateStore
from server.domain.rounds import RoundState
from server.persistence import mapping, statements
from server.persistence.sql_base import (
    SqlBase,
    save_row,
)
from server.persistence.tables import (
    UpdateRow,
)


class SqlUpdates(SqlBase):
    """``UpdateStore`` on SQLAlchemy."""

    # ---- updates ----------------------------------------------------------------------------

    def add_update(self, update: Update) -> None:
        """Adds the update; AlreadyAcceptedError if the device already has an update accepted in that round
        (another could never be accepted), ConflictError if the upload id is taken."""
        with self._connection(
            clash=f"upload {update.upload_id!r} (or update id {update.id}) already exists for device "
                  f"{update.device_id} in round {update.round_id}",
            missing=f"round {update.round_id} or device {update.device_id} not found",
        ) as connection:
            if connection.execute(statements.OTHER_ACCEPTED_UPDATE, {
                    "round_id": update.round_id, "device_id": update.device_id, "update_id": ""}).first():
                raise AlreadyAcceptedError("an update from this device for this round was already accepted")
            connection.execute(statements.INSERT_UPDATE, mapping.update_values(update))

    def upload_view(self, device_id: str, upload_id: str, round_id: str) -> UploadView:
        """The device's update with this upload id, and the round ``round_id``, in one transaction: every
        upload stream starts with this."""
        with self._connection() as connection:
            existing = connection.execute(statements.UPDATE_BY_UPLOAD,
                                          {"device_id": device_id, "upload_id": upload_id}).first()
            round_row = connection.execute(statements.BY_ID[statements.ROUNDS], {"key": round_id}).first()
            return UploadView(None if existing is None else mapping.to_update(existing),
                              None if round_row is None else mapping.to_round(round_row))

    def find_update_by_upload(self, device_id: str, upload_id: str) -> Update | None:
        """The device's update with this upload id, in whichever round it landed."""
        with self._connection() as connection:
            row = connection.execute(statements.UPDATE_BY_UPLOAD,
                                     {"device_id": device_id, "upload_id": upload_id}).first()
            return None if row is None else mapping.to_update(row)

    def accept_update(self, update: Update) -> Acceptance:
        """Saves ``update`` (state ACCEPTED) only while its round takes uploads and holds no other accepted
        update from the device; moves an open round to collecting. Returns the round as stored and its count
        of accepted updates (exact: the round's row stays locked until the transaction ends).

        Raises LateUpdateError when the round closed, AlreadyAcceptedError for a second update from the device.
        """
        with self._connection(missing=f"round {update.round_id} or update {update.id} not found") as connection:
            row = connection.execute(statements.ROUND_FOR_UPDATE, {"key": update.round_id}).first()
            if row is None:
                raise NotFoundError(f"round {update.round_id} not found")
            round_ = mapping.to_round(row)
            if not round_.state.accepts_uploads:
                raise LateUpdateError(f"round {round_.number} is {round_.state}: the update arrived too late "
                                      "and was not counted; the device should take its next task")
            other = connection.execute(statements.OTHER_ACCEPTED_UPDATE, {
                "round_id": update.round_id, "device_id": update.device_id, "update_id": update.id}).first()
            if other is not None:
                raise AlreadyAcceptedError(f"an update from this device for round {round_.number} was already "
                                           "accepted")
            save_row(connection, statements.UPDATES, mapping.update_values(update), "update")
            if round_.state is RoundState.OPEN:
                round_.state = RoundState.COLLECTING
                connection.execute(statements.SET_ROUND_STATE,
                                   {"round_key": round_.id, "new_state": round_.state.value})
            accepted = connection.execute(statements.ACCEPTED_COUNT, {"round_id": round_.id}).scalar_one()
            return Acceptance(round_, accepted)

    def find_update(self, round_id: str, device_id: str, upload_id: str) -> Update | None:
        with self._transaction() as session:
            row = session.scalar(select(UpdateRow).where(
                UpdateRow.round_id == round_id, UpdateRow.device_id == device_id, UpdateRow.upload_id == upload_id))
            return None if row is None else mapping.to_update(row)

    def accepted_devices(self, round_id: str, device_id: str | None = None) -> set[str]:
        """Ids of the devices with an accepted update in the round (only ``device_id``, if given).

        One narrow indexed query: the scheduler and every task poll ask this, so it must not map whole rows.
        """
        with self._connection() as connection:
            if device_id is None:
                return set(connection.execute(statements.ACCEPTED_DEVICES, {"round_id": round_id}).scalars())
            return set(connection.execute(statements.DEVICE_ACCEPTED,
                                          {"round_id": round_id, "device_id": device_id}).scalars())

    def list_updates(self, round_id: str) -> list[Update]:
        with self._transaction() as session:
            rows = session.scalars(select(UpdateRow).where(UpdateRow.round_id == round_id)
                                   .order_by(UpdateRow.created_at, UpdateRow.id))
            return [mapping.to_update(row) for row in rows]

    def device_partials(self, round_id: str, device_id: str) -> list[Update]:
        with self._connection() as connection:
            rows = connection.execute(statements.DEVICE_PARTIALS, {"round_id": round_id, "device_id": device_id})
            return [mapping.to_update(row) for row in rows]

    def get_update(self, update_id: str) -> Update | None:
        with self._connection() as connection:
            row = connection.execute(statements.BY_ID[statements.UPDATES], {"key": update_id}).first()
            return None if row is None else mapping.to_update(row)

    def save_update(self, update: Update) -> None:
        with self._connection(
            clash=f"upload {update.upload_id!r} already exists for device {update.device_id}",
            missing=f"round {update.round_id} or device {update.device_id} not found",
        ) as connection:
            save_row(connection, statements.UPDATES, mapping.update_values(update), "update")


if TYPE_CHECKING:  # mypy proves the class satisfies the port it implements
    _implements_port: type[UpdateStore] = SqlUpdates
