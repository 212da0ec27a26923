"""The durable ``Store`` on SQLAlchemy: one code path for the embedded SQLite file and PostgreSQL.

Every method runs in its own short transaction and commits before it returns. Database errors are
translated once, here: unique-constraint violations become ``ConflictError``, references to missing
rows ``NotFoundError``, values the database cannot hold (a NUL byte in PostgreSQL text) ``InvalidRequestError``,
and an unreachable or locked database ``UnavailableError`` (retryable).

Concurrency: ``save_round`` is an optimistic compare-and-set on the round's lifecycle state. Its
UPDATE only applies while the stored state may still legally become the new one: the same state, or
one reachable along the lifecycle of ``server.domain.rounds`` (several steps at once are fine: a
service may move a round open -> collecting -> aggregating in memory and save once). A committed or
failed round is immutable, and no round moves backwards. A writer working from a stale copy (say it
read ``aggregating`` and wants ``committed`` while another process already failed the round)
therefore gets ``InvalidTransitionError`` instead of silently overwriting the other outcome.
Two writers that keep the same non-terminal state are not told apart (the domain record has no
revision counter); within one coordinator ``RoundLocks`` serialises them.
Other ``save_*`` methods are last-writer-wins.

Hot paths (task polls, uploads, the scheduler's scans) run SQLAlchemy Core statements on a plain connection
(``_connection``); the rest use an ORM session (``_transaction``). Both translate errors the same way. A row
read by key cost 0.4 ms of CPU through Core against 0.9 ms through the ORM session (measured here), and a
busy coordinator runs a dozen such reads per accepted update.

Several replicas: ``accept_update`` locks the round's row (``SELECT ... FOR UPDATE`` on PostgreSQL)
while it checks that the round still takes uploads and writes the acceptance, and moving a round to
aggregating updates that same row, so an update is either accepted before the aggregator's transition
(and listed by it) or refused as late: never acknowledged and then left out. Work that one replica at
a time should do is claimed with ``acquire_lease``; its fencing token is checked inside the
transactions that ``save_round`` and ``commit_round`` run when given a ``Fence``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import Connection, Engine, Row, Table, and_, bindparam, or_, select
from sqlalchemy import exc as sa_exc
from sqlalchemy import update as sql_update
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.orm import Session, sessionmaker

from server.domain.errors import (
    AlreadyAcceptedError,
    ConflictError,
    InvalidRequestError,
    InvalidTransitionError,
    LateUpdateError,
    LeaseLostError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from server.domain.models import (
    Acceptance,
    AdminToken,
    AuditEntry,
    Device,
    DeviceReport,
    EnrolmentToken,
    Federation,
    FederationState,
    Fence,
    ModelVersion,
    Refusal,
    Round,
    TaskView,
    Update,
    UploadView,
    utcnow,
)
from server.domain.ports import Store
from server.domain.rounds import RoundState, check_transition
from server.persistence import mapping, statements
from server.persistence.causes import logged_cause
from server.persistence.database import create_engine_for
from server.persistence.tables import (
    AdminTokenRow,
    AuditEntryRow,
    DeviceReportRow,
    DeviceRow,
    EnrolmentTokenRow,
    FederationRow,
    LeaseRow,
    ModelVersionRow,
    RefusalRow,
    RoundRow,
    UpdateRow,
)

MAX_REFUSALS_LISTED = 1000
"""The most refusals one ``list_refusals`` call returns."""
_IDS_PER_QUERY = 500
"""Ids per IN (...) list: well under SQLite's limit on bound parameters."""
_DEVICES, _FEDERATIONS, _ROUNDS = statements.DEVICES, statements.FEDERATIONS, statements.ROUNDS
_UPDATES, _VERSIONS = statements.UPDATES, statements.VERSIONS

RowT = TypeVar("RowT", FederationRow, DeviceRow, RoundRow, UpdateRow, ModelVersionRow, AdminTokenRow)


