"""Trust: one-time enrolment tokens, admin tokens with scopes, the admin audit log, and device refusals.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _at(name: str, nullable: bool) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "enrolment_tokens",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("federation_id", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("device_name", sa.String(200), nullable=True),
        sa.Column("created_by", sa.String(200), nullable=False),
        _at("created_at", False), _at("expires_at", False), _at("used_at", True),
        sa.Column("used_by_device_id", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(["federation_id"], ["federations.id"],
                                name="fk_enrolment_tokens_federation_id_federations"),
        sa.PrimaryKeyConstraint("id", name="pk_enrolment_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_enrolment_tokens_token_hash"),
    )
    op.create_index("ix_enrolment_tokens_federation_id", "enrolment_tokens", ["federation_id"])
    op.create_table(
        "admin_tokens",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        _at("created_at", False), _at("expires_at", True), _at("revoked_at", True), _at("last_used_at", True),
        sa.PrimaryKeyConstraint("id", name="pk_admin_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_admin_tokens_token_hash"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _at("at", False),
        sa.Column("actor_id", sa.String(64), nullable=True),
        sa.Column("actor_name", sa.String(200), nullable=False),
        sa.Column("action", sa.String(200), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_table(
        "refusals",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _at("at", False),
        sa.Column("federation_id", sa.String(64), nullable=True),
        sa.Column("device_id", sa.String(64), nullable=True),
        sa.Column("round_id", sa.String(64), nullable=True),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_refusals"),
    )
    op.create_index("ix_refusals_round_id", "refusals", ["round_id"])
    op.create_index("ix_refusals_device_id_at", "refusals", ["device_id", "at"])


def downgrade() -> None:
    op.drop_table("refusals")
    op.drop_table("audit_log")
    op.drop_table("admin_tokens")
    op.drop_table("enrolment_tokens")
