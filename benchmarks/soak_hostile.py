"""Hostile devices for the soak benchmark: enrolled like any device, then attacking the coordinator's
resources every cycle over real gRPC (``benchmarks.soak`` runs them in a process of their own).

Each device, each cycle (about every ``cycle_s`` seconds), while a round it is invited to is open:

- **idle streams**: opens three upload streams that send nothing (the coordinator admits two per device
  and closes them after its idle timeout);
- **staging fill**: starts four uploads under fresh ids, each declaring 8 MiB and sending 1 MiB (the
  coordinator keeps two partial uploads per device and expires them with their round);
- **floods**: 50 heartbeats back to back, and 50 task polls with a made-up credential (refused, and
  after a burst refused before they cost a database read);
- **garbage frames**: bytes that are no protobuf message, to a unary method and inside an upload stream.

Nothing here may succeed in hurting the federation: the soak benchmark checks that every round commits,
that honest uploads stay fast, and that memory, files and staged bytes stay flat.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc

from mlecs import wire
from mlecs.proto.v1 import fleet_pb2 as pb
from mlecs.proto.v1 import fleet_pb2_grpc

GARBAGE = b"\xff" * 10 + b"\x01"
DECLARED_BYTES = 8 * 1024 * 1024
SENT_BYTES = 1024 * 1024


@dataclass
class HostileOptions:
    address: str
    federation: str
    devices: int
    cycle_s: float = 5.0
    tactics: tuple[str, ...] = ("idle", "staging", "flood", "garbage")


@dataclass
class _Hostile:
    name: str
    stub: fleet_pb2_grpc.FleetStub
    device_id: str = ""
    metadata: tuple[tuple[str, str], ...] = ()
    outcomes: Counter[str] = field(default_factory=Counter)
    details: dict[str, str] = field(default_factory=dict)
    """The first answer's detail for each outcome, so a report can say what the coordinator said."""


async def _attempt(device: _Hostile, tactic: str, call: Any) -> None:
    """Runs one hostile call and counts how the coordinator answered it (by status code)."""
    try:
        await call
        device.outcomes[f"{tactic}:OK"] += 1
    except grpc.aio.AioRpcError as exc:
        key = f"{tactic}:{exc.code().name}"
        device.outcomes[key] += 1
        device.details.setdefault(key, (exc.details() or "")[:300])
    except (TimeoutError, asyncio.CancelledError):
        device.outcomes[f"{tactic}:timeout"] += 1


async def _silent() -> Any:
    await asyncio.sleep(3600)  # never sends: the coordinator's idle timeout must close the stream
    yield pb.UploadMessage()


async def _open_round(device: _Hostile) -> tuple[str, str]:
    """The open round the device is invited to and its base version, or empty strings."""
    reply = await device.stub.GetTask(pb.GetTaskRequest(device_id=device.device_id, wait_s=0),
                                      metadata=device.metadata, timeout=30)
    if reply.WhichOneof("task") != "train":
        return "", ""
    return reply.train.round_id, reply.train.global_version_id


async def _cycle(device: _Hostile, options: HostileOptions, raw: grpc.aio.Channel) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError):
        await device.stub.Heartbeat(pb.HeartbeatRequest(device_id=device.device_id), metadata=device.metadata,
                                    timeout=30)
    try:
        round_id, base_version_id = await _open_round(device)
    except grpc.aio.AioRpcError:
        round_id = base_version_id = ""
    if "staging" in options.tactics and round_id:
        # First, one after another: concurrent with the idle streams they would find the device's two stream
        # slots taken (refused without staging anything), which tests the stream limit, not staging.
        for _ in range(4):
            await _attempt(device, "staging", _partial_upload(device, round_id, base_version_id))
    calls = []
    if "idle" in options.tactics:
        calls += [_attempt(device, "idle", device.stub.UploadUpdate(_silent(), metadata=device.metadata,
                                                                    timeout=120)) for _ in range(3)]
    if "flood" in options.tactics:
        calls += [_attempt(device, "flood", device.stub.Heartbeat(
            pb.HeartbeatRequest(device_id=device.device_id), metadata=device.metadata, timeout=30))
            for _ in range(50)]
        calls += [_attempt(device, "flood_unauthenticated", device.stub.GetTask(
            pb.GetTaskRequest(wait_s=0), metadata=(("authorization", f"Device guess-{uuid.uuid4().hex}:x"),),
            timeout=30)) for _ in range(50)]
    if "garbage" in options.tactics:
        unary = raw.unary_unary("/mlecs.v1.Fleet/GetTask")
        stream = raw.stream_unary("/mlecs.v1.Fleet/UploadUpdate")
        calls += [_attempt(device, "garbage", unary(GARBAGE, timeout=30)) for _ in range(5)]
        calls.append(_attempt(device, "garbage", stream(_garbage_frames(), metadata=device.metadata, timeout=30)))
    await asyncio.gather(*calls)


async def _garbage_frames() -> Any:
    yield GARBAGE


async def _partial_upload(device: _Hostile, round_id: str, base_version_id: str) -> pb.UploadResponse:
    data = os.urandom(SENT_BYTES)
    header = pb.UploadHeader(
        round_id=round_id, device_id=device.device_id, upload_id=uuid.uuid4().hex, codec=pb.CODEC_FP16_ZSTD,
        total_size=DECLARED_BYTES, sha256=hashlib.sha256(data).hexdigest(), modalities=[pb.MODALITY_IMAGE],
        samples=pb.SampleCounts(public_samples=10, private_samples=10), base_version_id=base_version_id)

    async def messages() -> Any:
        yield pb.UploadMessage(header=header)
        yield pb.UploadMessage(chunk=pb.UploadChunk(offset=0, data=data))

    result: pb.UploadResponse = await device.stub.UploadUpdate(messages(), metadata=device.metadata, timeout=60)
    return result


async def _run(options: HostileOptions, stop: Any, results: Any) -> None:
    channel = grpc.aio.insecure_channel(options.address)
    raw = grpc.aio.insecure_channel(options.address)
    devices = [_Hostile(f"hostile-{i}", fleet_pb2_grpc.FleetStub(channel)) for i in range(options.devices)]
    for device in devices:
        reply = await device.stub.Enrol(wire.enrol_request(options.federation, device.name, ["image"]), timeout=60)
        device.device_id = reply.device_id
        device.metadata = wire.credential(reply.device_id, reply.device_secret)
    results.put(("ready", len(devices)))
    while not stop.is_set():
        loop = asyncio.get_running_loop()
        started = loop.time()
        cycles = [asyncio.ensure_future(_cycle(d, options, raw)) for d in devices]
        # Idle streams last until the coordinator closes them; the next cycle starts on time regardless.
        await asyncio.wait(cycles, timeout=options.cycle_s)
        await asyncio.sleep(max(0.0, options.cycle_s - (loop.time() - started)))
    totals: Counter[str] = Counter()
    details: dict[str, str] = {}
    for device in devices:
        totals.update(device.outcomes)
        for key, detail in device.details.items():
            details.setdefault(key, detail)
    results.put(("done", {"counts": dict(totals), "details": details}))
    await channel.close(grace=1)
    await raw.close(grace=1)


def hostile_process(options: HostileOptions, stop: Any, results: Any) -> None:
    """The hostile devices' process: enrols them, attacks until ``stop`` is set, reports outcome counts."""
    asyncio.run(_run(options, stop, results))
