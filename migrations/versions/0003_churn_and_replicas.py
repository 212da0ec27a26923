"""Scheduling under churn and several replicas: round targets, server-scored updates, per-device
upload ids, and leases with fencing tokens.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rounds opened before this revision committed when every participant had uploaded: target 0 says so.
    # Plain ALTER TABLE (no batch copy): SQLite could not drop and recreate `rounds`, which updates reference.
    op.add_column("rounds", sa.Column("target_updates", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("updates") as batch:
        batch.add_column(sa.Column("anchor_agreement", sa.Float(), nullable=True))
        # Upload ids are the device's idempotency keys: one update per (device, upload id), whatever the round.
        batch.create_unique_constraint("uq_updates_device_id_upload_id", ["device_id", "upload_id"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_leases"),
    )


def downgrade() -> None:
    op.drop_table("leases")
    with op.batch_alter_table("updates") as batch:
        batch.drop_constraint("uq_updates_device_id_upload_id", type_="unique")
        batch.drop_column("anchor_agreement")
    op.drop_column("rounds", "target_updates")  # SQLite >= 3.35 drops a plain column in place
