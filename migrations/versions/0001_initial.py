"""Initial schema: federations, devices, model versions, rounds, updates and device reports.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written by hand to mirror server/persistence/tables.py; tests/integration/test_migrations.py checks
that the migrated schema and the ORM metadata do not differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types: a revision must not change when tables.py evolves later.
ID = sa.String(64)
NAME = sa.String(200)
STATE = sa.String(16)
CODEC = sa.String(32)
SHA256 = sa.String(64)
BLOB_KEY = sa.String(200)
MODALITIES = sa.String(200)


def _timestamp(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "federations",
        sa.Column("id", ID, nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("state", STATE, nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("current_version_id", ID, nullable=True),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_federations"),
        sa.UniqueConstraint("name", name="uq_federations_name"),
    )
    op.create_table(
        "devices",
        sa.Column("id", ID, nullable=False),
        sa.Column("federation_id", ID, nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("modalities", MODALITIES, nullable=False),
        sa.Column("secret_hash", sa.String(255), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        _timestamp("enrolled_at"),
        _timestamp("last_seen_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
        sa.ForeignKeyConstraint(["federation_id"], ["federations.id"], name="fk_devices_federation_id_federations"),
        sa.UniqueConstraint("federation_id", "name", name="uq_devices_federation_id_name"),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", ID, nullable=False),
        sa.Column("federation_id", ID, nullable=False),
        sa.Column("round_number", sa.Integer(), nullable=False),
        sa.Column("codec", CODEC, nullable=False),
        sa.Column("adapter_key", BLOB_KEY, nullable=False),
        sa.Column("adapter_sha256", SHA256, nullable=False),
        sa.Column("adapter_size", sa.Integer(), nullable=False),
        sa.Column("anchors_key", BLOB_KEY, nullable=True),
        sa.Column("anchors_sha256", SHA256, nullable=True),
        sa.Column("anchors_size", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        sa.ForeignKeyConstraint(["federation_id"], ["federations.id"],
                                name="fk_model_versions_federation_id_federations"),
    )
    op.create_index("ix_model_versions_federation_id_created_at", "model_versions",
                    ["federation_id", "created_at"])
    op.create_table(
        "rounds",
        sa.Column("id", ID, nullable=False),
        sa.Column("federation_id", ID, nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("state", STATE, nullable=False),
        sa.Column("participants", sa.JSON(), nullable=False),
        _timestamp("created_at"),
        _timestamp("opened_at", nullable=True),
        _timestamp("deadline_at", nullable=True),
        _timestamp("closed_at", nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("base_version_id", ID, nullable=True),
        sa.Column("version_id", ID, nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rounds"),
        sa.ForeignKeyConstraint(["federation_id"], ["federations.id"], name="fk_rounds_federation_id_federations"),
        sa.ForeignKeyConstraint(["base_version_id"], ["model_versions.id"],
                                name="fk_rounds_base_version_id_model_versions"),
        sa.ForeignKeyConstraint(["version_id"], ["model_versions.id"], name="fk_rounds_version_id_model_versions"),
        sa.UniqueConstraint("federation_id", "number", name="uq_rounds_federation_id_number"),
    )
    op.create_index("ix_rounds_state", "rounds", ["state"])
    op.create_table(
        "updates",
        sa.Column("id", ID, nullable=False),
        sa.Column("round_id", ID, nullable=False),
        sa.Column("device_id", ID, nullable=False),
        sa.Column("upload_id", sa.String(64), nullable=False),
        sa.Column("state", STATE, nullable=False),
        sa.Column("codec", CODEC, nullable=False),
        sa.Column("declared_size", sa.Integer(), nullable=False),
        sa.Column("received_bytes", sa.Integer(), nullable=False),
        sa.Column("sha256", SHA256, nullable=False),
        sa.Column("blob_key", BLOB_KEY, nullable=True),
        sa.Column("modalities", MODALITIES, nullable=False),
        sa.Column("public_samples", sa.Integer(), nullable=False),
        sa.Column("private_samples", sa.Integer(), nullable=False),
        sa.Column("base_version_id", ID, nullable=True),
        sa.Column("rejection_reason", sa.Text(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        _timestamp("created_at"),
        _timestamp("accepted_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_updates"),
        sa.ForeignKeyConstraint(["round_id"], ["rounds.id"], name="fk_updates_round_id_rounds"),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name="fk_updates_device_id_devices"),
        sa.UniqueConstraint("round_id", "device_id", "upload_id", name="uq_updates_round_id_device_id_upload_id"),
    )
    op.create_index("ix_updates_device_id", "updates", ["device_id"])
    op.create_table(
        "device_reports",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("round_id", ID, nullable=False),
        sa.Column("device_id", ID, nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        _timestamp("reported_at"),
        sa.PrimaryKeyConstraint("id", name="pk_device_reports"),
        sa.ForeignKeyConstraint(["round_id"], ["rounds.id"], name="fk_device_reports_round_id_rounds"),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name="fk_device_reports_device_id_devices"),
    )
    op.create_index("ix_device_reports_round_id", "device_reports", ["round_id"])
    op.create_index("ix_device_reports_device_id", "device_reports", ["device_id"])


def downgrade() -> None:
    # Reverse order of creation, so no table is dropped while another still references it.
    op.drop_table("device_reports")
    op.drop_table("updates")
    op.drop_table("rounds")
    op.drop_table("model_versions")
    op.drop_table("devices")
    op.drop_table("federations")
