"""Coordinator settings: one typed object, read once from the environment (prefix ``MLECS_``)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class ConfigurationError(Exception):
    """Settings that cannot work together; the message says what to set. Not retryable (exit code 2)."""


def _default_replica_id(grpc_port: int) -> str:
    return f"{socket.gethostname()}:{grpc_port or f'pid{os.getpid()}'}"


class CoordinatorSettings(BaseSettings):
    """Everything the coordinator process can be told. Nested fields use ``__`` (e.g. ``MLECS_GRPC__PORT``)."""

    model_config = SettingsConfigDict(env_prefix="MLECS_", env_nested_delimiter="__", extra="ignore",
                                      use_attribute_docstrings=True)  # field docs feed the configuration reference

    state_dir: Path = Path("mlecs-data")
    """Where the embedded database (when no database URL is set) and the blob store live."""
    database_url: str | None = None
    """SQLAlchemy URL, e.g. ``postgresql://postgres@127.0.0.1:5432/mlecs``. Unset: SQLite under state_dir."""
    redis_url: str | None = None
    """e.g. ``redis://127.0.0.1:6379/0``. Unset: presence is kept in this process."""
    redis_prefix: str = "mlecs"
    """Prefix of every Redis key this coordinator writes (several deployments can share one Redis)."""
    grpc_host: str = "127.0.0.1"
    """Address the device endpoint (gRPC) listens on; 0.0.0.0 for every interface."""
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    """Port of the device endpoint (0: any free port)."""
    heartbeat_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve Heartbeat in a process of its own on this port of grpc_host (0: any free port), and tell devices
    to send heartbeats there: liveness then never waits behind a round's transfers on the device port, which
    at a thousand devices delayed heartbeats past the presence TTL. Same TLS as the device port. Needs
    ``redis_url`` (the two processes share presence through Redis). Unset: heartbeats go to the device port."""
    heartbeat_nice: int = Field(default=-10, ge=-20, le=19)
    """Scheduling priority (nice value) of the heartbeat process: negative runs it ahead of transfers, Postgres
    and anything else on the host when CPUs are busy, which is what keeps heartbeat latency low under load.
    Raising priority needs root, CAP_SYS_NICE, or an RLIMIT_NICE of at least 20 - this value (compose sets
    ``ulimits: nice: 30``); without it the process logs a warning and runs at the coordinator's priority."""
    heartbeat_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Prometheus metrics of the heartbeat process (its Heartbeat latencies and refusals) on this port of
    admin_host. Unset: not exposed (the coordinator's own /metrics stays on the admin port)."""
    admin_host: str = "127.0.0.1"
    """Address the admin API and /metrics listen on."""
    admin_port: int = Field(default=8080, ge=0, le=65535)
    """Port of the admin API and /metrics."""
    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    """Largest gRPC message accepted or sent; chunks must fit well inside it."""
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest declared size of one update."""
    device_rate_per_s: float = Field(default=5.0, ge=0)
    """Requests per second one device may make on average (an upload stream counts once; Enrol is counted per
    federation and device name); 0 turns the limit off. Kept in each replica: N replicas allow N times it.
    A healthy agent makes well under one per second."""
    device_burst: int = Field(default=50, ge=1)
    """Requests one device may make at once before ``device_rate_per_s`` applies (a round's task, download,
    upload and report, retries included, fit several times over)."""
    failed_auth_rate_per_s: float = Field(default=1.0, ge=0)
    """Failed authentications (unknown credential, bad enrolment token) one peer address may cause per second
    on average; past ``failed_auth_burst`` of them, every call from that address is refused
    (RESOURCE_EXHAUSTED) before it costs a database read, until the bucket refills. Honest callers fail
    rarely, and callers that authenticate are never charged. 0 turns the limit off."""
    failed_auth_burst: int = Field(default=100, ge=1)
    """Failed authentications one peer address may cause at once before ``failed_auth_rate_per_s`` applies
    (generous: a fleet behind one NAT shares an address)."""
    refusal_record_interval_s: float = Field(default=10.0, ge=0)
    """A device refused for its rate, or a caller refused as unauthenticated or not permitted, is recorded at
    most once per this many seconds per device (or peer address) and method; every refusal is still counted."""
    max_concurrent_uploads: int = Field(default=16, ge=1)
    """Upload streams received at once, counted from their header on; more wait their turn (bounds memory
    under a thundering herd). A stream that has sent no header yet holds no slot."""
    max_upload_streams_per_device: int = Field(default=2, ge=1)
    """Upload streams one device may have open at once (a further one is refused as RESOURCE_EXHAUSTED):
    one device cannot take the slots every other device needs. An agent opens one."""
    upload_idle_timeout_s: float = Field(default=30.0, gt=0)
    """An upload stream that sends no message for this long is closed (DEADLINE_EXCEEDED, reason ``idle``);
    the device resumes from the acknowledged offset."""
    max_partial_uploads_per_device: int = Field(default=2, ge=1)
    """Unfinished uploads one device may have in a round; a new one beyond this discards the device's oldest
    (its staged bytes are deleted, state rejected, reason ``superseded``). Partial uploads also expire, with
    their staged bytes, when their round closes."""
    max_staged_bytes: int = Field(default=4 * 1024**3, ge=1024 * 1024)
    """Staged bytes of unfinished uploads this replica holds at most; a new upload that would pass it is
    refused (RESOURCE_EXHAUSTED, reason ``staging_full``, retry later)."""
    grpc_stream_window_bytes: int = Field(default=256 * 1024, ge=64 * 1024)
    """HTTP/2 receive window per stream on the device port. An upload waiting for a slot holds at most this
    much in the coordinator; one upload moves at most this much per round trip (256 KiB at 100 ms is
    2.6 MB/s per device), so raise it for fast, distant devices."""
    max_concurrent_downloads: int = Field(default=32, ge=1)
    """Global-version downloads streamed at once."""
    heartbeat_interval_s: int = Field(default=5, ge=1)
    """How often devices are asked to call in, in seconds."""
    presence_ttl_s: float = Field(default=20.0, gt=0)
    """A device not heard from for this long is offline."""
    presence_flush_interval_s: float = Field(default=0.25, gt=0)
    """How often buffered heartbeats are written to Redis (one pipeline each time)."""
    credential_cache_s: float = Field(default=30.0, ge=0)
    """How long a verified device credential is remembered, so most calls need no database read. Within
    one replica a re-enrolment takes effect at once; another replica may accept the old credential for up
    to this long. 0 reads the database on every call. A revocation reaches every replica sooner (see
    ``revocation_poll_interval_s``)."""
    revocation_poll_interval_s: float = Field(default=0.25, gt=0)
    """How often each replica reads the revocations other replicas published in Redis and forgets those
    devices' remembered credentials: a device revoked through one replica is refused by the others from at
    most this long later (without Redis, from at most ``credential_cache_s`` later)."""
    tls_cert_file: Path | None = None
    """PEM certificate the device gRPC port presents (``mlecs certs init`` makes a development one).
    With ``tls_key_file`` and ``tls_client_ca_file`` it turns on mutual TLS: set all three or none."""
    tls_key_file: Path | None = None
    """PEM private key of ``tls_cert_file``."""
    tls_client_ca_file: Path | None = None
    """PEM CA certificate(s) that device client certificates must chain to. Each call is bound to the
    device the certificate names (CN = device name)."""
    admin_tls_cert_file: Path | None = None
    """PEM certificate the admin API presents (HTTPS); with ``admin_tls_key_file``, set both or neither. The
    coordinator certificate ``mlecs certs init`` makes serves (its SANs name the coordinator's host). Without
    it the admin API is plain HTTP, which carries bearer tokens in the clear: the coordinator warns at start
    when that is on an address other than loopback."""
    admin_tls_key_file: Path | None = None
    """PEM private key of ``admin_tls_cert_file``."""
    allow_plaintext: bool = False
    """Serve the device port without TLS. For local development and benchmarks only (logged loudly): device
    secrets and updates then cross the network in the clear."""
    open_enrolment: bool = False
    """Let devices enrol without a one-time enrolment token. For local development and benchmarks only
    (logged loudly): anyone who can reach the device port can then join a federation."""
    scheduler_interval_s: float = Field(default=1.0, gt=0)
    """How often the scheduler looks at deadlines and opens rounds (an accepted update that meets the round's
    target or quorum also wakes it)."""
    task_watch_interval_s: float = Field(default=0.25, gt=0)
    """How often held task long polls look for rounds opened by another replica."""
    replica_id: str = Field(default_factory=lambda data: _default_replica_id(data.get("grpc_port", 0)),
                            min_length=1, max_length=200)
    """Names this process in leases; replicas sharing a database must differ. Default: the host name and the
    gRPC port, so a coordinator restarted on the same host and port keeps its id and takes its leases back at
    once instead of waiting for them to expire (with port 0, the process id)."""
    lease_ttl_s: float = Field(default=10.0, gt=0)
    """A replica driving a federation's rounds holds a lease this long, renewed while it works; a replica
    that dies is replaced by another after at most this long."""
    robust_block_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024)
    """Memory for one coordinate block when a robust rule reduces a round's updates (spilled to disk under
    state_dir/spill): the block holds this much whatever the number of updates."""
    worker_threads: int = Field(default_factory=lambda: _usable_cpus() + 2, ge=1, le=256)
    """Threads that run uploads, downloads and the scheduler's work (decoding, summing, database writes).
    The work is mostly CPU, so more threads than CPUs only make them take turns for the GIL: on a 2-CPU host a
    32-device round took 2.66 s with 12 threads and 2.07-2.15 s with 3-4 (asyncio's default would be 6).
    Default: usable CPUs + 2. Under a CPU quota smaller than the host (a container limit), set it from the quota."""
    gil_switch_interval_s: float = Field(default=0.001, gt=0, le=0.1)
    """CPython's thread switch interval in the coordinator process. Every gRPC call passes the GIL between
    gRPC's poller thread and the event loop while worker threads decode and sum uploads; the default 5 ms
    makes each hand-over wait behind a busy worker."""
    worker_inprocess: bool = True
    """Run the cloud worker (cloud tuning, anchor generation, evaluation of each new version) in a thread of this
    coordinator: the embedded default, so one process is a whole coordinator. Set false where workers run as a
    service of their own (``mlecs-coordinator worker``), scaled apart from the coordinator replicas."""
    cloud_workers: int = Field(default=1, ge=1, le=64)
    """Cloud jobs one worker process (or the in-process worker) runs at once; jobs of one federation take turns
    on its cloud model, jobs of different federations run side by side."""
    cloud_job_timeout_s: float = Field(default=60.0, gt=0)
    """A version whose cloud job was neither queued nor reported running for this long is queued again: its
    worker died running it (a running job's worker reports every third of this). A job that runs twice
    changes nothing."""
    cloud_job_attempts: int = Field(default=3, ge=1, le=100)
    """Attempts at one version's cloud job (a worker killed mid-job counts) before the version is marked failed:
    it keeps the anchors it had and is not evaluated."""
    worker_metrics_port: int = Field(default=9103, ge=0, le=65535)
    """``mlecs-coordinator worker``: Prometheus metrics (cloud job counts and times, queue depth) on this port of
    admin_host (0: none)."""
    data_dir: Path | None = None
    """AV-MNIST directory for server-side evaluation (default: the data loader's search path)."""
    eval_setting: str = "canonical"
    """The AV-MNIST setting (canonical or hard) for federations without a task."""
    task_data: dict[str, Path] = Field(default_factory=dict)
    """The coordinator's data for federations with a task: a JSON object from task name to a directory holding
    ``public/`` and ``test/`` dataset directories, e.g. ``{"avmnist": "/data/fleet-data"}`` (what ``mlecs data
    export-avmnist`` writes). A task without an entry is aggregated only: no evaluation, no cloud tuning."""
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR."""

    @field_validator("task_data", mode="before")
    @classmethod
    def _task_data_from_json(cls, value: object) -> object:
        """Accepts the JSON text an environment variable carries wherever the settings come from."""
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"MLECS_TASK_DATA must be a JSON object of task name -> directory: {exc}") from None
        return value

    @property
    def blob_dir(self) -> Path:
        return self.state_dir / "blobs"

    def resolved_database_url(self) -> str:
        """The configured database URL, or the embedded SQLite file under state_dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.state_dir / 'coordinator.db').resolve()}"

    @model_validator(mode="after")
    def _tls_files_go_together(self) -> CoordinatorSettings:
        tls = {"MLECS_TLS_CERT_FILE": self.tls_cert_file, "MLECS_TLS_KEY_FILE": self.tls_key_file,
               "MLECS_TLS_CLIENT_CA_FILE": self.tls_client_ca_file}
        missing = [name for name, value in tls.items() if value is None]
        if 0 < len(missing) < len(tls):
            raise ValueError(f"mutual TLS needs all of {', '.join(tls)}; missing {', '.join(missing)}")
        return self

    @model_validator(mode="after")
    def _admin_tls_files_go_together(self) -> CoordinatorSettings:
        if (self.admin_tls_cert_file is None) != (self.admin_tls_key_file is None):
            missing = "MLECS_ADMIN_TLS_KEY_FILE" if self.admin_tls_key_file is None else "MLECS_ADMIN_TLS_CERT_FILE"
            raise ValueError(f"HTTPS on the admin API needs MLECS_ADMIN_TLS_CERT_FILE and MLECS_ADMIN_TLS_KEY_FILE; "
                             f"missing {missing}")
        return self

    @property
    def admin_tls_enabled(self) -> bool:
        return self.admin_tls_cert_file is not None

    @model_validator(mode="after")
    def _heartbeat_process_needs_redis(self) -> CoordinatorSettings:
        if self.heartbeat_port is not None and not self.redis_url:
            raise ValueError("MLECS_HEARTBEAT_PORT needs MLECS_REDIS_URL: the heartbeat process and the coordinator "
                             "share device presence through Redis (unset MLECS_HEARTBEAT_PORT to serve heartbeats "
                             "on the device port)")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None
