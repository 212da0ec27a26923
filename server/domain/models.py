"""Plain records the coordinator works with. No I/O; persistence maps them to rows."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from server.domain.federation_config import FederationConfig
from server.domain.rounds import RoundState


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class FederationState(StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"    # opens no new rounds and gives devices Wait; resumable
    STOPPED = "stopped"  # terminal: devices are told to stop
    COMPLETED = "completed"  # terminal: it committed its target_rounds; devices are told to stop

    @property
    def is_final(self) -> bool:
        """Stopped or completed: no rounds, no enrolment, devices told to stop; it never changes again."""
        return self in (FederationState.STOPPED, FederationState.COMPLETED)


class CloudState(StrEnum):
    """The cloud work a version owes (``server.services.cloud_work``): cloud tuning, anchor generation and the
    version's evaluation, run by a worker after the round committed."""

    NONE = "none"        # nothing owed: version 0 (evaluated at creation) or a federation without server learning
    PENDING = "pending"  # queued or running; retried until done or out of attempts
    DONE = "done"
    FAILED = "failed"    # out of attempts: the version keeps the anchors it had, and is not evaluated

    @property
    def is_settled(self) -> bool:
        return self is not CloudState.PENDING


class UpdateState(StrEnum):
    PARTIAL = "partial"      # bytes still arriving; resumable
    ACCEPTED = "accepted"    # validated, durable, counted for its round
    REJECTED = "rejected"    # failed validation; reason recorded


MAX_REPORTED_METRICS = 64
MAX_METRIC_NAME = 64


def reported_metrics_problem(values: dict[str, float]) -> str | None:
    """Why metrics a device reports (in an upload header or a report) cannot be stored, or None."""
    if len(values) > MAX_REPORTED_METRICS:
        return f"metrics: {len(values)} values, at most {MAX_REPORTED_METRICS}"
    for name, value in values.items():
        if not name or len(name) > MAX_METRIC_NAME:
            return f"metrics: name {name[:MAX_METRIC_NAME]!r} must be 1-{MAX_METRIC_NAME} characters"
        if not math.isfinite(value):
            return f"metrics: {name!r} is {value}, not a finite number"
    return None


@dataclass
class Federation:
    name: str
    config: FederationConfig
    id: str = field(default_factory=new_id)
    state: FederationState = FederationState.ACTIVE
    current_version_id: str | None = None
    created_at: datetime = field(default_factory=utcnow)


@dataclass
class Device:
    federation_id: str
    name: str
    modalities: frozenset[str]
    secret_hash: str
    id: str = field(default_factory=new_id)
    enrolled_at: datetime = field(default_factory=utcnow)
    last_seen_at: datetime | None = None
    revoked: bool = False


@dataclass
class Round:
    federation_id: str
    number: int
    id: str = field(default_factory=new_id)
    state: RoundState = RoundState.CREATED
    participants: list[str] = field(default_factory=list)
    """Devices invited (sync mode) or eligible and live when the round opened (async mode)."""
    target_updates: int = 0
    """The round commits as soon as this many updates are accepted (0: when every participant's is)."""
    created_at: datetime = field(default_factory=utcnow)
    opened_at: datetime | None = None
    deadline_at: datetime | None = None
    closed_at: datetime | None = None
    failure_reason: str | None = None
    base_version_id: str | None = None
    version_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def update_target(self) -> int:
        """How many accepted updates close the round at once."""
        return self.target_updates or len(self.participants)


@dataclass
class Update:
    round_id: str
    device_id: str
    upload_id: str
    codec: str
    declared_size: int
    sha256: str
    modalities: frozenset[str]
    public_samples: int
    private_samples: int
    id: str = field(default_factory=new_id)
    state: UpdateState = UpdateState.PARTIAL
    received_bytes: int = 0
    blob_key: str | None = None
    base_version_id: str | None = None
    rejection_reason: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    fused_sample_ids: list[int] = field(default_factory=list)
    """Public sample ids of the rows of the update's ``fused.z`` tensor (empty: none uploaded)."""
    anchor_agreement: float | None = None
    """Set by the coordinator at acceptance: mean cosine of ``fused.z`` to the base version's anchors."""
    created_at: datetime = field(default_factory=utcnow)
    accepted_at: datetime | None = None


@dataclass
class ModelVersion:
    federation_id: str
    round_number: int
    codec: str
    adapter_key: str
    adapter_sha256: str
    adapter_size: int
    anchors_key: str | None = None
    anchors_sha256: str | None = None
    anchors_size: int = 0
    """The anchors devices train against from this version. None only while a federation with
    ``anchors = "wait"`` waits for this version's cloud work to generate them."""
    id: str = field(default_factory=new_id)
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utcnow)
    cloud_state: CloudState = CloudState.NONE
    cloud_attempts: int = 0
    cloud_enqueued_at: datetime | None = None
    """When the cloud job was last put on the queue, or last said to be running by its worker: a pending job
    not heard of for ``cloud_job_timeout_s`` is put on the queue again (the queue forgets a job its worker
    died running)."""
    cloud_finished_at: datetime | None = None
    cloud_error: str | None = None
    fused_key: str | None = None
    """Blob of the public sample ids and fused z the round's kept updates carried: the cloud job's input."""
    generated_anchors: BlobRef | None = None
    """The anchors this version's cloud work generated, for the versions after it."""


@dataclass(frozen=True)
class BlobRef:
    """Where a blob is and what it holds: its key in the blob store, its sha256 and its size."""

    key: str
    sha256: str
    size: int


