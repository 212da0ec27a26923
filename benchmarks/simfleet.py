"""``Fleet``: N simulated devices (``benchmarks.simdevice``) spread over a few OS processes, each running one
asyncio loop with one shared channel, their statistics gathered back::

    parent (Fleet) --spawn--> device process k: devices k, k+P, k+2P, ... on one grpc.aio channel
                   <--queue-- ("ready", k, enrolled, problems) once its devices are enrolled and prepared
                   <--queue-- ("stats", k, FleetStats) after the parent sets the stop event

Heartbeats may be sent from processes of their own (``heartbeat_procs``), as real devices send them from
their own CPUs. Errors: ``FleetError`` (a device process failed or did not report in time).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from benchmarks.simdevice import (
    CHANNEL_OPTIONS,
    DeviceSpec,
    FleetError,
    FleetOptions,
    FleetStats,
    Heartbeater,
    SimDevice,
)
from mlecs.proto.v1 import fleet_pb2_grpc

ENROL_ATTEMPTS = 4
_RETRIED = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)

# ---- one device process ---------------------------------------------------------------------


def _device_process(index: int, specs: Sequence[DeviceSpec], options: FleetOptions, stop: Any,
                    outbox: Any, beats: Any) -> None:
    """Entry point of a device process: runs its devices until ``stop`` is set, then reports. With ``beats``
    (a queue to a heartbeat process) it hands its devices' heartbeats over instead of sending them."""
    stats = asyncio.run(_run_devices(index, specs, options, stop, outbox, beats))
    outbox.put(("stats", index, stats.plain()))


def _channel_factory(options: FleetOptions, channels: list[grpc.aio.Channel]
                     ) -> Callable[[str], fleet_pb2_grpc.FleetStub]:
    """Makes stubs on new connections (one per call, or one per target with ``options.shared_channel``),
    remembering each channel in ``channels`` so that the caller closes them."""
    shared: dict[str, grpc.aio.Channel] = {}

    def stub(target: str) -> fleet_pb2_grpc.FleetStub:
        if options.shared_channel and target in shared:
            return fleet_pb2_grpc.FleetStub(shared[target])
        # A local subchannel pool gives each channel a connection of its own (gRPC otherwise shares one
        # connection among channels to the same address with the same options). Benchmark mode: plaintext,
        # enrolment without tokens (the coordinator runs with MLECS_ALLOW_PLAINTEXT and MLECS_OPEN_ENROLMENT).
        channels.append(grpc.aio.insecure_channel(
            target, options=[*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]))
        shared.setdefault(target, channels[-1])
        return fleet_pb2_grpc.FleetStub(channels[-1])
    return stub


async def _run_devices(index: int, specs: Sequence[DeviceSpec], options: FleetOptions, stop: Any,
                       outbox: Any, beats: Any) -> FleetStats:
    stats = FleetStats()
    running: list[asyncio.Task[None]] = []
    gate = asyncio.Semaphore(options.enrol_concurrency)
    channels: list[grpc.aio.Channel] = []
    stub = _channel_factory(options, channels)

    try:
        async def start(device: SimDevice) -> None:
            async with gate:
                # As an agent would: an enrolment that timed out or found the coordinator busy is tried again (a
                # saturated 2-core machine starves a few of 10,000 at a time).
                for attempt in range(ENROL_ATTEMPTS):
                    try:
                        await device.enrol()
                        break
                    except grpc.aio.AioRpcError as exc:
                        if attempt == ENROL_ATTEMPTS - 1 or exc.code() not in _RETRIED:
                            raise
                        await asyncio.sleep(2.0 * (attempt + 1))
                if beats is not None:
                    beats.put([device.heartbeat_plan()])
                else:
                    running.append(asyncio.create_task(device.heartbeats()))

        devices = [SimDevice(stub(options.address), spec, options, stats, open_stub=stub) for spec in specs]
        outcomes = await asyncio.gather(*(start(d) for d in devices), return_exceptions=True)
        problems = [f"{d.spec.name}: {o!r}" for d, o in zip(devices, outcomes, strict=True) if o is not None]
        enrolled = [d for d, o in zip(devices, outcomes, strict=True) if o is None]
        try:
            # Every device of a federation has the same schema: one download tells the whole process.
            shapes = await enrolled[0].fetch_shapes() if enrolled else {}
        except grpc.aio.AioRpcError as exc:
            problems.append(f"downloading the global adapter: {exc.code().name}: {exc.details()}")
            enrolled = []
        shared: dict[Any, Any] = {}
        for device in enrolled:
            device.prepare(shapes, shared=shared)
            await asyncio.sleep(0)  # let the heartbeats already running go out between encodings
        outbox.put(("ready", index, len(enrolled), problems[:3]))
        running += [asyncio.create_task(d.tasks()) for d in enrolled]
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await _wind_down(stats, running)
    finally:
        await asyncio.gather(*(channel.close() for channel in channels), return_exceptions=True)
    return stats


async def _wind_down(stats: FleetStats, running: list[asyncio.Task[None]]) -> None:
    """Cancels the devices' tasks; what that cancels is not counted as failures."""
    stats.stopping = True
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


