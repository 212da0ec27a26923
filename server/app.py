"""The coordinator process: wires the ports into the services and runs gRPC, the admin API and the
round scheduler in one event loop, with a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server import metrics
from server.config import CoordinatorSettings
from server.domain.errors import UnavailableError
from server.heartbeat_process import HeartbeatProcess
from server.learning.anchors import CloudTuner
from server.learning.global_model import GlobalEvaluator
from server.learning.task_data import TaskData
from server.persistence.blobs import FileBlobStore
from server.persistence.database import create_engine_for, migrate
from server.persistence.presence import create_presence_store
from server.persistence.revocations import create_revocation_feed
from server.persistence.sql_store import SqlStore
from server.services import staging
from server.services.admin_tokens import AdminTokenService
from server.services.aggregation import RoundAccumulators
from server.services.audit import AuditService
from server.services.context import ServiceContext
from server.services.devices import DeviceService
from server.services.federations import FederationService
from server.services.inspection import RoundInspectionService
from server.services.locks import RoundLocks
from server.services.observations import observe_dependencies, observe_fleet
from server.services.public_set import PublicSetService
from server.services.rate_limits import TokenBucketLimiter
from server.services.refusals import RefusalRecorder
from server.services.rounds import RoundService
from server.services.uploads import UploadService
from server.services.versions import VersionService
from server.transport.admin_api import AdminServices, create_admin_app
from server.transport.grpc_heartbeat import FLEET_SERVICE
from server.transport.grpc_servicer import FleetServicer, add_fleet_service
from server.transport.long_poll import ChangeSignal
from server.transport.tls import device_port_credentials

log = logging.getLogger("mlecs.coordinator")

OBSERVE_INTERVAL_S = 5.0
"""How often the fleet and dependency gauges are refreshed (Prometheus scrapes every 15 s by default)."""


@dataclass
class Services:
    ctx: ServiceContext
    federations: FederationService
    devices: DeviceService
    rounds: RoundService
    uploads: UploadService
    versions: VersionService
    refusals: RefusalRecorder
    admin_tokens: AdminTokenService
    audit: AuditService
    inspection: RoundInspectionService
    public_set: PublicSetService

    def admin_services(self) -> AdminServices:
        """What the admin API calls."""
        return AdminServices(self.federations, self.rounds, self.devices, self.versions, self.health,
                             tokens=self.admin_tokens, audit=self.audit, inspection=self.inspection)

    def health(self) -> dict[str, bool]:
        """Whether the database and the presence store answer. Only the database decides readiness:
        it is the source of truth, and without Redis devices still upload and rounds still commit."""
        try:
            self.ctx.store.list_federations()
            database = True
        except UnavailableError:
            database = False
        presence = self.ctx.presence.ping()
        observe_dependencies(database=database, redis=presence)
        return {"ready": database, "database": database, "presence": presence}


def build_services(settings: CoordinatorSettings, wake: asyncio.Event | None = None,
                   loop: asyncio.AbstractEventLoop | None = None, *, changed: asyncio.Event | None = None,
                   migrate_database: bool = True) -> Services:
    """Migrates the database (unless told not to) and wires every service. On ``loop``: ``wake`` is set when
    an update is accepted, ``changed`` when an admin action changed what devices are told (a round
    launched, a federation paused, resumed or stopped)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url()
    if migrate_database:
        migrate(url)
    task_data = TaskData(settings.data_dir, settings.eval_setting, settings.task_data)
    ctx = ServiceContext(
        settings=settings,
        store=SqlStore(create_engine_for(url)),
        blobs=FileBlobStore(settings.blob_dir),
        presence=create_presence_store(settings.redis_url, settings.redis_prefix, settings.presence_flush_interval_s),
        evaluator=GlobalEvaluator(task_data),
        cloud=CloudTuner(task_data),
        revocations=create_revocation_feed(settings.redis_url, settings.redis_prefix),
    )
    locks = RoundLocks()
    accumulators = RoundAccumulators()  # running sums of the rounds this replica accepts updates for

    def on_accepted(_round_id: str) -> None:
        if wake is not None and loop is not None:
            loop.call_soon_threadsafe(wake.set)

    def on_change() -> None:
        if changed is not None and loop is not None:
            loop.call_soon_threadsafe(changed.set)

    federations = FederationService(ctx, on_change)
    return Services(
        ctx=ctx,
        federations=federations,
        devices=DeviceService(ctx, federations),
        rounds=RoundService(ctx, federations, locks, accumulators, on_change),
        uploads=UploadService(ctx, locks, on_accepted, accumulators),
        versions=VersionService(ctx, federations),
        refusals=RefusalRecorder(ctx.store, record_interval_s=settings.refusal_record_interval_s),
        admin_tokens=AdminTokenService(ctx.store),
        audit=AuditService(ctx.store),
        inspection=RoundInspectionService(ctx),
        public_set=PublicSetService(ctx, task_data),
    )