@dataclass(frozen=True)
class CloudOutcome:
    """What a version's cloud job produced (``state`` done), or why it gave up (failed)."""

    state: CloudState
    generated_anchors: BlobRef | None = None
    anchors_if_unset: BlobRef | None = None
    """The anchors the version carries if it has none yet (a federation waiting for them)."""
    version_metrics: dict[str, float] = field(default_factory=dict)
    round_metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    finished_at: datetime = field(default_factory=utcnow)


@dataclass(frozen=True)
class Fence:
    """Proof of holding a lease: writes that present it succeed only while ``token`` is still current."""

    lease: str
    holder: str
    token: int


@dataclass(frozen=True)
class Acceptance:
    """An update just accepted: its round as stored, and how many updates the round has accepted (this one
    included), counted in the transaction that accepted it."""

    round: Round
    accepted: int


@dataclass(frozen=True)
class UploadView:
    """What opening an upload needs, read together: the device's update with this upload id (in whichever
    round it landed; None for a new upload) and the round the device names (None if there is no such round)."""

    existing: Update | None
    round: Round | None


@dataclass(frozen=True)
class TaskView:
    """What deciding one device's task needs, read together: its federation, the federation's latest
    round, and whether the device already has an update accepted in that round."""

    federation: Federation
    latest_round: Round | None
    accepted: bool


@dataclass
class DeviceReport:
    """Metrics a device reported for a round (e.g. personalised accuracy)."""

    round_id: str
    device_id: str
    metrics: dict[str, float]
    reported_at: datetime = field(default_factory=utcnow)


@dataclass
class EnrolmentToken:
    """A one-time token an operator hands to a device so it can enrol in one federation. Only the sha256 of
    the token is kept; the plaintext is shown once, when it is issued."""

    federation_id: str
    token_hash: str
    created_by: str
    expires_at: datetime
    device_name: str | None = None
    """When set, only the device of this name may use the token (and it may re-enrol an existing device of
    that name); otherwise it enrols one new device of any name."""
    id: str = field(default_factory=new_id)
    created_at: datetime = field(default_factory=utcnow)
    used_at: datetime | None = None
    used_by_device_id: str | None = None

    def refusal(self, federation_id: str, device_name: str, now: datetime) -> str | None:
        """Why this token cannot enrol ``device_name`` in ``federation_id`` now; None when it can."""
        if self.federation_id != federation_id:
            return "the enrolment token is for another federation"
        if self.used_at is not None:
            return f"the enrolment token was already used (at {self.used_at.isoformat(timespec='seconds')})"
        if self.expires_at <= now:
            return f"the enrolment token expired at {self.expires_at.isoformat(timespec='seconds')}"
        if self.device_name is not None and self.device_name != device_name:
            return f"the enrolment token is for device {self.device_name!r}, not {device_name!r}"
        return None


class AdminScope(StrEnum):
    """What an admin token may do. Each scope includes the ones before it: admin ⊇ operate ⊇ read."""

    READ = "read"        # every GET
    OPERATE = "operate"  # create, pause, resume and stop federations; launch rounds; issue enrolment tokens
    ADMIN = "admin"      # admin tokens, device revocation, version promotion, the audit log

    def includes(self, other: AdminScope) -> bool:
        order = list(AdminScope)
        return order.index(self) >= order.index(other)


@dataclass
class AdminToken:
    """A bearer token for the admin API. Only the sha256 of the token is kept; the plaintext is shown once."""

    name: str
    token_hash: str
    scopes: frozenset[AdminScope]
    created_by: str
    id: str = field(default_factory=new_id)
    created_at: datetime = field(default_factory=utcnow)
    expires_at: datetime | None = None
    """None: never expires (until revoked)."""
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None
    """Written at most once a minute or so (see ``AdminTokenService``), not on every request."""

    def grants(self, scope: AdminScope) -> bool:
        return any(held.includes(scope) for held in self.scopes)


class AuditOutcome(StrEnum):
    OK = "ok"            # 2xx / 3xx
    REFUSED = "refused"  # 4xx: unauthenticated, not allowed, invalid or conflicting
    ERROR = "error"      # 5xx: the coordinator failed (or a dependency was down)

    @classmethod
    def of_status(cls, status: int) -> AuditOutcome:
        return cls.OK if status < 400 else cls.REFUSED if status < 500 else cls.ERROR


@dataclass
class AuditEntry:
    """One admin action: who (token id and name, or "anonymous"), what, when, and how it ended."""

    actor_id: str | None
    actor_name: str
    action: str
    """The operation, e.g. ``federations.stop``; ``unknown`` for a path no operation serves."""
    method: str
    path: str
    status: int
    outcome: AuditOutcome
    detail: str | None = None
    at: datetime = field(default_factory=utcnow)
    id: int | None = None
    """Assigned by the store (ascending)."""


@dataclass
class Refusal:
    """A device request the coordinator refused on purpose (invalid update, rate limit, identity), kept for
    operators. The ids are what the request named or proved, when known; none has to exist."""

    method: str
    """The RPC, e.g. ``UploadUpdate``."""
    reason: str
    """A short, bounded code (``checksum``, ``norm_bound``, ``rate_limited``, ``permission_denied`` ...)."""
    detail: str
    federation_id: str | None = None
    device_id: str | None = None
    round_id: str | None = None
    at: datetime = field(default_factory=utcnow)
    id: int | None = None
    """Assigned by the store (ascending)."""
