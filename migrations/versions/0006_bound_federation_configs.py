"""Brings stored federation configs inside the bounds the coordinator now enforces at creation.

Federation configs used to be checked for sign only: a seed of 2^80 or a deadline of 1e308 seconds was
accepted, then every task or launch failed. Every number now has bounds (``CONFIG_BOUNDS`` in
``server/domain/models.py``), checked whenever a config is built, stored ones included. A value beyond
them, which could only break its federation, is moved to the nearest bound here (a seed beyond
2^32 - 1 is reduced modulo 2^32, so it stays a seed); a sync federation whose quorum is larger than its
round size gets the round size as its quorum. The values are copied here, not imported: a migration
must keep meaning what it meant when it was written.

The downgrade changes nothing: bounded values are valid for the older code too.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")
_federations = sa.table("federations", sa.column("id", sa.String(64)), sa.column("name", sa.String(64)),
                        sa.column("config", sa.JSON()))

_CLOSED_MAX = {  # the closed upper bounds of 0006; open ones and lower bounds were already enforced
    "clients_per_round": 100_000, "min_updates": 100_000, "round_deadline_s": 30 * 24 * 3600,
    "public_epochs": 1000, "private_epochs": 1000, "personal_epochs": 1000, "batch_size": 65_536,
    "ccl_weight": 1000, "ccl_temperature": 100, "seccl_weight": 1000, "seccl_temperature": 100,
    "agreement_temperature": 100, "cloud_epochs": 1000, "async_buffer": 100_000, "max_staleness": 1000,
    "staleness_exponent": 10, "target_rounds": 1_000_000, "clip_norm": 1e9, "max_update_norm": 1e9,
    "exclude_above": 1e6,
}
_SEED_RANGE = 2**32


def _bounded(config: dict[str, Any]) -> dict[str, Any]:
    bounded = dict(config)
    for key, most in _CLOSED_MAX.items():
        value = bounded.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and not value <= most:
            # (not <= also catches NaN) an integer field keeps an integer, a float field a float
            bounded[key] = most if isinstance(value, int) else float(most)
    seed = bounded.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed < _SEED_RANGE:
        bounded["seed"] = seed % _SEED_RANGE
    round_size, quorum = bounded.get("clients_per_round", 0), bounded.get("min_updates", 1)
    if bounded.get("mode", "sync") == "sync" and isinstance(round_size, int) and isinstance(quorum, int) \
            and 0 < round_size < quorum:
        bounded["min_updates"] = round_size
    return bounded


def upgrade() -> None:
    bind = op.get_bind()
    for row in bind.execute(sa.select(_federations.c.id, _federations.c.name, _federations.c.config)).all():
        config = dict(row.config or {})
        bounded = _bounded(config)
        if bounded != config:
            changed = {key: (config.get(key), value) for key, value in bounded.items() if config.get(key) != value}
            log.warning("federation %s: config values brought inside their bounds (old, new): %s", row.name, changed)
            bind.execute(_federations.update().where(_federations.c.id == row.id).values(config=bounded))


def downgrade() -> None:
    """Nothing to undo: the bounded values are valid for revision 0005's code."""