# ---- one heartbeat process -----------------------------------------------------------------


def _heartbeat_process(index: int, options: FleetOptions, inbox: Any, stop: Any, outbox: Any) -> None:
    """Entry point of a heartbeat process: sends the heartbeats of the devices whose plans arrive in ``inbox``
    until ``stop`` is set, then reports its statistics."""
    if options.heartbeat_nice is not None:
        with contextlib.suppress(PermissionError):  # reported by the parent, which reads the value back
            os.setpriority(os.PRIO_PROCESS, 0, options.heartbeat_nice)
    stats = asyncio.run(_run_heartbeats(options, inbox, stop))
    outbox.put(("stats", f"heartbeats-{index}", stats.plain()))


async def _run_heartbeats(options: FleetOptions, inbox: Any, stop: Any) -> FleetStats:
    stats = FleetStats()
    running: list[asyncio.Task[None]] = []
    channels: list[grpc.aio.Channel] = []
    stub = _channel_factory(options, channels)
    try:
        while not stop.is_set():
            try:
                plans = inbox.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.05)
                continue
            running += [asyncio.create_task(Heartbeater(plan, options, stats, stub).run()) for plan in plans]
        await _wind_down(stats, running)
    finally:
        await asyncio.gather(*(channel.close() for channel in channels), return_exceptions=True)
    return stats


# ---- the fleet, seen from the parent --------------------------------------------------------


class Fleet:
    """N simulated devices in ``processes`` spawned processes; ``start()``, run rounds, then ``stop()``."""

    def __init__(self, specs: Sequence[DeviceSpec], options: FleetOptions, processes: int | None = None) -> None:
        if not specs:
            raise ValueError("a fleet needs at least one device")
        count = max(1, min(processes or min(4, len(specs)), len(specs)))
        self._groups = [list(specs[k::count]) for k in range(count)]
        self._options = options
        # spawn, not fork: the parent may hold torch, threads and open sockets the children must not inherit.
        self._context = multiprocessing.get_context("spawn")
        self._stop = self._context.Event()
        self._outbox: Any = self._context.Queue()
        self._beats: list[Any] = [self._context.Queue() for _ in range(options.heartbeat_procs)]
        self._processes: list[Any] = []
        self._heartbeat_processes: list[Any] = []

    def heartbeat_nice(self) -> list[int]:
        """The nice value each heartbeat process runs at."""
        return [os.getpriority(os.PRIO_PROCESS, p.pid) for p in self._heartbeat_processes if p.pid is not None]

    @property
    def process_count(self) -> int:
        return len(self._groups)

    @property
    def pids(self) -> list[int]:
        """Process ids of the device and heartbeat processes started so far."""
        return [p.pid for p in self._processes + self._heartbeat_processes if p.pid is not None]

    def start(self, timeout_s: float) -> int:
        """Spawns the processes; returns how many devices enrolled and prepared their update."""
        for index, inbox in enumerate(self._beats):
            process = self._context.Process(target=_heartbeat_process, name=f"simheartbeats-{index}", daemon=True,
                                            args=(index, self._options, inbox, self._stop, self._outbox))
            process.start()
            self._heartbeat_processes.append(process)
        for index, group in enumerate(self._groups):
            beats = self._beats[index % len(self._beats)] if self._beats else None
            process = self._context.Process(target=_device_process, name=f"simdevices-{index}", daemon=True,
                                            args=(index, group, self._options, self._stop, self._outbox, beats))
            process.start()
            self._processes.append(process)
        ready, problems = 0, []
        for _, _, enrolled, found in self._receive("ready", timeout_s, len(self._processes)):
            ready += enrolled
            problems += found
        if problems:
            raise FleetError(f"{sum(map(len, self._groups)) - ready} device(s) failed to start, e.g. {problems[0]}")
        return ready

    def stop(self, timeout_s: float = 60.0) -> FleetStats:
        """Stops every device and returns their merged statistics."""
        self._stop.set()
        merged = FleetStats()
        try:
            for _, _, stats in self._receive("stats", timeout_s,
                                             len(self._processes) + len(self._heartbeat_processes)):
                merged.merge(stats)
        finally:
            self._reap()
        return merged

    def _receive(self, kind: str, timeout_s: float, expected: int) -> list[tuple[Any, ...]]:
        """The next ``expected`` messages of ``kind`` from the processes (FleetError if one died first)."""
        deadline = time.monotonic() + timeout_s
        messages: list[tuple[Any, ...]] = []
        processes = self._processes + self._heartbeat_processes
        while len(messages) < expected:
            try:
                message = self._outbox.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                dead = [p.name for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise FleetError(f"device process(es) {', '.join(dead)} died before reporting {kind!r}") from None
                if time.monotonic() > deadline:
                    raise FleetError(f"{expected - len(messages)} process(es) did not report "
                                     f"{kind!r} within {timeout_s:.0f} s") from None
                continue
            if message[0] == kind:
                messages.append(message)
        return messages

    def _reap(self) -> None:
        for process in self._processes + self._heartbeat_processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if any(p.is_alive() for p in self._processes + self._heartbeat_processes):
            self._stop.set()
            self._reap()