class Coordinator:
    """Lifecycle of one coordinator replica: ``await run()`` until ``shutdown()`` or SIGTERM/SIGINT."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self.grpc_port = 0
        self.services: Services | None = None
        self.heartbeat_process: HeartbeatProcess | None = None
        self.heartbeat_port = 0
        """The port devices are told to send heartbeats to (0: the device port)."""

    def shutdown(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # Every asyncio.to_thread of this process (uploads, downloads, the scheduler) runs on these threads.
        loop.set_default_executor(ThreadPoolExecutor(max_workers=self.settings.worker_threads,
                                                     thread_name_prefix="mlecs-worker"))
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (tests)
                loop.add_signal_handler(sig, self.shutdown)
        # Checked first: a coordinator that may not serve devices must not migrate or start anything.
        device_credentials = device_port_credentials(self.settings)
        if self.settings.open_enrolment:
            log.warning("!!! OPEN ENROLMENT (MLECS_OPEN_ENROLMENT=true): any caller that reaches the device port "
                        "can enrol in any active federation without an enrolment token. For local development "
                        "and benchmarks only !!!")
        services = await asyncio.to_thread(partial(build_services, self.settings, self._wake, loop,
                                                  changed=self._changed))
        self.services = services
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # A fixed per-stream receive window (no BDP probing, which grew it to megabytes on loopback):
            # upload streams waiting for a slot then hold at most this much here each, instead of the
            # whole update. At N = 1000 this took peak RSS from 2.4-2.75 GiB to 1.2-1.4 GiB.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", self.settings.grpc_stream_window_bytes),
        ])
        chunk = min(1024 * 1024, limit // 2)
        changes = ChangeSignal()
        fleet = FleetServicer(services.devices, services.rounds, services.uploads, services.versions.read, chunk,
                              max_uploads=self.settings.max_concurrent_uploads,
                              max_upload_streams_per_device=self.settings.max_upload_streams_per_device,
                              upload_idle_timeout_s=self.settings.upload_idle_timeout_s,
                              max_downloads=self.settings.max_concurrent_downloads, changes=changes,
                              limiter=TokenBucketLimiter(self.settings.device_rate_per_s, self.settings.device_burst),
                              failed_auth_limiter=TokenBucketLimiter(self.settings.failed_auth_rate_per_s,
                                                                     self.settings.failed_auth_burst),
                              refusals=services.refusals,
                              mtls=device_credentials is not None, public_set=services.public_set)
        add_fleet_service(fleet, server)

        def advertise_heartbeat_port(port: int) -> None:
            fleet.heartbeat_port = self.heartbeat_port = port
            metrics.HEARTBEAT_PORT.set(port)

        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        self.grpc_port = (server.add_insecure_port(address) if device_credentials is None
                          else server.add_secure_port(address, device_credentials))
        await server.start()
        await health_servicer.set(FLEET_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

        admin = create_admin_app(services.admin_services())
        http = uvicorn.Server(uvicorn.Config(
            admin, host=self.settings.admin_host, port=self.settings.admin_port, log_level="warning", lifespan="off",
            ssl_certfile=self.settings.admin_tls_cert_file, ssl_keyfile=self.settings.admin_tls_key_file,
            # uvicorn otherwise waits at shutdown for every open connection, a stalled client's included.
            timeout_graceful_shutdown=5))
        if not self.settings.admin_tls_enabled and not _is_loopback(self.settings.admin_host):
            log.warning("!!! PLAINTEXT ADMIN API on %s:%d: admin tokens cross the network in the clear. Set "
                        "MLECS_ADMIN_TLS_CERT_FILE and MLECS_ADMIN_TLS_KEY_FILE, or serve it on 127.0.0.1 behind a "
                        "TLS proxy !!!", self.settings.admin_host, self.settings.admin_port)
        http_task = asyncio.create_task(http.serve())
        scheduler = asyncio.create_task(self._schedule(services))
        watcher = asyncio.create_task(self._watch(services, changes))
        lag = asyncio.create_task(measure_loop_lag())
        revocations = asyncio.create_task(follow_revocations(services, self.settings))
        observer = asyncio.create_task(_observe(services))
        tasks = [scheduler, watcher, lag, revocations, observer]
        if self.settings.heartbeat_port is not None:
            self.heartbeat_process = HeartbeatProcess(self.settings, advertise_heartbeat_port)
            tasks.append(asyncio.create_task(self.heartbeat_process.run()))
        log.info("coordinator serving gRPC on %s:%d and the admin API on http://%s:%d",
                 self.settings.grpc_host, self.grpc_port, self.settings.admin_host, self.settings.admin_port)
        try:
            await self._stop.wait()
        finally:
            log.info("coordinator stopping")
            await health_servicer.enter_graceful_shutdown()
            for task in tasks:
                task.cancel()
            http.should_exit = True
            await server.stop(grace=5)
            await asyncio.gather(http_task, *tasks, return_exceptions=True)
            await asyncio.to_thread(services.rounds.release_leases)
            await asyncio.to_thread(services.ctx.presence.close)
            await asyncio.to_thread(services.refusals.close)
            await asyncio.to_thread(services.ctx.revocations.close)
            fleet.close()

    async def _schedule(self, services: Services) -> None:
        """Advances rounds when an update arrives or every interval (deadlines), and flushes presence."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.scheduler_interval_s)
            self._wake.clear()
            try:
                await asyncio.to_thread(services.rounds.advance_all)
                self._changed.set()  # this replica may have opened or closed a round: look now
                await asyncio.to_thread(services.devices.flush_presence)
            except UnavailableError as exc:
                log.warning("scheduler paused: %s", exc)

    async def _watch(self, services: Services, changes: ChangeSignal) -> None:
        """Wakes held task long polls when there is news for them (a round opened, a federation paused,
        resumed or stopped): looks after each local scheduler tick and admin action that changed the work,
        and every ``task_watch_interval_s`` (changes made by other replicas)."""
        seen = None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=self.settings.task_watch_interval_s)
            self._changed.clear()
            try:
                marker = await asyncio.to_thread(services.rounds.activity_marker)
            except UnavailableError:
                continue  # held polls time out and devices ask again; the scheduler logs the outage
            if marker.has_news_since(seen):
                changes.notify()
            seen = marker


