"""The heartbeat process: Heartbeat alone, on a port of its own, so liveness never waits behind transfers.

At a thousand devices a round moves gigabytes through the coordinator's one gRPC server and event loop,
and a heartbeat on the device port waited seconds for its turn, long enough for busy devices to look
offline. With ``MLECS_HEARTBEAT_PORT`` set, the coordinator starts this process as a child and tells
devices (``heartbeat_port`` in the Enrol and Heartbeat replies) to send heartbeats there::

    coordinator (serve) --starts `python -m server serve-heartbeats`, its settings on stdin--> heartbeat process
                        <--stdout "listening PORT"-- once it serves (the coordinator then advertises PORT)
    heartbeat process: verify the credential (remembered, or one database read), mark the device seen in
                       Redis (buffered), answer; it exits when the coordinator goes away

The two share device presence through Redis and credentials through the database, as replicas do; the
child takes no leases and runs no rounds. If it dies the coordinator advertises port 0 (devices fall back
to the device port) and starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server import metrics
from server.background import follow_revocations, measure_loop_lag
from server.composition import build_heartbeat_services
from server.config import CoordinatorSettings
from server.services.rate_limits import TokenBucketLimiter
from server.transport.grpc_heartbeat import FLEET_SERVICE, HeartbeatServicer, add_heartbeat_service
from server.transport.tls import device_port_credentials

log = logging.getLogger("mlecs.heartbeats")

READY_PREFIX = "listening "
"""The child's first line on stdout, followed by the port it serves."""
START_TIMEOUT_S = 60.0
RESTART_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits before restarting a child that died, growing while it keeps dying soon after starting."""
STABLE_AFTER_S = 60.0
"""A child that served this long before dying is restarted after the shortest wait again."""
PARENT_CHECK_S = 1.0


# ---- the child ------------------------------------------------------------------------------


async def serve_heartbeats(settings: CoordinatorSettings, announce: Callable[[int], None]) -> None:
    """Serves Heartbeat on ``settings.heartbeat_port`` until SIGTERM or the parent process goes away;
    ``announce(port)`` is called once the port serves."""
    nice = run_at_priority(settings.heartbeat_nice)  # first: threads started from now on inherit it
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signal handlers on this platform/thread
            loop.add_signal_handler(sig, stop.set)
    credentials = device_port_credentials(settings)
    # The coordinator migrated the database before starting this process.
    services = await asyncio.to_thread(build_heartbeat_services, settings)
    servicer = HeartbeatServicer(services.devices, limiter=TokenBucketLimiter(settings.device_rate_per_s,
                                                                                settings.device_burst),
                                 refusals=services.refusals, mtls=credentials is not None,
                                 failed_auth_limiter=TokenBucketLimiter(settings.failed_auth_rate_per_s,
                                                                        settings.failed_auth_burst))
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024),
                                      ("grpc.max_send_message_length", 64 * 1024)])
    add_heartbeat_service(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    assert settings.heartbeat_port is not None
    address = f"{settings.grpc_host}:{settings.heartbeat_port}"
    port = (server.add_insecure_port(address) if credentials is None
            else server.add_secure_port(address, credentials))
    servicer.heartbeat_port = port
    await server.start()
    await health_servicer.set(FLEET_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    if settings.heartbeat_metrics_port is not None:
        metrics.serve_http(settings.admin_host, settings.heartbeat_metrics_port)
    quiet_garbage_collector()
    announce(port)
    log.info("heartbeat process serving Heartbeat on %s:%d at nice %d", settings.grpc_host, port, nice)
    background = [asyncio.create_task(follow_revocations(services.devices, settings)),
                  asyncio.create_task(measure_loop_lag()),
                  asyncio.create_task(_stop_when_orphaned(stop))]
    try:
        await stop.wait()
    finally:
        for task in background:
            task.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=2)
        await asyncio.gather(*background, return_exceptions=True)
        await asyncio.to_thread(services.ctx.presence.close)  # writes the last buffered heartbeats
        await asyncio.to_thread(services.refusals.close)
        await asyncio.to_thread(services.ctx.revocations.close)
        servicer.close()


def run_at_priority(nice: int) -> int:
    """Sets the nice value of this process's threads (on Linux each thread has its own, and threads inherit
    it from the thread that starts them); returns the value in effect. A
    priority this process may not take (raising it needs root, CAP_SYS_NICE or RLIMIT_NICE) is logged, not
    fatal: heartbeats are still answered, only without precedence over the host's other work."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice == current:
        return current
    try:
        for thread_id in _thread_ids():
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.setpriority(os.PRIO_PROCESS, thread_id, nice)
    except PermissionError:
        log.warning("the heartbeat process may not run at nice %d (raising priority needs root, CAP_SYS_NICE, or "
                    "an RLIMIT_NICE of at least %d, e.g. compose's `ulimits: nice: %d`); it runs at nice %d, and "
                    "heartbeats may wait for busy CPUs (set MLECS_HEARTBEAT_NICE=%d to silence this)",
                    nice, 20 - nice, 20 - nice, current, current)
        return current
    return nice


