"""The coordinator's relational schema as typed SQLAlchemy tables (the migrations must match it).

Rows are plain column holders: ``sql_store`` maps them to and from the domain records, so nothing
outside the persistence package ever sees an ORM instance.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

ID = String(64)
NAME = String(200)
STATE = String(16)
CODEC = String(32)
SHA256 = String(64)
BLOB_KEY = String(200)

# Deterministic constraint names keep migrations and autogenerate comparisons stable across backends.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp that always comes back in UTC, whatever the backend stores.

    SQLite keeps no offset, so values are converted to UTC before writing and marked UTC on read;
    PostgreSQL returns them in the session time zone, so they are converted back to UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        # The coordinator's clock is UTC, so a naive value can only mean UTC.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UtcDateTime(), dict[str, Any]: JSON(), list[str]: JSON(), list[int]: JSON(),
    }


class FederationRow(Base):
    __tablename__ = "federations"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(NAME, unique=True)
    state: Mapped[str] = mapped_column(STATE)
    config: Mapped[dict[str, Any]]
    # No foreign key: versions already reference their federation, and a cycle would complicate
    # creating and dropping the tables for little gain (the service sets it from a version it just stored).
    current_version_id: Mapped[str | None] = mapped_column(ID)
    created_at: Mapped[datetime]


class DeviceRow(Base):
    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("federation_id", "name"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    federation_id: Mapped[str] = mapped_column(ID, ForeignKey("federations.id"))
    name: Mapped[str] = mapped_column(NAME)
    modalities: Mapped[str] = mapped_column(String(200))
    """Sorted, comma-separated modality names."""
    secret_hash: Mapped[str] = mapped_column(String(255))
    revoked: Mapped[bool] = mapped_column(Boolean)
    enrolled_at: Mapped[datetime]
    last_seen_at: Mapped[datetime | None]


class ModelVersionRow(Base):
    __tablename__ = "model_versions"
    __table_args__ = (Index(None, "federation_id", "created_at"), Index(None, "cloud_state"))

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    federation_id: Mapped[str] = mapped_column(ID, ForeignKey("federations.id"))
    round_number: Mapped[int] = mapped_column(Integer)
    codec: Mapped[str] = mapped_column(CODEC)
    adapter_key: Mapped[str] = mapped_column(BLOB_KEY)
    adapter_sha256: Mapped[str] = mapped_column(SHA256)
    adapter_size: Mapped[int] = mapped_column(Integer)
    anchors_key: Mapped[str | None] = mapped_column(BLOB_KEY)
    anchors_sha256: Mapped[str | None] = mapped_column(SHA256)
    anchors_size: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    cloud_state: Mapped[str] = mapped_column(STATE, server_default="none")
    cloud_attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    cloud_enqueued_at: Mapped[datetime | None]
    cloud_finished_at: Mapped[datetime | None]
    cloud_error: Mapped[str | None] = mapped_column(String(500))
    fused_key: Mapped[str | None] = mapped_column(BLOB_KEY)
    generated_anchors_key: Mapped[str | None] = mapped_column(BLOB_KEY)
    generated_anchors_sha256: Mapped[str | None] = mapped_column(SHA256)
    generated_anchors_size: Mapped[int | None] = mapped_column(Integer)


class RoundRow(Base):
    __tablename__ = "rounds"
    # The unique (federation_id, number) index also serves lookups by federation.
    __table_args__ = (UniqueConstraint("federation_id", "number"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    federation_id: Mapped[str] = mapped_column(ID, ForeignKey("federations.id"))
    number: Mapped[int] = mapped_column(Integer)
    # Indexed: the scheduler scans for rounds that are not finished yet.
    state: Mapped[str] = mapped_column(STATE, index=True)
    participants: Mapped[list[str]]
    target_updates: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]
    opened_at: Mapped[datetime | None]
    deadline_at: Mapped[datetime | None]
    closed_at: Mapped[datetime | None]
    failure_reason: Mapped[str | None] = mapped_column(Text)
    base_version_id: Mapped[str | None] = mapped_column(ID, ForeignKey("model_versions.id"))
    version_id: Mapped[str | None] = mapped_column(ID, ForeignKey("model_versions.id"))
    metrics: Mapped[dict[str, Any]]


class UpdateRow(Base):
    __tablename__ = "updates"
    # The unique index starts with round_id, so it also serves "all updates of a round". The second
    # makes an upload id the device's idempotency key across rounds (an async update may land in a later one).
    __table_args__ = (UniqueConstraint("round_id", "device_id", "upload_id"),
                      UniqueConstraint("device_id", "upload_id"))

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    round_id: Mapped[str] = mapped_column(ID, ForeignKey("rounds.id"))
    device_id: Mapped[str] = mapped_column(ID, ForeignKey("devices.id"), index=True)
    upload_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(STATE)
    codec: Mapped[str] = mapped_column(CODEC)
    declared_size: Mapped[int] = mapped_column(Integer)
    received_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(SHA256)
    blob_key: Mapped[str | None] = mapped_column(BLOB_KEY)
    modalities: Mapped[str] = mapped_column(String(200))
    """Sorted, comma-separated modality names."""
    public_samples: Mapped[int] = mapped_column(Integer)
    private_samples: Mapped[int] = mapped_column(Integer)
    # What the device claimed it trained from, kept as sent (no foreign key) for diagnosing stale updates.
    base_version_id: Mapped[str | None] = mapped_column(ID)
    rejection_reason: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]]
    fused_sample_ids: Mapped[list[int]]
    anchor_agreement: Mapped[float | None] = mapped_column(Float)
    """Computed by the coordinator at acceptance: the MMA noise-term evidence (None: nothing to compare)."""
    created_at: Mapped[datetime]
    accepted_at: Mapped[datetime | None]


class DeviceReportRow(Base):
    __tablename__ = "device_reports"

    # Reports have no identity in the domain; a surrogate key keeps repeated reports apart.
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_id: Mapped[str] = mapped_column(ID, ForeignKey("rounds.id"), index=True)
    device_id: Mapped[str] = mapped_column(ID, ForeignKey("devices.id"), index=True)
    metrics: Mapped[dict[str, Any]]
    reported_at: Mapped[datetime]


class LeaseRow(Base):
    """A named, expiring claim on work (e.g. advancing a federation's rounds) held by one replica.

    ``token`` grows by one whenever the lease changes hands: the fencing token a holder presents with its
    writes, so a replica that lost its lease (paused, partitioned) cannot commit over its successor.
    """

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    token: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[datetime]


class EnrolmentTokenRow(Base):
    """A one-time token an operator hands to one device so it can enrol (only its digest is kept)."""

    __tablename__ = "enrolment_tokens"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    federation_id: Mapped[str] = mapped_column(ID, ForeignKey("federations.id"), index=True)
    token_hash: Mapped[str] = mapped_column(SHA256, unique=True)
    device_name: Mapped[str | None] = mapped_column(NAME)
    """When set, only a device of this name may use the token."""
    created_by: Mapped[str] = mapped_column(NAME)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    used_by_device_id: Mapped[str | None] = mapped_column(ID)


class AdminTokenRow(Base):
    """A bearer token for the admin API: digest only, scopes, expiry, revocation."""

    __tablename__ = "admin_tokens"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(NAME)
    token_hash: Mapped[str] = mapped_column(SHA256, unique=True)
    scopes: Mapped[list[str]]
    created_by: Mapped[str] = mapped_column(NAME)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class AuditEntryRow(Base):
    """One admin action: who (token id and name), what (method, path, action), when, and the outcome."""

    __tablename__ = "audit_log"
    __table_args__ = (Index(None, "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    actor_id: Mapped[str | None] = mapped_column(ID)
    actor_name: Mapped[str] = mapped_column(NAME)
    action: Mapped[str] = mapped_column(NAME)
    method: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(STATE)
    detail: Mapped[str | None] = mapped_column(Text)


class RefusalRow(Base):
    """A device request refused on purpose (validation, rate limit, identity), kept for operators.

    No foreign keys: a refusal may name a device or round that does not exist (that can be why it was refused).
    """

    __tablename__ = "refusals"
    __table_args__ = (Index(None, "round_id"), Index(None, "device_id", "at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    federation_id: Mapped[str | None] = mapped_column(ID)
    device_id: Mapped[str | None] = mapped_column(ID)
    round_id: Mapped[str | None] = mapped_column(ID)
    method: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)


metadata = Base.metadata
