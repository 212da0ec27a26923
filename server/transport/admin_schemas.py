"""Request and response bodies of the admin API (pydantic). Only the transport layer sees these."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.domain.errors import InvalidRequestError
from server.domain.models import Device, Federation, FederationConfig, ModelVersion, Round


class FederationConfigBody(BaseModel):
    """How the federation learns; every field has a working default."""

    model_config = ConfigDict(extra="forbid")

    aggregation: Literal["mma", "fedavg"] = "mma"
    lora_mode: Literal["separate", "exact"] = Field(
        "separate", description="LoRA factors averaged separately, or exact: average of B·A re-factorised to rank r")
    clients_per_round: int = Field(0, ge=0, description="Devices invited per round; 0 = every live device")
    min_updates: int = Field(1, ge=1, description="Quorum of accepted updates needed to commit")
    round_deadline_s: float = Field(600.0, gt=0)
    public_epochs: int = Field(5, ge=0)
    private_epochs: int = Field(1, ge=0)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0, lt=1)
    upload_codec: Literal["fp32", "fp16", "int8"] = "fp16"
    max_chunk_bytes: int = Field(256 * 1024, ge=1024, le=4 * 1024 * 1024)
    seed: int = 0
    model: dict[str, Any] = Field(default_factory=dict, description="ModelConfig overrides, e.g. {\"lora_rank\": 8}")
    ccl_weight: float = Field(0.1, ge=0, description="CCL (cross-modal volume loss) weight; 0 turns it off")
    ccl_temperature: float = Field(0.1, gt=0)
    seccl_weight: float = Field(0.5, ge=0, description="SE-CCL anchor-alignment weight; 0 turns SE-CCL off")
    seccl_temperature: float = Field(0.1, gt=0)
    fused_upload_samples: int = Field(32, ge=0, le=256,
                                      description="Public samples whose fused z each device uploads")
    agreement_temperature: float = Field(0.2, ge=0.01, description="MMA noise term: softness of the agreement weights")
    cloud_epochs: int = Field(1, ge=0, description="Cloud tuning epochs on the public set per round")
    public_fraction: float = Field(0.2, gt=0, lt=1, description="Share of the training pairs forming the public set")
    mode: Literal["sync", "async"] = Field(
        "sync", description="sync: rounds with over-selection, quorum and deadline; async: buffered (FedBuff)")
    overselect: float = Field(0.0, ge=0, le=10, description="Sync: invite ceil(clients_per_round x (1 + this))")
    async_buffer: int = Field(4, ge=1, description="Async: accepted updates per aggregation (K)")
    max_staleness: int = Field(4, ge=0, description="Async: refuse updates more than this many versions old")
    staleness_exponent: float = Field(0.5, ge=0, description="Async: weight (1 + staleness) ** -this")
    eligible_modality_sets: list[list[str]] = Field(
        default_factory=list, description="Only devices with one of these modality sets take part; empty: all",
        examples=[[["audio", "image"], ["image"]]])
    target_rounds: int = Field(0, ge=0, description="Open rounds automatically until this many committed; 0: manual")
    server_learning: bool = Field(
        True, description="Evaluate, tune the cloud model and make anchors after each commit (off: aggregation only)")
    clip_norm: float = Field(0.0, ge=0, description="Scale each update's delta to at most this L2 norm; 0: off",
                             examples=[5.0])
    robust_rule: Literal["none", "median", "trimmed_mean"] = Field(
        "none", description="Coordinate-wise weighted median or trimmed mean instead of the weighted mean")
    trim_fraction: float = Field(0.1, ge=0, lt=0.5, description="trimmed_mean: weight share cut from each end")
    exclude_above: float = Field(
        0.0, ge=0, description="With a robust rule: leave out updates farther than this many times the median "
                               "distance from the coordinate-wise median; 0: off", examples=[3.0])

    def to_domain(self) -> FederationConfig:
        try:
            return FederationConfig(**self.model_dump())
        except ValueError as exc:  # cross-field rules the schema cannot express
            raise InvalidRequestError(f"invalid federation config: {exc}") from exc


class CreateFederationBody(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"name": "avmnist-demo", "config": {"aggregation": "mma", "min_updates": 2}}]})

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    config: FederationConfigBody = Field(default_factory=FederationConfigBody)


class FederationOut(BaseModel):
    id: str
    name: str
    state: str
    current_version_id: str | None
    created_at: datetime
    config: dict[str, Any]

    @classmethod
    def of(cls, f: Federation) -> FederationOut:
        return cls(id=f.id, name=f.name, state=f.state.value, current_version_id=f.current_version_id,
                   created_at=f.created_at, config=FederationConfigBody(**vars(f.config)).model_dump())


class RoundOut(BaseModel):
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
    id: str
    name: str
    modalities: list[str]
    online: bool
    revoked: bool
    enrolled_at: datetime
    last_seen_at: datetime | None

    @classmethod
    def of(cls, d: Device, online: bool) -> DeviceOut:
        return cls(id=d.id, name=d.name, modalities=sorted(d.modalities), online=online, revoked=d.revoked,
                   enrolled_at=d.enrolled_at, last_seen_at=d.last_seen_at)


class VersionOut(BaseModel):
    id: str
    federation_id: str
    round_number: int
    codec: str
    adapter_sha256: str
    adapter_size: int
    anchors_size: int
    metrics: dict[str, float]
    created_at: datetime

    @classmethod
    def of(cls, v: ModelVersion) -> VersionOut:
        return cls(id=v.id, federation_id=v.federation_id, round_number=v.round_number, codec=v.codec,
                   adapter_sha256=v.adapter_sha256, adapter_size=v.adapter_size, anchors_size=v.anchors_size,
                   metrics=dict(v.metrics), created_at=v.created_at)
