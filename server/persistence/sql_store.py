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

from typing import TYPE_CHECKING

from server.domain.ports import Store
from server.persistence.store_admin import SqlAdmin
from server.persistence.store_cloud import SqlCloudWork
from server.persistence.store_devices import SqlDevices
from server.persistence.store_federations import SqlFederations
from server.persistence.store_refusals import MAX_REFUSALS_LISTED, SqlRefusals
from server.persistence.store_rounds import SqlRounds
from server.persistence.store_updates import SqlUpdates

__all__ = ["MAX_REFUSALS_LISTED", "SqlStore"]


class SqlStore(SqlFederations, SqlDevices, SqlRounds, SqlUpdates, SqlAdmin, SqlRefusals, SqlCloudWork):
    """Implements ``server.domain.ports.Store`` on a migrated SQLite or PostgreSQL database: one class per
    aggregate (``server.persistence.store_*``), sharing one engine (``server.persistence.sql_base``)."""


if TYPE_CHECKING:  # mypy proves the class satisfies the port it implements
    _implements_port: type[Store] = SqlStore
