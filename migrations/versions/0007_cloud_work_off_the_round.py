"""Cloud work off the round's commit: each version records the cloud job it owes and what the job made.

A round now commits once its aggregate is stored; cloud tuning, anchor generation and the version's
evaluation run afterwards as a job (``server.services.cloud_work``). The columns say where that job stands
(``cloud_state``: none, pending, done, failed; attempts; when it was last queued and when it finished; the
last error), where its input is (``fused_key``: the public ids and fused z the round's updates carried) and
the anchors it generated (``generated_anchors_*``), which later versions use.

Versions stored before this revision did their cloud work inside the commit: they are ``none``. Federations
created before it open a round only after the previous one's cloud work, as they always did: ``anchors =
"wait"`` is written into their stored config where the key is absent (the new default is ``latest``).
The downgrade drops the columns and the pinned key.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_federations = sa.table("federations", sa.column("id", sa.String(64)), sa.column("config", sa.JSON()))

_COLUMNS = (
    ("cloud_state", lambda: sa.Column("cloud_state", sa.String(16), nullable=False, server_default="none")),
    ("cloud_attempts", lambda: sa.Column("cloud_attempts", sa.Integer(), nullable=False, server_default="0")),
    ("cloud_enqueued_at", lambda: sa.Column("cloud_enqueued_at", sa.DateTime(timezone=True), nullable=True)),
    ("cloud_finished_at", lambda: sa.Column("cloud_finished_at", sa.DateTime(timezone=True), nullable=True)),
    ("cloud_error", lambda: sa.Column("cloud_error", sa.String(500), nullable=True)),
    ("fused_key", lambda: sa.Column("fused_key", sa.String(200), nullable=True)),
    ("generated_anchors_key", lambda: sa.Column("generated_anchors_key", sa.String(200), nullable=True)),
    ("generated_anchors_sha256", lambda: sa.Column("generated_anchors_sha256", sa.String(64), nullable=True)),
    ("generated_anchors_size", lambda: sa.Column("generated_anchors_size", sa.Integer(), nullable=True)),
)


def _set_anchors_key(pin: bool) -> None:
    bind = op.get_bind()
    for row in bind.execute(sa.select(_federations.c.id, _federations.c.config)).all():
        config = dict(row.config or {})
        if pin and "anchors" not in config:
            config["anchors"] = "wait"
        elif not pin and "anchors" in config:
            del config["anchors"]  # the older code knows no such key, and always waited
        else:
            continue
        bind.execute(_federations.update().where(_federations.c.id == row.id).values(config=config))


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        for _, column in _COLUMNS:
            batch.add_column(column())
    op.create_index("ix_model_versions_cloud_state", "model_versions", ["cloud_state"])
    _set_anchors_key(pin=True)


def downgrade() -> None:
    _set_anchors_key(pin=False)
    op.drop_index("ix_model_versions_cloud_state", table_name="model_versions")
    # Column by column, not in a batch: on SQLite a batch copies the table and drops the old one, which its
    # foreign keys refuse while rounds point at versions. SQLite drops an unindexed column in place.
    for name, _ in reversed(_COLUMNS):
        op.drop_column("model_versions", name)
