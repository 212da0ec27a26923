"""Updates remember the public sample ids of the fused representations they carry (SE-CCL, MMA noise term).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows written before this revision carried no representations: an empty list is their truth.
    with op.batch_alter_table("updates") as batch:
        batch.add_column(sa.Column("fused_sample_ids", sa.JSON(), nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("updates") as batch:
        batch.drop_column("fused_sample_ids")
