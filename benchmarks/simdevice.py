"""Simulated devices for load tests: real gRPC and the real codec, but no training and no torch.

A ``SimDevice`` enrols, heartbeats on its own schedule and polls for tasks. Asked to train, it downloads
the global version and uploads a delta of small random values shaped like the adapter tensors it may
hold. The delta is encoded once per device, before the rounds, and its bytes are reused every round
(with a fresh upload id), so the device processes spend their CPU on the protocol rather than on numpy
and zstd, and no round waits for a device to encode.

``benchmarks.simfleet.Fleet`` runs many of them in a few processes.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np

from mlecs import wire
from mlecs.codec import encode_tensors, peek_header, sha256_hex
from mlecs.endpoints import with_port
from mlecs.proto.v1 import fleet_pb2 as pb
from mlecs.proto.v1 import fleet_pb2_grpc
from mlecs.tensor_names import FUSED_TENSOR, device_may_send

T = TypeVar("T")

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
MODALITY_SETS: tuple[tuple[str, ...], ...] = (("image",), ("audio",), ("audio", "image"))
"""Device i holds MODALITY_SETS[i % 3]: a third image-only, a third audio-only, a third both."""
_MAX_ERROR_SAMPLES = 5


class FleetError(RuntimeError):
    """A device process died, or did not enrol or report its statistics in time."""


def tensor_allowed(name: str, modalities: frozenset[str] | set[str]) -> bool:
    """Whether a device with these modalities may send this tensor (the coordinator refuses the others)."""
    return name != FUSED_TENSOR and device_may_send(name, modalities)


def make_delta(shapes: Mapping[str, tuple[int, ...]], modalities: frozenset[str], seed: int,
               scale: float = 1e-3) -> dict[str, np.ndarray]:
    """Small random float32 values for every tensor of the global adapter the device may hold."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
            for name, shape in sorted(shapes.items()) if tensor_allowed(name, modalities)}


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    modalities: tuple[str, ...]
    seed: int


def make_specs(count: int, seed: int = 0) -> list[DeviceSpec]:
    """``count`` devices with distinct names and seeds, their modality sets spread evenly."""
    return [DeviceSpec(name=f"sim-{i:05d}", modalities=MODALITY_SETS[i % len(MODALITY_SETS)],
                       seed=seed * 1_000_003 + i) for i in range(count)]


@dataclass(frozen=True)
class FleetOptions:
    address: str
    """host:port of the coordinator's gRPC endpoint."""
    federation: str
    heartbeat_s: float | None = None
    """Seconds between heartbeats; None: the interval the coordinator returns."""
    poll_s: float = 0.2
    """Longest wait between GetTask calls while told to wait (the coordinator's retry_after_s is longer:
    honouring it would add up to that much to every round's start)."""
    task_wait_s: int = 20
    """Long poll: how long the coordinator may hold a GetTask while there is nothing to do (it answers
    as soon as a round opens; GetTask latencies therefore include the time held)."""
    rpc_timeout_s: float = 60.0
    stream_timeout_s: float = 600.0
    """Deadline of one download or upload; uploads queue up behind each other when many devices train."""
    enrol_concurrency: int = 16
    """Enrolments in flight at once per process."""
    heartbeat_procs: int = 0
    """Processes that send the devices' heartbeats (each device's on a connection of its own), apart from the
    processes that run the devices' tasks and transfers; 0: each device heartbeats from its own process. A real
    device's heartbeat does not wait for 250 other devices' transfers to give its process a turn."""
    heartbeat_nice: int | None = None
    """Nice value of the heartbeat processes (None: inherited). Simulated devices share the coordinator's
    CPUs, where real ones have their own: raised, their heartbeats are not timed by the coordinator's load on
    the sender. Raising priority needs CAP_SYS_NICE; without it the processes run at the inherited one."""
    payload_variants: int = 0
    """0: every device encodes an update of its own before the rounds. K > 0: the devices of a process with the
    same modality set share K encoded updates (device seed modulo K), so a large fleet of which a round invites a
    cohort does not hold one update per device in memory (10,000 devices x 2.6 MB would not fit). Devices sharing
    an update upload identical bytes, which the coordinator stores once."""
    shared_channel: bool = False
    """One connection per device process instead of one per device. Real devices each have their own
    connection; sharing one puts every device's heartbeat behind the others' transfers (HTTP/2 flow
    control and socket buffers are per connection), which measures the benchmark, not the coordinator."""


