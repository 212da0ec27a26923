"""Request and response bodies of the admin API (pydantic). Only the transport layer sees these."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.domain.errors import InvalidRequestError
from server.domain.federation_config import FederationConfig
from server.domain.models import Device, EnrolmentToken, Federation, ModelVersion, Refusal, Round
from server.services.inspection import Participation, RoundMetrics
from server.transport.config_schema import federation_config_body


class JsonBody(BaseModel):
    """A request body validated as its JSON Schema reads: `true` or "2" is no number (pydantic would take both),
    while 2.0 is an integer and 2 a number, as JSON Schema has it. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_numbers_are_integers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        whole = {name: int(value) for name, value in data.items()
                 if isinstance(value, float) and value.is_integer() and name in cls.model_fields
                 and _takes_int(cls.model_fields[name].annotation)}
        return {**data, **whole} if whole else data


def _takes_int(annotation: Any) -> bool:
    return annotation is int or int in get_args(annotation)


class FederationConfigBase(JsonBody):
    """How the federation learns; every field has a working default. Numbers carry the bounds the coordinator
    enforces (``CONFIG_BOUNDS``): a value out of them is a 422 naming the field."""

    def to_domain(self) -> FederationConfig:
        try:
            return FederationConfig(**self.model_dump())
        except ValueError as exc:  # cross-field rules the schema cannot express
            raise InvalidRequestError(f"invalid federation config: {exc}") from exc


if TYPE_CHECKING:
    class FederationConfigBody(FederationConfigBase):
        """``FederationConfig``'s fields, added at import (``server.transport.config_schema``)."""
else:
    FederationConfigBody = federation_config_body(FederationConfigBase)


class CreateFederationBody(JsonBody):
    model_config = ConfigDict(json_schema_extra={
        "examples": [{"name": "avmnist-demo", "config": {"aggregation": "mma", "min_updates": 2}}]})

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    config: FederationConfigBody = Field(default_factory=FederationConfigBody)


class FederationOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": "5e1d0c7a9b2f4e6d8a1c3b5d7f9e0a2c", "name": "avmnist-demo", "state": "active",
         "current_version_id": "77aa0c7a9b2f4e6d8a1c3b5d7f9e0a2c", "created_at": "2026-01-05T09:00:00Z",
         "config": {"aggregation": "mma", "min_updates": 2, "mode": "sync"}}]})

    id: str
    name: str
    state: Literal["active", "paused", "stopped", "completed"]
    current_version_id: str | None = Field(description="The version the next round starts from")
    created_at: datetime
    config: dict[str, Any]

    @classmethod
    def of(cls, f: Federation) -> FederationOut:
        return cls(id=f.id, name=f.name, state=f.state.value, current_version_id=f.current_version_id,
                   created_at=f.created_at, config=FederationConfigBody(**vars(f.config)).model_dump())


class RoundOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": "9a7b0c7a9b2f4e6d8a1c3b5d7f9e0a2c", "federation_id": "5e1d0c7a9b2f4e6d8a1c3b5d7f9e0a2c", "number": 3,
         "state": "committed", "participants": ["c0ffee00c0ffee00c0ffee00c0ffee00"], "target_updates": 1,
         "created_at": "2026-01-06T14:05:00Z", "opened_at": "2026-01-06T14:05:00Z",
         "deadline_at": "2026-01-06T14:15:00Z", "closed_at": "2026-01-06T14:05:14Z", "failure_reason": None,
         "base_version_id": "66aa0c7a9b2f4e6d8a1c3b5d7f9e0a2c", "version_id": "77aa0c7a9b2f4e6d8a1c3b5d7f9e0a2c",
         "metrics": {"participants": 1.0, "global_accuracy": 0.94}}]})

    id: str
    federation_id: str
    number: int
    state: str
    participants: list[str]
    target_updates: int
    created_at: datetime
    opened_at: datetime | None
    deadline_at: datetime | None
    closed_at: datetime | None
    failure_reason: str | None
    base_version_id: str | None
    version_id: str | None
    metrics: dict[str, float]

    @classmethod
    def of(cls, r: Round) -> RoundOut:
        return cls(id=r.id, federation_id=r.federation_id, number=r.number, state=r.state.value,
                   participants=list(r.participants), target_updates=r.target_updates,
                   created_at=r.created_at, opened_at=r.opened_at,
                   deadline_at=r.deadline_at, closed_at=r.closed_at, failure_reason=r.failure_reason,
                   base_version_id=r.base_version_id, version_id=r.version_id, metrics=dict(r.metrics))


class DeviceOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": "c0ffee00c0ffee00c0ffee00c0ffee00", "federation_id": "5e1d0c7a9b2f4e6d8a1c3b5d7f9e0a2c",
         "name": "camera-17", "modalities": ["audio", "image"], "online": True, "revoked": False,
         "enrolled_at": "2026-01-05T09:10:00Z", "last_seen_at": "2026-01-06T14:05:30Z"}]})

    id: str
    federation_id: str
    name: str
    modalities: list[str] = Field(description="The device's modality set")
    online: bool
    revoked: bool
    enrolled_at: datetime
    last_seen_at: datetime | None

    @classmethod
    def of(cls, d: Device, online: bool) -> DeviceOut:
        return cls(id=d.id, federation_id=d.federation_id, name=d.name, modalities=sorted(d.modalities),
                   online=online, revoked=d.revoked, enrolled_at=d.enrolled_at, last_seen_at=d.last_seen_at)


class VersionOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": "77aa0c7a9b2f4e6d8a1c3b5d7f9e0a2c", "federation_id": "5e1d0c7a9b2f4e6d8a1c3b5d7f9e0a2c",
         "round_number": 3, "codec": "fp32", "adapter_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c"
         "15b0f00a08", "adapter_size": 626104, "anchors_size": 40960, "metrics": {"accuracy": 0.9433},
         "created_at": "2026-01-06T14:05:14Z", "cloud_state": "done", "cloud_attempts": 1, "cloud_error": None,
         "cloud_finished_at": "2026-01-06T14:05:19Z"}]})

    id: str
    federation_id: str
    round_number: int
    codec: str
    adapter_sha256: str
    adapter_size: int
    anchors_size: int = Field(description="0 while the version waits for its anchors (federation anchors = wait)")
    metrics: dict[str, float] = Field(description="The version's evaluation: filled in when its cloud work is done")
    created_at: datetime
    cloud_state: str = Field(description="The version's cloud work (tuning, anchors, evaluation): none (nothing "
                                         "owed), pending (queued or running), done, or failed (out of attempts)")
    cloud_attempts: int
    cloud_error: str | None = Field(description="Why the last attempt failed, once the version's work failed")
    cloud_finished_at: datetime | None

    @classmethod
    def of(cls, v: ModelVersion) -> VersionOut:
        return cls(id=v.id, federation_id=v.federation_id, round_number=v.round_number, codec=v.codec,
                   adapter_sha256=v.adapter_sha256, adapter_size=v.adapter_size, anchors_size=v.anchors_size,
                   metrics=dict(v.metrics), created_at=v.created_at, cloud_state=v.cloud_state.value,
                   cloud_attempts=v.cloud_attempts, cloud_error=v.cloud_error, cloud_finished_at=v.cloud_finished_at)


class ParticipantOut(BaseModel):
    """One device's part in a round."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"device_id": "c0ffee00c0ffee00c0ffee00c0ffee00", "device_name": "camera-17", "invited": True, "uploads": 1,
         "update_state": "accepted", "received_bytes": 271380, "declared_size": 271380, "modalities": ["image"],
         "accepted_at": "2026-01-06T14:05:09Z", "rejection_reason": None, "anchor_agreement": 0.82,
         "reported": {"personal_accuracy": 0.79}, "reported_at": "2026-01-06T14:05:30Z"}]})

    device_id: str
    device_name: str | None
    invited: bool = Field(description="Invited when the round opened (async rounds take any eligible device)")
    uploads: int = Field(description="Uploads the device started in this round")
    update_state: Literal["partial", "accepted", "rejected"] | None = Field(
        description="The upload that counts: accepted, else still arriving, else rejected; null: none")
    received_bytes: int | None
    declared_size: int | None
    modalities: list[str]
    accepted_at: datetime | None
    rejection_reason: str | None
    anchor_agreement: float | None = Field(description="Mean cosine of the update's fused z to the base anchors")
    reported: dict[str, float] = Field(description="The device's latest report for the round")
    reported_at: datetime | None

    @classmethod
    def of(cls, p: Participation) -> ParticipantOut:
        u = p.update
        return cls(device_id=p.device_id, device_name=p.device_name, invited=p.invited, uploads=p.uploads,
                   update_state=None if u is None else u.state.value,
                   received_bytes=None if u is None else u.received_bytes,
                   declared_size=None if u is None else u.declared_size,
                   modalities=[] if u is None else sorted(u.modalities),
                   accepted_at=None if u is None else u.accepted_at,
                   rejection_reason=None if u is None else u.rejection_reason,
                   anchor_agreement=None if u is None else u.anchor_agreement,
                   reported=dict(p.reported), reported_at=p.reported_at)


class RefusalOut(BaseModel):
    """A device request the coordinator refused on purpose."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": 7, "at": "2026-01-06T14:05:02Z", "method": "UploadUpdate", "reason": "norm_bound",
         "detail": "update rejected (norm_bound): the delta's L2 norm 310.2 exceeds 20.0",
         "federation_id": "5e1d...", "device_id": "c0ffee00c0ffee00c0ffee00c0ffee00", "round_id": "9a7b..."}]})

    id: int
    at: datetime
    method: str
    reason: str
    detail: str
    federation_id: str | None
    device_id: str | None
    round_id: str | None

    @classmethod
    def of(cls, r: Refusal) -> RefusalOut:
        assert r.id is not None  # refusals read back from the store always carry their id
        return cls(id=r.id, at=r.at, method=r.method, reason=r.reason, detail=r.detail,
                   federation_id=r.federation_id, device_id=r.device_id, round_id=r.round_id)


class RoundMetricsOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"round_id": "9a7b...", "federation_id": "5e1d...", "number": 3, "state": "committed",
         "metrics": {"participants": 3.0, "global_accuracy": 0.9433, "client_accuracy_mean": 0.8447, "wall_s": 14.5},
         "version_id": "77aa...", "version_metrics": {"accuracy": 0.9433, "cloud_accuracy": 0.93},
         "device_reports": {"c0ffee00c0ffee00c0ffee00c0ffee00": {"personal_accuracy": 0.79}}}]})

    round_id: str
    federation_id: str
    number: int
    state: str
    metrics: dict[str, float] = Field(description="The round's own metrics (set when it commits)")
    version_id: str | None
    version_metrics: dict[str, float] = Field(description="The committed version's server-side evaluation")
    device_reports: dict[str, dict[str, float]] = Field(description="Device id -> its latest report for the round")

    @classmethod
    def of(cls, m: RoundMetrics) -> RoundMetricsOut:
        r = m.round
        return cls(round_id=r.id, federation_id=r.federation_id, number=r.number, state=r.state.value,
                   metrics=dict(r.metrics), version_id=r.version_id,
                   version_metrics={} if m.version is None else dict(m.version.metrics),
                   device_reports={k: dict(v) for k, v in m.reports.items()})


class CreateEnrolmentTokenBody(JsonBody):
    model_config = ConfigDict(json_schema_extra={
        "examples": [{"device_name": "camera-17", "expires_in_hours": 24}, {"expires_in_hours": 1}]})

    device_name: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[^\s\x00]([^\x00\n\r]*[^\s\x00])?$",
                                    description="Only this device may use it (and may re-enrol with it); null: any "
                                                "one new device")
    expires_in_hours: float = Field(24.0, gt=0, le=720, allow_inf_nan=False,
                                    description="Unused after this long, the token stops working")


class EnrolmentTokenOut(BaseModel):
    """A one-time enrolment token as listed: never its plaintext or digest."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": "e1e1...", "federation_id": "5e1d0c7a9b2f4e6d8a1c3b5d7f9e0a2c", "device_name": "camera-17",
         "created_by": "token:ops (3f1c...)", "created_at": "2026-01-05T09:00:00Z",
         "expires_at": "2026-01-06T09:00:00Z", "used_at": None, "used_by_device_id": None, "state": "unused"}]})

    id: str
    federation_id: str
    device_name: str | None
    created_by: str
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    used_by_device_id: str | None
    state: Literal["unused", "used", "expired"]

    @classmethod
    def of(cls, t: EnrolmentToken, now: datetime) -> EnrolmentTokenOut:
        state: Literal["unused", "used", "expired"] = (
            "used" if t.used_at is not None else "expired" if t.expires_at <= now else "unused")
        return cls(id=t.id, federation_id=t.federation_id, device_name=t.device_name, created_by=t.created_by,
                   created_at=t.created_at, expires_at=t.expires_at, used_at=t.used_at,
                   used_by_device_id=t.used_by_device_id, state=state)


class IssuedEnrolmentTokenOut(EnrolmentTokenOut):
    """A new enrolment token: ``token`` is the plaintext, shown this once; hand it to the device."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": "e1e1...", "federation_id": "5e1d0c7a9b2f4e6d8a1c3b5d7f9e0a2c", "device_name": "camera-17",
         "created_by": "token:ops (3f1c...)", "created_at": "2026-01-05T09:00:00Z",
         "expires_at": "2026-01-06T09:00:00Z", "used_at": None, "used_by_device_id": None, "state": "unused",
         "token": "mlecs_enrol_Vx0..."}]})

    token: str