async def follow_revocations(services: Services, settings: CoordinatorSettings) -> None:
    """Forgets the remembered credentials of devices other replicas revoked (see
    ``server.persistence.revocations``), every ``revocation_poll_interval_s``."""
    failing = False
    while True:
        await asyncio.sleep(settings.revocation_poll_interval_s)
        try:
            await asyncio.to_thread(services.devices.follow_revocations)
        except UnavailableError as exc:
            if not failing:
                log.warning("revocations by other replicas take effect here when cached credentials "
                            "expire (%.0f s) until Redis answers: %s", settings.credential_cache_s, exc)
            failing = True
        else:
            failing = False


async def measure_loop_lag(interval_s: float = 0.1) -> None:
    """Records how late a timer fires: the time any gRPC or HTTP call waits before the loop runs it."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval_s)
        metrics.EVENT_LOOP_LAG.observe(max(0.0, loop.time() - started - interval_s))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


async def _observe(services: Services, interval_s: float = OBSERVE_INTERVAL_S) -> None:
    """Refreshes the gauges no event sets: devices enrolled/online per modality set, database and Redis up."""
    while True:
        try:
            await asyncio.to_thread(services.health)  # sets the dependency gauges
            await asyncio.to_thread(observe_fleet, services.ctx)
            await asyncio.to_thread(staging.sweep, services.ctx)
        except UnavailableError as exc:
            log.debug("fleet gauges not refreshed: %s", exc)
        except Exception:  # a gauge is not worth the task: log and try again next time
            log.exception("could not refresh the fleet gauges")
        await asyncio.sleep(interval_s)
