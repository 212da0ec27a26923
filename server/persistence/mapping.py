"""Converts between domain records and table rows, so domain objects never hold ORM instances.

``*_values`` give the column values of a record (for INSERT and UPDATE); ``to_*`` build a fresh
record from a row: an ORM instance, or for the tables the hot paths read with SQLAlchemy Core, a
``Row`` of the whole table (its attributes are the column names, which the ORM attributes share).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sqlalchemy import Row

from server.domain.federation_config import FederationConfig
from server.domain.models import (
    AdminScope,
    AdminToken,
    AuditEntry,
    AuditOutcome,
    BlobRef,
    CloudState,
    Device,
    DeviceReport,
    EnrolmentToken,
    Federation,
    FederationState,
    ModelVersion,
    Refusal,
    Round,
    Update,
    UpdateState,
)
from server.domain.rounds import RoundState
from server.persistence.tables import (
    AdminTokenRow,
    AuditEntryRow,
    DeviceReportRow,
    DeviceRow,
    EnrolmentTokenRow,
    FederationRow,
    ModelVersionRow,
    RefusalRow,
    RoundRow,
    UpdateRow,
)

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_metrics(metrics: dict[str, float]) -> dict[str, float | str]:
    """Metrics as strict JSON: PostgreSQL rejects NaN/Infinity, so those travel as strings."""
    out: dict[str, float | str] = {}
    for key, value in metrics.items():
        number = float(value)
        if math.isfinite(number):
            out[key] = number
        else:
            out[key] = "NaN" if math.isnan(number) else ("Infinity" if number > 0 else "-Infinity")
    return out


def decode_metrics(stored: dict[str, Any] | None) -> dict[str, float]:
    return {key: _NON_FINITE[value] if isinstance(value, str) else float(value)
            for key, value in (stored or {}).items()}


def encode_modalities(modalities: frozenset[str]) -> str:
    return ",".join(sorted(modalities))


def decode_modalities(stored: str) -> frozenset[str]:
    return frozenset(name for name in stored.split(",") if name)


def _decode_config(stored: dict[str, Any]) -> FederationConfig:
    # Ignore keys a newer coordinator may have written, so an older one can still read the row.
    known = {f.name for f in dataclasses.fields(FederationConfig)}
    return FederationConfig(**{key: value for key, value in stored.items() if key in known})


def federation_values(federation: Federation) -> dict[str, Any]:
    return {
        "id": federation.id,
        "name": federation.name,
        "state": federation.state.value,
        "config": dataclasses.asdict(federation.config),
        "current_version_id": federation.current_version_id,
        "created_at": federation.created_at,
    }


def to_federation(row: FederationRow | Row[Any]) -> Federation:
    return Federation(
        id=row.id,
        name=row.name,
        state=FederationState(row.state),
        config=_decode_config(row.config),
        current_version_id=row.current_version_id,
        created_at=row.created_at,
    )


def device_values(device: Device) -> dict[str, Any]:
    return {
        "id": device.id,
        "federation_id": device.federation_id,
        "name": device.name,
        "modalities": encode_modalities(device.modalities),
        "secret_hash": device.secret_hash,
        "revoked": device.revoked,
        "enrolled_at": device.enrolled_at,
        "last_seen_at": device.last_seen_at,
    }


def to_device(row: DeviceRow | Row[Any]) -> Device:
    return Device(
        id=row.id,
        federation_id=row.federation_id,
        name=row.name,
        modalities=decode_modalities(row.modalities),
        secret_hash=row.secret_hash,
        revoked=row.revoked,
        enrolled_at=row.enrolled_at,
        last_seen_at=row.last_seen_at,
    )


def enrolment_token_values(token: EnrolmentToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "federation_id": token.federation_id,
        "token_hash": token.token_hash,
        "device_name": token.device_name,
        "created_by": token.created_by,
        "created_at": token.created_at,
        "expires_at": token.expires_at,
        "used_at": token.used_at,
        "used_by_device_id": token.used_by_device_id,
    }


def to_enrolment_token(row: EnrolmentTokenRow) -> EnrolmentToken:
    return EnrolmentToken(
        id=row.id,
        federation_id=row.federation_id,
        token_hash=row.token_hash,
        device_name=row.device_name,
        created_by=row.created_by,
        created_at=row.created_at,
        expires_at=row.expires_at,
        used_at=row.used_at,
        used_by_device_id=row.used_by_device_id,
    )


def round_values(round_: Round) -> dict[str, Any]:
    return {
        "id": round_.id,
        "federation_id": round_.federation_id,
        "number": round_.number,
        "state": round_.state.value,
        "participants": list(round_.participants),
        "target_updates": round_.target_updates,
        "created_at": round_.created_at,
        "opened_at": round_.opened_at,
        "deadline_at": round_.deadline_at,
        "closed_at": round_.closed_at,
        "failure_reason": round_.failure_reason,
        "base_version_id": round_.base_version_id,
        "version_id": round_.version_id,
        "metrics": encode_metrics(round_.metrics),
    }


def to_round(row: RoundRow | Row[Any]) -> Round:
    return Round(
        id=row.id,
        federation_id=row.federation_id,
        number=row.number,
        state=RoundState(row.state),
        participants=list(row.participants),
        target_updates=row.target_updates,
        created_at=row.created_at,
        opened_at=row.opened_at,
        deadline_at=row.deadline_at,
        closed_at=row.closed_at,
        failure_reason=row.failure_reason,
        base_version_id=row.base_version_id,
        version_id=row.version_id,
        metrics=decode_metrics(row.metrics),
    )


def update_values(update: Update) -> dict[str, Any]:
    return {
        "id": update.id,
        "round_id": update.round_id,
        "device_id": update.device_id,
        "upload_id": update.upload_id,
        "state": update.state.value,
        "codec": update.codec,
        "declared_size": update.declared_size,
        "received_bytes": update.received_bytes,
        "sha256": update.sha256,
        "blob_key": update.blob_key,
        "modalities": encode_modalities(update.modalities),
        "public_samples": update.public_samples,
        "private_samples": update.private_samples,
        "base_version_id": update.base_version_id,
        "rejection_reason": update.rejection_reason,
        "metrics": encode_metrics(update.metrics),
        "fused_sample_ids": [int(i) for i in update.fused_sample_ids],
        "anchor_agreement": update.anchor_agreement,
        "created_at": update.created_at,
        "accepted_at": update.accepted_at,
    }


def to_update(row: UpdateRow | Row[Any]) -> Update:
    return Update(
        id=row.id,
        round_id=row.round_id,
        device_id=row.device_id,
        upload_id=row.upload_id,
        state=UpdateState(row.state),
        codec=row.codec,
        declared_size=row.declared_size,
        received_bytes=row.received_bytes,
        sha256=row.sha256,
        blob_key=row.blob_key,
        modalities=decode_modalities(row.modalities),
        public_samples=row.public_samples,
        private_samples=row.private_samples,
        base_version_id=row.base_version_id,
        rejection_reason=row.rejection_reason,
        metrics=decode_metrics(row.metrics),
        fused_sample_ids=[int(i) for i in (row.fused_sample_ids or [])],
        anchor_agreement=row.anchor_agreement,
        created_at=row.created_at,
        accepted_at=row.accepted_at,
    )


def version_values(version: ModelVersion) -> dict[str, Any]:
    return {
        "id": version.id,
        "federation_id": version.federation_id,
        "round_number": version.round_number,
        "codec": version.codec,
        "adapter_key": version.adapter_key,
        "adapter_sha256": version.adapter_sha256,
        "adapter_size": version.adapter_size,
        "anchors_key": version.anchors_key,
        "anchors_sha256": version.anchors_sha256,
        "anchors_size": version.anchors_size,
        "metrics": encode_metrics(version.metrics),
        "created_at": version.created_at,
        "cloud_state": version.cloud_state.value,
        "cloud_attempts": version.cloud_attempts,
        "cloud_enqueued_at": version.cloud_enqueued_at,
        "cloud_finished_at": version.cloud_finished_at,
        "cloud_error": version.cloud_error,
        "fused_key": version.fused_key,
        **generated_anchor_values(version.generated_anchors),
    }


def generated_anchor_values(ref: BlobRef | None) -> dict[str, Any]:
    return {"generated_anchors_key": None if ref is None else ref.key,
            "generated_anchors_sha256": None if ref is None else ref.sha256,
            "generated_anchors_size": None if ref is None else ref.size}


def to_version(row: ModelVersionRow | Row[Any]) -> ModelVersion:
    return ModelVersion(
        id=row.id,
        federation_id=row.federation_id,
        round_number=row.round_number,
        codec=row.codec,
        adapter_key=row.adapter_key,
        adapter_sha256=row.adapter_sha256,
        adapter_size=row.adapter_size,
        anchors_key=row.anchors_key,
        anchors_sha256=row.anchors_sha256,
        anchors_size=row.anchors_size,
        metrics=decode_metrics(row.metrics),
        created_at=row.created_at,
        cloud_state=CloudState(row.cloud_state),
        cloud_attempts=row.cloud_attempts,
        cloud_enqueued_at=row.cloud_enqueued_at,
        cloud_finished_at=row.cloud_finished_at,
        cloud_error=row.cloud_error,
        fused_key=row.fused_key,
        generated_anchors=None if row.generated_anchors_key is None else BlobRef(
            row.generated_anchors_key, row.generated_anchors_sha256 or "", row.generated_anchors_size or 0),
    )


def report_values(report: DeviceReport) -> dict[str, Any]:
    return {
        "round_id": report.round_id,
        "device_id": report.device_id,
        "metrics": encode_metrics(report.metrics),
        "reported_at": report.reported_at,
    }


def to_report(row: DeviceReportRow) -> DeviceReport:
    return DeviceReport(
        round_id=row.round_id,
        device_id=row.device_id,
        metrics=decode_metrics(row.metrics),
        reported_at=row.reported_at,
    )


def admin_token_values(token: AdminToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "name": token.name,
        "token_hash": token.token_hash,
        "scopes": sorted(scope.value for scope in token.scopes),
        "created_by": token.created_by,
        "created_at": token.created_at,
        "expires_at": token.expires_at,
        "revoked_at": token.revoked_at,
        "last_used_at": token.last_used_at,
    }


def to_admin_token(row: AdminTokenRow | Row[Any]) -> AdminToken:
    known = {scope.value for scope in AdminScope}
    return AdminToken(
        id=row.id,
        name=row.name,
        token_hash=row.token_hash,
        # A scope a newer coordinator wrote grants nothing here (least privilege) rather than failing the read.
        scopes=frozenset(AdminScope(value) for value in row.scopes if value in known),
        created_by=row.created_by,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


def audit_values(entry: AuditEntry) -> dict[str, Any]:
    # The id is left to the database (autoincrement), so entries are numbered in the order written.
    return {
        "at": entry.at,
        "actor_id": entry.actor_id,
        "actor_name": entry.actor_name,
        "action": entry.action,
        "method": entry.method,
        "path": entry.path,
        "status": entry.status,
        "outcome": entry.outcome.value,
        "detail": entry.detail,
    }


def to_audit_entry(row: AuditEntryRow) -> AuditEntry:
    return AuditEntry(
        id=row.id,
        at=row.at,
        actor_id=row.actor_id,
        actor_name=row.actor_name,
        action=row.action,
        method=row.method,
        path=row.path,
        status=row.status,
        outcome=AuditOutcome(row.outcome),
        detail=row.detail,
    )


def refusal_values(refusal: Refusal) -> dict[str, Any]:
    # The id is left to the database (autoincrement), as for audit entries.
    return {
        "at": refusal.at,
        "federation_id": refusal.federation_id,
        "device_id": refusal.device_id,
        "round_id": refusal.round_id,
        "method": refusal.method,
        "reason": refusal.reason,
        "detail": refusal.detail,
    }


def to_refusal(row: RefusalRow) -> Refusal:
    return Refusal(
        id=row.id,
        at=row.at,
        federation_id=row.federation_id,
        device_id=row.device_id,
        round_id=row.round_id,
        method=row.method,
        reason=row.reason,
        detail=row.detail,
    )
