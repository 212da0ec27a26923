"""SQLAlchemy Core statements of the store's hot paths (task polls, uploads, the scheduler's scans), built once.

Values travel as bound parameters, so one statement object serves every call and SQLAlchemy computes its
cache key once. Building the statement and its cache key on every call took about a tenth of the time the
coordinator held the GIL in the 32-device load benchmark.
"""

from __future__ import annotations

from functools import cache
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, insert, select, update

from server.domain.models import UpdateState
from server.domain.rounds import RoundState
from server.persistence.tables import AdminTokenRow, DeviceRow, FederationRow, ModelVersionRow, RoundRow, UpdateRow

ADMIN_TOKENS = cast(Table, AdminTokenRow.__table__)
DEVICES = cast(Table, DeviceRow.__table__)
FEDERATIONS = cast(Table, FederationRow.__table__)
ROUNDS = cast(Table, RoundRow.__table__)
UPDATES = cast(Table, UpdateRow.__table__)
VERSIONS = cast(Table, ModelVersionRow.__table__)

_ACCEPTED = UpdateState.ACCEPTED.value

BY_ID: dict[Table, Any] = {table: select(table).where(table.c.id == bindparam("key"))
                           for table in (DEVICES, FEDERATIONS, ROUNDS, UPDATES, VERSIONS)}
"""A whole row by primary key; parameter ``key``."""


@cache
def save_by_id(table: Table) -> Any:
    """Sets the columns named in the parameters on the row whose id is the parameter ``row_key``."""
    return update(table).where(table.c.id == bindparam("row_key"))


INSERT_UPDATE = insert(UPDATES)

ADMIN_TOKEN_BY_HASH = select(ADMIN_TOKENS).where(ADMIN_TOKENS.c.token_hash == bindparam("token_hash"))
"""Read on every admin API request (so a revocation applies on the next one); parameter ``token_hash``."""

ALL_FEDERATIONS = select(FEDERATIONS).order_by(FEDERATIONS.c.created_at, FEDERATIONS.c.id)

UNFINISHED_ROUNDS = (select(ROUNDS).where(ROUNDS.c.state.in_([s.value for s in RoundState if not s.is_terminal]))
                     .order_by(ROUNDS.c.created_at, ROUNDS.c.number))

LATEST_ROUND = (select(ROUNDS).where(ROUNDS.c.federation_id == bindparam("federation_id"))
                .order_by(ROUNDS.c.number.desc()).limit(1))
"""Parameter ``federation_id``."""

LATEST_ROUND_WITH_ACCEPTANCE = LATEST_ROUND.add_columns(
    select(UPDATES.c.id).where(UPDATES.c.round_id == ROUNDS.c.id, UPDATES.c.device_id == bindparam("device_id"),
                               UPDATES.c.state == _ACCEPTED).exists().label("device_accepted"))
"""The latest round and whether ``device_id`` has an update accepted in it (column ``device_accepted``)."""

ROUND_FOR_UPDATE = BY_ID[ROUNDS].with_for_update()

SET_ROUND_STATE = update(ROUNDS).where(ROUNDS.c.id == bindparam("round_key")).values(state=bindparam("new_state"))

UPDATE_BY_UPLOAD = select(UPDATES).where(UPDATES.c.device_id == bindparam("device_id"),
                                         UPDATES.c.upload_id == bindparam("upload_id"))

DEVICE_PARTIALS = (select(UPDATES).where(UPDATES.c.round_id == bindparam("round_id"),
                                         UPDATES.c.device_id == bindparam("device_id"),
                                         UPDATES.c.state == UpdateState.PARTIAL.value)
                   .order_by(UPDATES.c.created_at, UPDATES.c.id))
"""The partial uploads of ``device_id`` in ``round_id``, oldest first (the round/device/upload index)."""

ACCEPTED_DEVICES = select(UPDATES.c.device_id).where(UPDATES.c.round_id == bindparam("round_id"),
                                                     UPDATES.c.state == _ACCEPTED)
"""Devices with an accepted update in ``round_id``."""

DEVICE_ACCEPTED = ACCEPTED_DEVICES.where(UPDATES.c.device_id == bindparam("device_id"))

OTHER_ACCEPTED_UPDATE = (select(UPDATES.c.id).where(UPDATES.c.round_id == bindparam("round_id"),
                                                    UPDATES.c.device_id == bindparam("device_id"),
                                                    UPDATES.c.state == _ACCEPTED,
                                                    UPDATES.c.id != bindparam("update_id")).limit(1))
"""An accepted update of ``device_id`` in ``round_id`` other than ``update_id`` (pass "" for any)."""

ACCEPTED_COUNT = select(func.count()).select_from(UPDATES).where(UPDATES.c.round_id == bindparam("round_id"),
                                                                 UPDATES.c.state == _ACCEPTED)
