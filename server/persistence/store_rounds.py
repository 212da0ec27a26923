"""The SQL store's rounds, the leases that fence their work, and device reports (``server.domain.ports.RoundStore``)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import and_, select
from sqlalchemy import update as sql_update
from sqlalchemy.orm import Session

from server.domain.errors import (
    ConflictError,
    InvalidTransitionError,
    LeaseLostError,
)
from server.domain.models import (
    DeviceReport,
    Fence,
    ModelVersion,
    Round,
    TaskView,
    utcnow,
)
from server.domain.ports import RoundStore
from server.domain.rounds import RoundState, check_transition
from server.persistence import mapping, statements
from server.persistence.sql_base import (
    SqlBase,
    fetch_row,
    get_row,
    rowcount,
    without_id,
)
from server.persistence.tables import (
    DeviceReportRow,
    FederationRow,
    LeaseRow,
    ModelVersionRow,
    RoundRow,
)


class SqlRounds(SqlBase):
    """``RoundStore`` on SQLAlchemy."""

    # ---- rounds -----------------------------------------------------------------------------

    def add_round(self, round_: Round) -> None:
        with self._transaction(
            clash=f"round {round_.number} (or id {round_.id}) already exists in federation {round_.federation_id}",
            missing=f"federation {round_.federation_id} or one of the round's versions not found",
        ) as session:
            session.add(RoundRow(**mapping.round_values(round_)))

    def get_round(self, round_id: str) -> Round:
        with self._connection() as connection:
            return mapping.to_round(fetch_row(connection, statements.ROUNDS, round_id, "round"))

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
            federation = mapping.to_federation(
                fetch_row(connection, statements.FEDERATIONS, federation_id, "federation"))
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

    def acquire_lease(self, name: str, holder: str, ttl_s: float, now: datetime | None = None, *,
                      reclaim: bool = False) -> Fence | None:
        """Claims or renews the lease ``name`` for ``holder``; None while another holder's is unexpired.

        Renewing keeps the token; taking a lease over (new, or expired) issues the next token. ``reclaim``: the
        holder restarted and does not hold the lease it may have held before: it takes it at once, with the
        next token, so that anything still running of its earlier life is fenced out.
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
                if row.holder != holder or reclaim:
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


    # ---- device reports ---------------------------------------------------------------------

    def add_device_report(self, report: DeviceReport) -> None:
        with self._transaction(missing=f"round {report.round_id} or device {report.device_id} not found") as session:
            session.add(DeviceReportRow(**mapping.report_values(report)))

    def list_device_reports(self, round_id: str) -> list[DeviceReport]:
        with self._transaction() as session:
            rows = session.scalars(select(DeviceReportRow).where(DeviceReportRow.round_id == round_id)
                                   .order_by(DeviceReportRow.reported_at, DeviceReportRow.id))
            return [mapping.to_report(row) for row in rows]


def _cas_round(session: Session, round_: Round) -> None:
    values = mapping.round_values(round_)
    from_states = [stored.value for stored, targets in _MAY_BECOME.items() if round_.state in targets]
    result = session.execute(
        sql_update(RoundRow).where(and_(RoundRow.id == round_.id, RoundRow.state.in_(from_states)))
        .values(**without_id(values))
    )
    if rowcount(result) == 1:
        return
    stored = get_row(session, RoundRow, round_.id, "round")
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


if TYPE_CHECKING:  # mypy proves the class satisfies the port it implements
    _implements_port: type[RoundStore] = SqlRounds
