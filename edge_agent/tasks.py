"""What the coordinator asks of the agent and what the agent sends, in the agent's own terms."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlecs.datasets.public_shard import SampleFingerprint


@dataclass(frozen=True)
class TrainTask:
    round_id: str
    round_number: int
    version_id: str
    public_epochs: int
    private_epochs: int
    batch_size: int
    learning_rate: float
    upload_codec: str
    max_chunk_bytes: int
    seed: int
    model: dict[str, Any]
    ccl_weight: float = 0.0
    ccl_temperature: float = 0.1
    seccl_weight: float = 0.0
    seccl_temperature: float = 0.1
    fused_upload_samples: int = 0
    upload_stage: str = "private"
    """``private``: the upload is learned on private data + public shard; ``public``: on the public shard."""
    personal_epochs: int = 1


@dataclass(frozen=True)
class Wait:
    seconds: int
    reason: str


@dataclass(frozen=True)
class Stop:
    reason: str


@dataclass(frozen=True)
class GlobalVersion:
    version_id: str
    round_number: int
    adapter: bytes
    anchors: bytes


@dataclass(frozen=True)
class PublicShard:
    """The coordinator's answer to a public-shard download."""

    held: bool
    """False: the coordinator holds no public set for the federation (or predates public shards)."""
    sha256: str = ""
    samples: int = 0
    archive: bytes | None = None
    """The archive, checked against ``sha256``; None when ``held`` is False or the cached shard is current."""


@dataclass(frozen=True)
class PublicCopyCheck:
    """The coordinator's verdict on this device's own copy of the public set."""

    held: bool
    """False: it holds no public set to check against."""
    verified: int = 0
    mismatches: list[tuple[str, str]] = field(default_factory=list)
    """(sample id, why it is not the coordinator's sample)."""


@dataclass(frozen=True)
class UploadRequest:
    round_id: str
    device_id: str
    upload_id: str
    codec: str
    sha256: str
    modalities: list[str]
    public_samples: int
    private_samples: int
    base_version_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    fused_sample_ids: list[int] = field(default_factory=list)


class Coordinator(Protocol):
    """The calls the agent makes; ``edge_agent.client.CoordinatorClient`` implements them over gRPC."""

    def authenticate(self, device_id: str, secret: str) -> None: ...
    def enrol(self, federation: str, device_name: str, modalities: list[str],
              enrolment_token: str = "") -> tuple[str, str, int]: ...
    def heartbeat(self, device_id: str) -> int: ...
    def get_task(self, device_id: str) -> TrainTask | Wait | Stop: ...
    def download_global(self, device_id: str, version_id: str = "") -> GlobalVersion: ...
    def upload_status(self, device_id: str, round_id: str, upload_id: str) -> tuple[str, int]: ...
    def upload(self, request: UploadRequest, payload: bytes, resume_offset: int,
               chunk_bytes: int) -> tuple[str, int]: ...
    def report_metrics(self, device_id: str, round_id: str, metrics: dict[str, float]) -> None: ...
    def download_public_shard(self, device_id: str, cached_sha256: str = "") -> PublicShard: ...
    def verify_public_copy(self, device_id: str, samples: list[SampleFingerprint]) -> PublicCopyCheck: ...
    def wait_until_reachable(self, timeout_s: float, stop: threading.Event) -> None: ...
    def close(self) -> None: ...