def _thread_ids() -> list[int]:
    """This process's threads (Linux), else 0: the calling thread, or the process elsewhere."""
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except (FileNotFoundError, ValueError):
        return [0]


GC_THRESHOLDS = (20_000, 20, 20)
"""Collections of the youngest generation after this many net allocations (CPython's default: 700), then of
the older ones after 20 younger collections each."""


def quiet_garbage_collector() -> None:
    """Keeps CPython's cyclic garbage collector out of the heartbeats' way: with the default thresholds it
    collected every few hundred allocations, each time walking the objects kept since start-up (SQLAlchemy,
    gRPC, the settings), and was in about half of the event loop's sampled stacks at 200 heartbeats/s.
    Objects alive now are frozen (never scanned again) and collections are rarer, which cut the collector's
    samples by two thirds (CPU per heartbeat did not move beyond run-to-run noise: the gain is fewer pauses,
    not less work). Reference counting still frees everything without cycles at once."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """Sets ``stop`` once the parent is gone (this process is then re-parented), SIGKILL included."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(PARENT_CHECK_S)
    log.warning("the coordinator (pid %d) is gone; the heartbeat process stops", parent)
    stop.set()


# ---- the parent -----------------------------------------------------------------------------


class HeartbeatProcess:
    """Runs and supervises the child from the coordinator: ``await run()`` until cancelled.

    ``on_port`` is told the port devices should send heartbeats to: the child's once it serves, 0 while
    there is none (devices then use the device port)."""

    def __init__(self, settings: CoordinatorSettings, on_port: Callable[[int], None]) -> None:
        # The child gets this process's settings whole (on stdin: they may hold a database password), not
        # the environment, which need not be where they came from.
        child_settings = settings.model_copy(update={"replica_id": f"{settings.replica_id}/heartbeats"})
        self._settings_json = child_settings.model_dump_json().encode()
        self._on_port = on_port
        self.pid: int | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            started = loop.time()
            code = await self._run_once()
            self._on_port(0)
            if loop.time() - started >= STABLE_AFTER_S:
                failures = 0
            delay = RESTART_DELAYS_S[min(failures, len(RESTART_DELAYS_S) - 1)]
            failures += 1
            log.error("the heartbeat process exited (%s); devices heartbeat on the device port until it is "
                      "restarted in %.0f s", code, delay)
            metrics.HEARTBEAT_PROCESS_RESTARTS.inc()
            await asyncio.sleep(delay)

    async def _run_once(self) -> str:
        """Starts the child and waits for it to exit; returns how it ended. Cancelled: stops the child."""
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "serve-heartbeats", "--settings-stdin",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self.pid = child.pid
        try:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(self._settings_json)
            with contextlib.suppress(ConnectionError):  # a child that died at once: its exit code tells
                await child.stdin.drain()
            child.stdin.close()
            try:
                line = await asyncio.wait_for(child.stdout.readline(), timeout=START_TIMEOUT_S)
            except TimeoutError:
                return f"did not serve within {START_TIMEOUT_S:.0f} s"
            text = line.decode(errors="replace").strip()
            if text.startswith(READY_PREFIX) and text[len(READY_PREFIX):].isdigit():
                port = int(text[len(READY_PREFIX):])
                self._on_port(port)
                log.info("heartbeat process %d serves heartbeats on port %d", child.pid, port)
            returncode = await child.wait()
            return f"exit code {returncode}"
        finally:
            await _stop_child(child)
            self.pid = None


async def _stop_child(child: asyncio.subprocess.Process, grace_s: float = 5.0) -> None:
    if child.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        child.terminate()
    try:
        await asyncio.wait_for(asyncio.shield(child.wait()), timeout=grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()