class SqlStore:
    """Implements ``server.domain.ports.Store`` on a migrated SQLite or PostgreSQL database."""

    def __init__(self, engine: Engine, *, owns_engine: bool = False) -> None:
        self._engine = engine
        self._owns_engine = owns_engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def from_url(cls, url: str) -> SqlStore:
        """A store on its own engine for ``url`` (the schema must already be migrated); ``close`` it."""
        return cls(create_engine_for(url), owns_engine=True)

    def close(self) -> None:
        """Releases the connection pool if this store created the engine."""
        if self._owns_engine:
            self._engine.dispose()

    # ---- federations ------------------------------------------------------------------------

    def add_federation(self, federation: Federation) -> None:
        with self._transaction(clash=f"a federation named {federation.name!r} (or id {federation.id}) "
                                     "already exists") as session:
            session.add(FederationRow(**mapping.federation_values(federation)))

    def get_federation(self, federation_id: str) -> Federation:
        with self._connection() as connection:
            return mapping.to_federation(_fetch(connection, _FEDERATIONS, federation_id, "federation"))

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
            _save(session, _FEDERATIONS, mapping.federation_values(federation), "federation")

    def set_federation_state(self, federation_id: str, state: FederationState) -> Federation:
        """Writes the state column alone, so a round committing at the same moment keeps the current version
        it sets. A stopped federation stays stopped (ConflictError), decided in the same statement."""
        with self._transaction() as session:
            changed = session.execute(
                sql_update(FederationRow)
                .where(FederationRow.id == federation_id, FederationRow.state != FederationState.STOPPED.value)
                .values(state=state.value))
            row = session.get(FederationRow, federation_id)
            if row is None:
                raise NotFoundError(f"federation {federation_id} not found")
            if _rowcount(changed) == 0:
                raise ConflictError(f"federation {row.name!r} is stopped for good; create a new one")
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
            if _rowcount(changed) == 0:
                raise NotFoundError(f"federation {federation_id} not found")
            row = session.get(FederationRow, federation_id)
            assert row is not None
            return mapping.to_federation(row)

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
            return mapping.to_device(_fetch(connection, _DEVICES, device_id, "device"))

    def get_devices(self, device_ids: Collection[str]) -> list[Device]:
        """The devices of these ids that exist, in no particular order (one query per 500 ids)."""
        ids = list(dict.fromkeys(device_ids))
        with self._transaction() as session:
            return [mapping.to_device(row) for start in range(0, len(ids), _IDS_PER_QUERY)
                    for row in session.scalars(select(DeviceRow).where(
                        DeviceRow.id.in_(ids[start:start + _IDS_PER_QUERY])))]

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
            _save(session, _DEVICES, mapping.device_values(device), "device")

    def touch_devices(self, seen: dict[str, datetime]) -> None:
        """Records last-seen times in one statement; unknown ids are ignored and times never go back."""
        if not seen:
            return
        statement = (
            sql_update(_DEVICES)
            .where(_DEVICES.c.id == bindparam("device_id"),
                   or_(_DEVICES.c.last_seen_at.is_(None), _DEVICES.c.last_seen_at < bindparam("seen_at")))
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
                values = _without_id(mapping.device_values(device)) | {"revoked": False}
                result = session.execute(sql_update(DeviceRow).where(DeviceRow.id == device.id,
                                                                     DeviceRow.revoked.is_(False)).values(**values))
                if _rowcount(result) == 0:
                    _get(session, DeviceRow, device.id, "device")
                    raise PermissionDeniedError(f"device revoked: {device.name!r} may not enrol again")
            session.flush()  # a clashing device name fails here, inside the transaction that used the token
        if token is not None:
            token.used_at, token.used_by_device_id = now, device.id
        return True

    def revoke_device(self, device_id: str) -> Device:
        """Marks the device revoked (only that column, so no concurrent save can undo it); returns it."""
        with self._transaction() as session:
            if _rowcount(session.execute(sql_update(DeviceRow).where(DeviceRow.id == device_id)
                                         .values(revoked=True))) == 0:
                raise NotFoundError(f"device {device_id} not found")
            return mapping.to_device(_get(session, DeviceRow, device_id, "device"))

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

    # ---- rounds -----------------------------------------------------------------------------

    def add_round(self, round_: Round) -> None:
        with self._transaction(
            clash=f"round {round_.number} (or id {round_.id}) already exists in federation {round_.federation_id}",
            missing=f"federation {round_.federation_id} or one of the round's versions not found",
        ) as session:
            session.add(RoundRow(**mapping.round_values(round_)))

    def get_round(self, round_id: str) -> Round:
        with self._connection() as connection:
            return mapping.to_round(_fetch(connection, _ROUNDS, round_id, "round"))

    def list_rounds(self, federation_id: str) -> list[Round]:
        with self._transaction() as session:
            rows = session.scalars(select(RoundRow).where(RoundRow.federation_id == federation_id)
                                   .order_by(RoundRow.number))
            return [mapping.to_round(row) for row in rows]

    def latest_round(self, federation_id: str) -> Round | None:
        with self._connection() as connection:
            row = connection.execute(statements.LATEST_ROUND, {"federation_id": federation_id}).first()
            return None if row is None else mapping.to_round(row)

    def task_view(self, federation_id: str, device_id: str) -> TaskView:
        """The federation, its latest round and whether the device's update for it was accepted, in one
        transaction: every task poll asks this, and at round start a thousand of them arrive at once."""
        with self._connection() as connection:
            federation = mapping.to_federation(_fetch(connection, _FEDERATIONS, federation_id, "federation"))
            row = connection.execute(statements.LATEST_ROUND_WITH_ACCEPTANCE,
                                     {"federation_id": federation_id, "device_id": device_id}).first()
            if row is None:
                return TaskView(federation, None, accepted=False)
            return TaskView(federation, mapping.to_round(row), bool(row.device_accepted))

    def list_unfinished_rounds(self) -> list[Round]:
        with self._connection() as connection:
            rows = connection.execute(statements.UNFINISHED_ROUNDS)
            return [mapping.to_round(row) for row in rows]

    def save_round(self, round_: Round, fence: Fence | None = None) -> None:
        """Saves the round if its stored state may still become ``round_.state`` (see the module doc)
        and, given a fence, only while its token is current (else LeaseLostError)."""
        with self._transaction(missing=f"a version of round {round_.number} not found") as session:
            if fence is not None:
                _check_fence(session, fence)
            _cas_round(session, round_)

    def commit_round(self, round_: Round, version: ModelVersion, fence: Fence | None = None) -> None:
        """In one transaction: adds the round's new version, makes it the federation's current one and
        saves the round (committed). Nothing is written if the fence is stale or the round changed."""
        with self._transaction(clash=f"model version {version.id} already exists",
                               missing=f"federation {version.federation_id} not found") as session:
            if fence is not None:
                _check_fence(session, fence)
            session.add(ModelVersionRow(**mapping.version_values(version)))
            session.flush()
            session.execute(sql_update(FederationRow).where(FederationRow.id == version.federation_id)
                            .values(current_version_id=version.id))
            _cas_round(session, round_)

    # ---- leases -----------------------------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, ttl_s: float, now: datetime | None = None) -> Fence | None:
        """Claims or renews the lease ``name`` for ``holder``; None while another holder's is unexpired.

        Renewing keeps the token; taking a lease over (new, or expired) issues the next token.
        """
        now = now or utcnow()
        expires = now + timedelta(seconds=ttl_s)
        try:
            with self._transaction() as session:
                row = session.scalar(select(LeaseRow).where(LeaseRow.name == name).with_for_update())
                if row is None:
                    session.add(LeaseRow(name=name, holder=holder, token=1, expires_at=expires))
                    return Fence(name, holder, 1)
                if row.holder != holder and row.expires_at > now:
                    return None
                if row.holder != holder:
                    row.token += 1
                    row.holder = holder
                row.expires_at = expires
                return Fence(name, holder, row.token)
        except ConflictError:  # two replicas created the row at once; the other one won
            return None

    def release_lease(self, fence: Fence) -> None:
        """Gives the lease up early (at shutdown) so another replica need not wait for it to expire."""
        with self._transaction() as session:
            session.execute(sql_update(LeaseRow).where(LeaseRow.name == fence.lease, LeaseRow.holder == fence.holder,
                                                       LeaseRow.token == fence.token)
                            .values(expires_at=utcnow() - timedelta(seconds=1)))


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
            round_row = connection.execute(statements.BY_ID[_ROUNDS], {"key": round_id}).first()
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
            _save(connection, _UPDATES, mapping.update_values(update), "update")
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
            row = connection.execute(statements.BY_ID[_UPDATES], {"key": update_id}).first()
            return None if row is None else mapping.to_update(row)

    def save_update(self, update: Update) -> None:
        with self._connection(
            clash=f"upload {update.upload_id!r} already exists for device {update.device_id}",
            missing=f"round {update.round_id} or device {update.device_id} not found",
        ) as connection:
            _save(connection, _UPDATES, mapping.update_values(update), "update")

    # ---- versions ---------------------------------------------------------------------------

    def add_version(self, version: ModelVersion) -> None:
        with self._transaction(clash=f"model version {version.id} already exists",
                               missing=f"federation {version.federation_id} not found") as session:
            session.add(ModelVersionRow(**mapping.version_values(version)))

    def get_version(self, version_id: str) -> ModelVersion:
        with self._connection() as connection:
            return mapping.to_version(_fetch(connection, _VERSIONS, version_id, "model version"))

    def list_versions(self, federation_id: str) -> list[ModelVersion]:
        with self._transaction() as session:
            rows = session.scalars(select(ModelVersionRow).where(ModelVersionRow.federation_id == federation_id)
                                   .order_by(ModelVersionRow.created_at, ModelVersionRow.round_number))
            return [mapping.to_version(row) for row in rows]

    # ---- device reports ---------------------------------------------------------------------

    def add_device_report(self, report: DeviceReport) -> None:
        with self._transaction(missing=f"round {report.round_id} or device {report.device_id} not found") as session:
            session.add(DeviceReportRow(**mapping.report_values(report)))

    def list_device_reports(self, round_id: str) -> list[DeviceReport]:
        with self._transaction() as session:
            rows = session.scalars(select(DeviceReportRow).where(DeviceReportRow.round_id == round_id)
                                   .order_by(DeviceReportRow.reported_at, DeviceReportRow.id))
            return [mapping.to_report(row) for row in rows]

    # ---- admin tokens and the audit log ------------------------------------------------------

    def add_admin_token(self, token: AdminToken) -> None:
        with self._transaction(clash=f"an admin token with id {token.id} or the same digest already exists") as session:
            session.add(AdminTokenRow(**mapping.admin_token_values(token)))

    def get_admin_token(self, token_id: str) -> AdminToken:
        with self._transaction() as session:
            return mapping.to_admin_token(_get(session, AdminTokenRow, token_id, "admin token"))

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
            _save(session, cast(Table, AdminTokenRow.__table__), mapping.admin_token_values(token), "admin token")

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

    # ---- plumbing ---------------------------------------------------------------------------

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


def _cas_round(session: Session, round_: Round) -> None:
    values = mapping.round_values(round_)
    from_states = [stored.value for stored, targets in _MAY_BECOME.items() if round_.state in targets]
    result = session.execute(
        sql_update(RoundRow).where(and_(RoundRow.id == round_.id, RoundRow.state.in_(from_states)))
        .values(**_without_id(values))
    )
    if _rowcount(result) == 1:
        return
    stored = _get(session, RoundRow, round_.id, "round")
    # Repeating the save of a finished round (a retry after a lost reply) changes nothing: fine.
    if mapping.round_values(mapping.to_round(stored)) == values:
        return
    raise InvalidTransitionError(
        f"round {round_.number} is {stored.state} in the database, so it cannot be saved as "
        f"{round_.state}: it was changed since it was read"
    )


def _check_fence(session: Session, fence: Fence) -> None:
    """Raises LeaseLostError unless ``fence`` still holds its lease; locks the lease row meanwhile."""
    row = session.scalar(select(LeaseRow).where(LeaseRow.name == fence.lease).with_for_update())
    if row is None or row.token != fence.token or row.holder != fence.holder:
        current = "nobody" if row is None else f"{row.holder} (token {row.token})"
        raise LeaseLostError(f"lease {fence.lease} with token {fence.token} is no longer held by {fence.holder}; "
                             f"now held by {current}")


def _get(session: Session, row_type: type[RowT], key: str, what: str) -> RowT:
    row = session.get(row_type, key)
    if row is None:
        raise NotFoundError(f"{what} {key} not found")
    return row


def _fetch(connection: Connection, table: Table, key: str, what: str) -> Row[Any]:
    row = connection.execute(statements.BY_ID[table], {"key": key}).first()
    if row is None:
        raise NotFoundError(f"{what} {key} not found")
    return row


def _save(executor: Session | Connection, table: Table, values: dict[str, Any], what: str) -> None:
    result = executor.execute(statements.save_by_id(table), {**_without_id(values), "row_key": values["id"]})
    if _rowcount(result) == 0:
        raise NotFoundError(f"{what} {values['id']} not found")


def _without_id(values: dict[str, Any]) -> dict[str, Any]:
    # Primary keys never change; leaving them out of SET spares PostgreSQL its foreign-key re-checks.
    return {key: value for key, value in values.items() if key != "id"}


def _reachable_from(state: RoundState) -> frozenset[RoundState]:
    """Every state the lifecycle can lead ``state`` to, in one step or several."""
    def allowed(source: RoundState, target: RoundState) -> bool:
        try:
            check_transition(source, target)
        except InvalidTransitionError:
            return False
        return True

    found: set[RoundState] = set()
    frontier = [state]
    while frontier:
        current = frontier.pop()
        for target in RoundState:
            if target not in found and allowed(current, target):
                found.add(target)
                frontier.append(target)
    return frozenset(found)


# stored state -> the states a save may write over it (itself, unless finished, plus what follows it)
_MAY_BECOME = {state: _reachable_from(state) | (set() if state.is_terminal else {state}) for state in RoundState}


def _rowcount(result: Result[Any]) -> int:
    return cast(CursorResult[Any], result).rowcount


def _is_unique_violation(exc: sa_exc.IntegrityError) -> bool:
    # psycopg exposes the SQLSTATE; sqlite3 (Python >= 3.11) the extended result code name.
    return (getattr(exc.orig, "sqlstate", None) == "23505"
            or getattr(exc.orig, "sqlite_errorname", None) in ("SQLITE_CONSTRAINT_UNIQUE",
                                                                "SQLITE_CONSTRAINT_PRIMARYKEY"))


def _is_foreign_key_violation(exc: sa_exc.IntegrityError) -> bool:
    return (getattr(exc.orig, "sqlstate", None) == "23503"
            or getattr(exc.orig, "sqlite_errorname", None) == "SQLITE_CONSTRAINT_FOREIGNKEY")




if TYPE_CHECKING:  # mypy proves the class satisfies the port it implements
    _implements_port: type[Store] = SqlStore