@dataclass
class FleetStats:
    """What the devices of one or more processes observed. Times are wall-clock (``time.time()``)."""

    calls: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    """Method -> (start time, seconds) of every successful call; streams are timed end to end."""
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """"Method:STATUS" -> count."""
    error_samples: dict[str, str] = field(default_factory=dict)
    """The first detail seen for each error key (a few keys at most)."""
    uploads_accepted: int = 0
    uploads_rejected: int = 0
    upload_wire_bytes: int = 0
    """Sum of ``ByteSize()`` of every UploadMessage sent while measuring."""
    download_wire_bytes: int = 0
    """Sum of ``ByteSize()`` of every DownloadChunk received for a train task."""
    downloads: int = 0
    payload_bytes: int = 0
    """Sum over prepared devices of their encoded update's size."""
    payloads: int = 0
    stopping: bool = False
    """Set when the fleet stops: calls it cancels are not failures of the coordinator."""

    def record(self, method: str, started: float, seconds: float) -> None:
        self.calls[method].append((started, seconds))

    def count_error(self, method: str, error: grpc.aio.AioRpcError) -> None:
        self.note_failure(f"{method}:{error.code().name}", str(error.details()))

    def note_failure(self, key: str, detail: str) -> None:
        if self.stopping:
            return
        self.errors[key] += 1
        if key not in self.error_samples and len(self.error_samples) < _MAX_ERROR_SAMPLES:
            self.error_samples[key] = detail

    def merge(self, other: FleetStats) -> None:
        for method, samples in other.calls.items():
            self.calls[method].extend(samples)
        for key, count in other.errors.items():
            self.errors[key] += count
        for key, detail in other.error_samples.items():
            self.error_samples.setdefault(key, detail)
        for name in ("uploads_accepted", "uploads_rejected", "upload_wire_bytes", "download_wire_bytes",
                     "downloads", "payload_bytes", "payloads"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def latencies(self, method: str, since: float = 0.0, until: float = float("inf")) -> list[float]:
        """Seconds of the calls of ``method`` that started within [since, until]."""
        return [seconds for started, seconds in self.calls.get(method, ()) if since <= started <= until]

    def plain(self) -> FleetStats:
        """A copy without defaultdicts (their lambdas cannot be pickled onto the result queue)."""
        return FleetStats(calls=dict(self.calls), errors=dict(self.errors), error_samples=dict(self.error_samples),
                          **{name: getattr(self, name) for name in (
                              "uploads_accepted", "uploads_rejected", "upload_wire_bytes", "download_wire_bytes",
                              "downloads", "payload_bytes", "payloads")})


@dataclass(frozen=True)
class _Payload:
    data: bytes
    sha256: str
    codec: str


@dataclass(frozen=True)
class HeartbeatPlan:
    """What one device's heartbeats need, picklable so that another process can send them."""

    device_id: str
    metadata: tuple[tuple[str, str], ...]
    interval_s: float
    heartbeat_port: int
    """The port the coordinator named for heartbeats (0: its device port)."""
    seed: int


class Heartbeater:
    """One device's heartbeat loop: at a random phase, then every interval; each reply may change the
    interval and the port. ``open_stub(target)`` makes a connection; ``device_stub`` is the device's own
    connection to the device port, used when no heartbeat port is named (else one is opened)."""

    def __init__(self, plan: HeartbeatPlan, options: FleetOptions, stats: FleetStats,
                 open_stub: Callable[[str], fleet_pb2_grpc.FleetStub],
                 device_stub: fleet_pb2_grpc.FleetStub | None = None) -> None:
        self._plan = plan
        self._options = options
        self._stats = stats
        self._open_stub = open_stub
        self._device_stub = device_stub
        self._interval_s = plan.interval_s
        self._port = -1
        self._stub = device_stub
        self._follow(plan.heartbeat_port)

    def _follow(self, port: int) -> None:
        if port == self._port:
            return
        self._port = port
        target = with_port(self._options.address, port) if port else None
        if target is not None:
            self._stub = self._open_stub(target)
        else:
            self._stub = self._device_stub or self._open_stub(self._options.address)

    async def run(self) -> None:
        # A random phase keeps N devices from heartbeating in lockstep.
        await asyncio.sleep(random.Random(self._plan.seed).uniform(0, self._interval_s))
        loop = asyncio.get_running_loop()
        due = loop.time()
        request = pb.HeartbeatRequest(device_id=self._plan.device_id)
        while True:
            assert self._stub is not None
            started, clock = time.time(), time.perf_counter()
            try:
                reply = await self._stub.Heartbeat(request, metadata=self._plan.metadata,
                                                   timeout=self._options.rpc_timeout_s)
            except grpc.aio.AioRpcError as exc:
                self._stats.count_error("Heartbeat", exc)
            else:
                self._stats.record("Heartbeat", started, time.perf_counter() - clock)
                if self._options.heartbeat_s is None and reply.next_heartbeat_s > 0:
                    self._interval_s = float(reply.next_heartbeat_s)
                self._follow(reply.heartbeat_port)
            due = max(due + self._interval_s, loop.time())
            await asyncio.sleep(due - loop.time())


class SimDevice:
    """One simulated device on a shared stub: enrol, then ``heartbeats()`` and ``tasks()`` until cancelled."""

    def __init__(self, stub: fleet_pb2_grpc.FleetStub, spec: DeviceSpec, options: FleetOptions,
                 stats: FleetStats, open_stub: Callable[[str], fleet_pb2_grpc.FleetStub] | None = None) -> None:
        self.spec = spec
        self._stub = stub
        # Heartbeats go to the coordinator's heartbeat port when it names one (``open_stub`` makes a
        # connection there), else to ``stub``.
        self._heartbeat_port = 0
        self._open_stub = open_stub
        self._options = options
        self._stats = stats
        self._rng = random.Random(spec.seed)
        self._modalities = frozenset(spec.modalities)
        self._device_id = ""
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._heartbeat_s = 5.0
        self._payload: _Payload | None = None
        self._done_round = ""

    async def _timed(self, method: str, call: Awaitable[T]) -> T:
        started, clock = time.time(), time.perf_counter()
        try:
            result = await call
        except grpc.aio.AioRpcError as exc:
            self._stats.count_error(method, exc)
            raise
        self._stats.record(method, started, time.perf_counter() - clock)
        return result

    async def enrol(self) -> None:
        reply = await self._timed("Enrol", self._stub.Enrol(
            wire.enrol_request(self._options.federation, self.spec.name, self.spec.modalities,
                               agent_version="simdevice"), timeout=self._options.rpc_timeout_s))
        self._device_id = reply.device_id
        self._metadata = wire.credential(reply.device_id, reply.device_secret)
        self._heartbeat_s = float(self._options.heartbeat_s or reply.heartbeat_interval_s or 5)
        self._heartbeat_port = reply.heartbeat_port

    def heartbeat_plan(self) -> HeartbeatPlan:
        """What another process needs to send this (enrolled) device's heartbeats."""
        return HeartbeatPlan(device_id=self._device_id, metadata=self._metadata, interval_s=self._heartbeat_s,
                             heartbeat_port=self._heartbeat_port, seed=self.spec.seed)

    async def fetch_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the current global adapter's tensors (one download, left out of the stats)."""
        return peek_header(await self._download("", keep=True, measured=False)).shapes

    def prepare(self, shapes: Mapping[str, tuple[int, ...]], codec: str = "fp16",
                shared: dict[tuple[frozenset[str], int, str], _Payload] | None = None) -> None:
        """Encodes this device's update ahead of the rounds, so that no round waits for numpy and zstd; with
        ``shared`` (and ``payload_variants``), takes one of the process's shared updates instead."""
        variants = self._options.payload_variants
        key = (self._modalities, self.spec.seed % variants if variants else self.spec.seed, codec)
        payload = None if shared is None or not variants else shared.get(key)
        if payload is None:
            data = encode_tensors(make_delta(shapes, self._modalities, key[1]), codec)
            payload = _Payload(data=data, sha256=sha256_hex(data), codec=codec)
            if shared is not None and variants:
                shared[key] = payload
        self._payload = payload
        self._stats.payload_bytes += len(payload.data)
        self._stats.payloads += 1

    async def heartbeats(self) -> None:
        """Sends this device's heartbeats from this process until cancelled."""
        open_stub = self._open_stub or (lambda _target: self._stub)
        await Heartbeater(self.heartbeat_plan(), self._options, self._stats, open_stub, self._stub).run()

    async def tasks(self) -> None:
        """Polls for tasks and trains (download, upload) when invited, until told to stop or cancelled."""
        while True:
            try:
                reply = await self._timed("GetTask", self._stub.GetTask(
                    pb.GetTaskRequest(device_id=self._device_id, wait_s=self._options.task_wait_s),
                    metadata=self._metadata,
                    timeout=self._options.rpc_timeout_s))
                kind = reply.WhichOneof("task")
                if kind == "stop":
                    return
                if kind == "train" and reply.train.round_id != self._done_round:
                    await self._train(reply.train)
                    continue
                retry = reply.wait.retry_after_s if kind == "wait" else self._options.poll_s
            except grpc.aio.AioRpcError:  # counted by _timed; the next poll retries
                retry = self._options.poll_s
            except Exception as exc:  # a bug here must show in the report, not end this device quietly
                self._stats.note_failure(f"task:{type(exc).__name__}", str(exc))
                retry = self._options.poll_s
            await asyncio.sleep(min(retry, self._options.poll_s) * self._rng.uniform(0.5, 1.5))

    async def _train(self, task: Any) -> None:
        codec = wire.CODEC_NAME.get(task.config.upload_codec, "fp16")
        rebuild = self._payload is None or self._payload.codec != codec
        adapter = await self._download(task.global_version_id, keep=rebuild, measured=True)
        if rebuild:
            self.prepare(peek_header(adapter).shapes, codec)
        if await self._upload(task):
            self._done_round = task.round_id

    async def _download(self, version_id: str, keep: bool, measured: bool) -> bytes:
        """Streams a global version; returns the adapter bytes when ``keep`` (otherwise they are dropped)."""
        adapter = bytearray()
        wire = 0
        started, clock = time.time(), time.perf_counter()
        call = self._stub.DownloadGlobal(pb.DownloadGlobalRequest(device_id=self._device_id, version_id=version_id),
                                         metadata=self._metadata, timeout=self._options.stream_timeout_s)
        try:
            async for message in call:
                wire += message.ByteSize()
                if keep and message.WhichOneof("part") == "chunk" and message.chunk.kind == pb.BLOB_KIND_ADAPTER:
                    adapter.extend(message.chunk.data)
        except grpc.aio.AioRpcError as exc:
            self._stats.count_error("DownloadGlobal", exc)
            raise
        if measured:
            self._stats.record("DownloadGlobal", started, time.perf_counter() - clock)
            self._stats.download_wire_bytes += wire
            self._stats.downloads += 1
        return bytes(adapter)

    async def _upload(self, task: Any) -> bool:
        """Streams the prepared payload for ``task``'s round; True when the coordinator accepted it."""
        payload = self._payload
        assert payload is not None
        header = wire.upload_header(
            round_id=task.round_id, device_id=self._device_id, upload_id=uuid.uuid4().hex, codec=payload.codec,
            total_size=len(payload.data), sha256=payload.sha256, modalities=self.spec.modalities,
            public_samples=100, private_samples=100, base_version_id=task.global_version_id)
        chunk_bytes = task.config.max_chunk_bytes or 256 * 1024

        def messages() -> Iterator[Any]:
            for message in wire.upload_messages(header, payload.data, chunk_bytes):
                self._stats.upload_wire_bytes += message.ByteSize()
                yield message

        reply = await self._timed("UploadUpdate", self._stub.UploadUpdate(
            messages(), metadata=self._metadata, timeout=self._options.stream_timeout_s))
        if reply.state == pb.UPLOAD_STATE_ACCEPTED:
            self._stats.uploads_accepted += 1
            return True
        if reply.state == pb.UPLOAD_STATE_REJECTED:
            self._stats.uploads_rejected += 1
        return False

