"""Coordinator settings: one typed object, read once from the environment (prefix ``MLECS_``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CoordinatorSettings(BaseSettings):
    """Everything the coordinator process can be told. Nested fields use ``__`` (e.g. ``MLECS_GRPC__PORT``)."""

    model_config = SettingsConfigDict(env_prefix="MLECS_", env_nested_delimiter="__", extra="ignore")

    state_dir: Path = Path("mlecs-data")
    """Where the embedded database (when no database URL is set) and the blob store live."""
    database_url: str | None = None
    """SQLAlchemy URL, e.g. ``postgresql://postgres@127.0.0.1:5432/mlecs``. Unset: SQLite under state_dir."""
    redis_url: str | None = None
    """e.g. ``redis://127.0.0.1:6379/0``. Unset: presence is kept in this process."""
    redis_prefix: str = "mlecs"
    """Prefix of every Redis key this coordinator writes (several deployments can share one Redis)."""
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(default=8080, ge=0, le=65535)
    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    """Largest gRPC message accepted or sent; chunks must fit well inside it."""
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest declared size of one update."""
    max_concurrent_uploads: int = Field(default=16, ge=1)
    """Upload streams received at once; more wait their turn (bounds memory under a thundering herd)."""
    grpc_stream_window_bytes: int = Field(default=256 * 1024, ge=64 * 1024)
    """HTTP/2 receive window per stream on the device port. An upload waiting for a slot holds at most this
    much in the coordinator; one upload moves at most this much per round trip (256 KiB at 100 ms is
    2.6 MB/s per device), so raise it for fast, distant devices."""
    max_concurrent_downloads: int = Field(default=32, ge=1)
    """Global-version downloads streamed at once."""
    heartbeat_interval_s: int = Field(default=5, ge=1)
    presence_ttl_s: float = Field(default=20.0, gt=0)
    """A device not heard from for this long is offline."""
    presence_flush_interval_s: float = Field(default=0.25, gt=0)
    """How often buffered heartbeats are written to Redis (one pipeline each time)."""
    credential_cache_s: float = Field(default=30.0, ge=0)
    """How long a verified device credential is remembered, so most calls need no database read. Within
    one replica a re-enrolment takes effect at once; another replica may accept the old credential for up
    to this long. 0 reads the database on every call."""
    scheduler_interval_s: float = Field(default=1.0, gt=0)
    task_watch_interval_s: float = Field(default=0.25, gt=0)
    """How often held task long polls look for rounds opened by another replica."""
    replica_id: str = Field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}", min_length=1,
                            max_length=200)
    """Names this process in leases; replicas sharing a database must differ (the default does)."""
    lease_ttl_s: float = Field(default=10.0, gt=0)
    """A replica driving a federation's rounds holds a lease this long, renewed while it works; a replica
    that dies is replaced by another after at most this long."""
    robust_block_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024)
    """Memory for one coordinate block when a robust rule reduces a round's updates (spilled to disk under
    state_dir/spill): the block holds this much whatever the number of updates."""
    gil_switch_interval_s: float = Field(default=0.001, gt=0, le=0.1)
    """CPython's thread switch interval in the coordinator process. Every gRPC call passes the GIL between
    gRPC's poller thread and the event loop while worker threads decode and sum uploads; the default 5 ms
    makes each hand-over wait behind a busy worker."""
    data_dir: Path | None = None
    """AV-MNIST directory for server-side evaluation (default: the data loader's search path)."""
    eval_setting: str = "canonical"
    log_level: str = "INFO"

    @property
    def blob_dir(self) -> Path:
        return self.state_dir / "blobs"

    def resolved_database_url(self) -> str:
        """The configured database URL, or the embedded SQLite file under state_dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.state_dir / 'coordinator.db').resolve()}"
