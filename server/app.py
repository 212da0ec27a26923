"""The coordinator process: runs gRPC, the admin API and the round scheduler in one event loop over the
services ``server.composition`` wires, with a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server import metrics
from server.background import FederationDrivers, follow_revocations, measure_loop_lag
from server.composition import Services, build_services
from server.config import CoordinatorSettings
from server.domain.errors import UnavailableError
from server.heartbeat_process import HeartbeatProcess
from server.services import staging
from server.services.observations import observe_fleet
from server.services.rate_limits import TokenBucketLimiter
from server.transport.admin_api import create_admin_app
from server.transport.grpc_heartbeat import FLEET_SERVICE
from server.transport.grpc_servicer import FleetServicer, add_fleet_service
from server.transport.long_poll import ChangeSignal
from server.transport.tls import device_port_credentials

log = logging.getLogger("mlecs.coordinator")

OBSERVE_INTERVAL_S = 5.0
"""How often the fleet and dependency gauges are refreshed (Prometheus scrapes every 15 s by default)."""


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
            # A second coordinator on this host and port must fail to start, not share the port: it would
            # also share the default replica id, and with it the leases.
            ("grpc.so_reuseport", 0),
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
        revocations = asyncio.create_task(follow_revocations(services.devices, self.settings))
        observer = asyncio.create_task(_observe(services))
        tasks = [scheduler, watcher, lag, revocations, observer]
        cloud_worker = None
        if self.settings.worker_inprocess:  # the embedded default: this process also runs the cloud jobs
            services.jobs.serve_with(services.cloud_work.run)
            cloud_worker = services.jobs.consumer(self.settings.cloud_workers, embedded=True)
            cloud_worker.start()
            log.info("cloud worker running in this process (%d thread(s))", self.settings.cloud_workers)
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
            if cloud_worker is not None:  # a job cut short here is queued again (CloudWork.redeliver_stale)
                await asyncio.to_thread(cloud_worker.stop)
            await asyncio.to_thread(services.rounds.release_leases)
            await asyncio.to_thread(services.ctx.presence.close)
            await asyncio.to_thread(services.refusals.close)
            await asyncio.to_thread(services.ctx.revocations.close)
            await asyncio.to_thread(services.jobs.close)
            fleet.close()

    async def _schedule(self, services: Services) -> None:
        """Advances rounds when an update arrives or every interval (deadlines), and flushes presence. Each
        federation is driven by a task of its own (``FederationDrivers``), side by side."""
        drivers = FederationDrivers(services.rounds, changed=self._changed, wake=self._wake)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.settings.scheduler_interval_s)
                self._wake.clear()
                try:
                    drivers.drive(await asyncio.to_thread(services.rounds.survey))
                    await asyncio.to_thread(services.devices.flush_presence)
                    await asyncio.to_thread(services.cloud_work.redeliver_stale)
                except UnavailableError as exc:
                    log.warning("scheduler paused: %s", exc)
        finally:
            drivers.cancel()

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
            metrics.CLOUD_QUEUE_DEPTH.set(await asyncio.to_thread(services.jobs.depth))
        except UnavailableError as exc:
            log.debug("fleet gauges not refreshed: %s", exc)
        except Exception:  # a gauge is not worth the task: log and try again next time
            log.exception("could not refresh the fleet gauges")
        await asyncio.sleep(interval_s)
