"""Fuzzing the upload path over real gRPC: random and mutated payloads, headers and chunk streams.

Properties, for every generated upload: the coordinator answers with a deliberate status (never INTERNAL or
UNKNOWN, never a crash), and it accepts only bytes identical to a valid payload. At the end every accepted
update of the round is checked against the valid payloads byte for byte, and the coordinator still takes
a valid upload. Hypothesis runs derandomized (the same examples every run) for a bounded time; set
``MLECS_FUZZ_EXAMPLES`` to run more.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from edge_agent.client import CoordinatorClient
from edge_agent.tasks import TrainTask
from mlecs.codec import MAGIC, encode_tensors, iter_chunks, sha256_hex
from mlecs.proto.v1 import fleet_pb2 as pb
from mlecs.proto.v1 import fleet_pb2_grpc
from server.config import CoordinatorSettings
from server.domain.models import UpdateState
from server.learning.global_model import adapter_schema
from tests.integration.coordinator_harness import RunningCoordinator, running_coordinator

TINY = {"backbone": "tiny"}
EXAMPLES = int(os.environ.get("MLECS_FUZZ_EXAMPLES", "600"))
POOL = 48
"""Devices enrolled for the round: each may have one update accepted, so the fuzzer moves to the next."""
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
_CODEC = {"fp32": pb.CODEC_FP32_ZSTD, "fp16": pb.CODEC_FP16_ZSTD}


@dataclass
class Fuzz:
    c: RunningCoordinator
    task: TrainTask
    devices: list[tuple[str, str]]
    stub: fleet_pb2_grpc.FleetStub
    valid: dict[str, bytes]
    """codec -> a valid payload (only a subset of the schema's tensors: updates may omit tensors)."""
    spare: tuple[str, str]
    """A device kept out of the fuzzing, to show that a valid upload still goes through afterwards."""
    retired: set[str] = field(default_factory=set)
    accepted: int = 0
    codes: dict[str, int] = field(default_factory=dict)

    def device(self, pick: int) -> tuple[str, str]:
        live = [d for d in self.devices if d[0] not in self.retired] or self.devices
        return live[pick % len(live)]


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    # No rate limit here: the fuzzer means to reach validation, not the limiter (tested on its own).
    settings_ = CoordinatorSettings(state_dir=tmp_path_factory.mktemp("fuzz"), max_message_bytes=64 * 1024,
                                    max_upload_bytes=256 * 1024, device_rate_per_s=0)
    with running_coordinator(settings_) as c:
        federation = c.admin.post("/v1/federations", json={
            "name": f"fuzz-{uuid.uuid4().hex[:8]}",
            "config": {"model": TINY, "server_learning": False, "min_updates": POOL + 1}}).json()
        devices = []
        for k in range(POOL + 1):
            client = CoordinatorClient(c.grpc_address, task_wait_s=0)
            device_id, secret, _ = client.enrol(federation["name"], f"fuzz-{k}", ["image", "audio"])
            devices.append((device_id, secret, client))
        assert c.admin.post(f"/v1/federations/{federation['id']}/rounds").status_code == 201
        device_id, _, client = devices[0]
        client.authenticate(device_id, devices[0][1])
        task = client.get_task(device_id)
        assert isinstance(task, TrainTask)
        rng = np.random.default_rng(0)
        subset = {name: rng.normal(0, 0.01, shape).astype(np.float32)
                  for name, shape in adapter_schema(TINY).items() if name.startswith(("head.", "lora.layer0."))}
        valid = {codec: encode_tensors(subset, codec) for codec in ("fp16", "fp32")}
        stub = fleet_pb2_grpc.FleetStub(grpc.insecure_channel(c.grpc_address))
        yield Fuzz(c, task, [(d, s) for d, s, _ in devices[:-1]], stub, valid, devices[-1][:2])
        for _, _, client in devices:
            client.close()


# ---- generators -----------------------------------------------------------------------------------------


def _inner(payload: bytes) -> tuple[dict[str, Any], bytes]:
    inner = zstandard.ZstdDecompressor().decompress(payload[6:])
    (length,) = struct.unpack_from("<I", inner)
    return json.loads(inner[4:4 + length]), inner[4 + length:]


def _outer(header: Any, body: bytes) -> bytes:
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    inner = struct.pack("<I", len(raw)) + raw + body
    return MAGIC + struct.pack("<H", 1) + zstandard.ZstdCompressor(write_content_size=True,
                                                                   write_checksum=True).compress(inner)


_ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                      max_size=3), max_leaves=6)


def _forge(draw: Any, valid: bytes) -> bytes:
    """A well-framed tensor set whose inner header (or payload) an honest encoder would never write."""
    header, body = _inner(valid)
    entries = header["tensors"]
    target = draw(st.sampled_from(["entry", "payload_bytes", "codec", "tensors", "body", "document"]))
    if target == "entry":
        entry = entries[draw(st.integers(0, len(entries) - 1))]
        key = draw(st.sampled_from(["name", "shape", "dtype", "offset", "nbytes", "extra"]))
        entry[key] = draw(st.sampled_from([
            "", "head.weight", "backdoor", "float16", "int8", -1, 0, 2**62, [10], [10, 64], [0], [64, 10], 1.5, None,
            True]) | _ANY_JSON)
    elif target == "payload_bytes":
        header["payload_bytes"] = draw(st.integers(-1, 2**34) | _ANY_JSON)
    elif target == "codec":
        header["codec"] = draw(st.sampled_from(["fp32", "fp16", "int8", "fp64", ""]) | _ANY_JSON)
    elif target == "tensors":
        header["tensors"] = draw(st.sampled_from([[], entries + entries, entries[::-1], entries[:1]]) | _ANY_JSON)
    elif target == "body":
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + draw(st.binary(max_size=64)) + body[cut + draw(st.integers(0, 64)):]
    else:
        return _outer(draw(_ANY_JSON), body)
    return _outer(header, body)


def _payload(draw: Any, fuzz: Fuzz) -> tuple[bytes, str]:
    """(bytes to upload, the codec they claim)."""
    codec = draw(st.sampled_from(sorted(fuzz.valid)))
    valid = fuzz.valid[codec]
    kind = draw(st.sampled_from(["valid", "random", "truncated", "bitflip", "appended", "forged", "other_codec"]))
    if kind == "valid":
        return valid, codec
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=4096) | st.binary(min_size=1, max_size=8).map(lambda b: MAGIC + b)
                    ), codec
    if kind == "truncated":
        return valid[:draw(st.integers(1, len(valid) - 1))], codec
    if kind == "bitflip":
        flipped = bytearray(valid)
        for position in draw(st.lists(st.integers(0, len(valid) * 8 - 1), min_size=1, max_size=8)):
            flipped[position // 8] ^= 1 << (position % 8)
        return bytes(flipped), codec
    if kind == "appended":
        return valid + draw(st.binary(min_size=1, max_size=64)), codec
    if kind == "forged":
        return _forge(draw, valid), codec
    return valid, "fp32" if codec == "fp16" else "fp16"  # honest bytes, header naming the other codec


def _header(draw: Any, fuzz: Fuzz, device_id: str, payload: bytes, codec: str) -> pb.UploadHeader:
    fields: dict[str, Any] = dict(
        round_id=fuzz.task.round_id, device_id=device_id, upload_id=uuid.uuid4().hex, codec=_CODEC[codec],
        total_size=len(payload), sha256=sha256_hex(payload), modalities=[pb.MODALITY_IMAGE, pb.MODALITY_AUDIO],
        base_version_id=fuzz.task.version_id, samples=pb.SampleCounts(public_samples=10, private_samples=10))
    for key in draw(st.lists(st.sampled_from([
            "round_id", "device_id", "upload_id", "codec", "total_size", "sha256", "modalities", "base_version_id",
            "samples", "resume_offset", "fused_sample_ids", "metrics"]), max_size=3, unique=True)):
        if key in ("round_id", "device_id", "base_version_id", "upload_id"):
            fields[key] = draw(st.sampled_from(["", fuzz.devices[-1][0], "x" * 65, "../../etc/passwd", "a" * 8])
                               | st.text(max_size=80))
        elif key == "codec":
            fields[key] = draw(st.integers(0, 6))
        elif key == "total_size":
            fields[key] = draw(st.sampled_from([0, 1, len(payload) - 1, len(payload) + 1, 2**63])
                               | st.integers(0, 2**64 - 1))
        elif key == "sha256":
            fields[key] = draw(st.sampled_from(["", "0" * 64, sha256_hex(payload).upper()]) | st.text(max_size=70))
        elif key == "modalities":
            fields[key] = draw(st.lists(st.integers(0, 7), max_size=5))
        elif key == "samples":
            fields[key] = pb.SampleCounts(public_samples=draw(st.integers(0, 2**64 - 1)),
                                          private_samples=draw(st.integers(0, 2**64 - 1)))
        elif key == "resume_offset":
            fields[key] = draw(st.integers(0, 2**64 - 1))
        elif key == "fused_sample_ids":
            fields[key] = draw(st.lists(st.integers(0, 2**32 - 1), max_size=40))
        else:
            fields[key] = draw(st.dictionaries(st.text(max_size=10), st.floats(), max_size=4))
    return pb.UploadHeader(**fields)


def _stream(draw: Any, header: pb.UploadHeader, payload: bytes) -> list[pb.UploadMessage]:
    # Not too small: every chunk is fsynced on arrival, and the run must stay short.
    size = draw(st.sampled_from([512, 1500, 4096, 16 * 1024]) | st.integers(256, 16 * 1024))
    chunks = [pb.UploadMessage(chunk=pb.UploadChunk(offset=o, data=d)) for o, d in iter_chunks(payload, size)]
    how = draw(st.sampled_from(["in_order", "in_order", "shuffled", "dropped", "duplicated", "offsets", "cut",
                                "extra_header", "no_header", "empty_messages", "oversized"]))
    if how == "shuffled":
        chunks = draw(st.permutations(chunks))
    elif how == "dropped" and chunks:
        del chunks[draw(st.integers(0, len(chunks) - 1))]
    elif how == "duplicated" and chunks:
        k = draw(st.integers(0, len(chunks) - 1))
        chunks.insert(draw(st.integers(0, len(chunks))), chunks[k])
    elif how == "offsets" and chunks:
        k = draw(st.integers(0, len(chunks) - 1))
        chunks[k] = pb.UploadMessage(chunk=pb.UploadChunk(offset=draw(st.integers(0, 2**64 - 1)),
                                                          data=chunks[k].chunk.data))
    elif how == "cut":
        chunks = chunks[:draw(st.integers(0, len(chunks)))]
    elif how == "extra_header":
        chunks.insert(draw(st.integers(0, len(chunks))), pb.UploadMessage(header=header))
    elif how == "oversized":  # over max_message_bytes: gRPC itself refuses it
        chunks.append(pb.UploadMessage(chunk=pb.UploadChunk(offset=len(payload), data=bytes(65 * 1024))))
    elif how == "empty_messages":
        chunks.insert(draw(st.integers(0, len(chunks))), pb.UploadMessage())
    return chunks if how == "no_header" else [pb.UploadMessage(header=header), *chunks]


# ---- the property ---------------------------------------------------------------------------------------


def _internal_errors() -> float:
    return REGISTRY.get_sample_value("mlecs_rpc_duration_seconds_count",
                                     {"method": "UploadUpdate", "code": "INTERNAL"}) or 0.0


def test_fuzzed_uploads_get_a_deliberate_answer_and_only_valid_bytes_are_accepted(fuzz: Fuzz) -> None:
    services = fuzz.c.coordinator.services
    assert services is not None
    store, blobs = services.ctx.store, services.ctx.blobs
    valid_bytes = set(fuzz.valid.values())
    internal = _internal_errors()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def upload_once(data: st.DataObject) -> None:
        device_id, secret = fuzz.device(data.draw(st.integers(0, POOL)))
        payload, codec = _payload(data.draw, fuzz)
        header = _header(data.draw, fuzz, device_id, payload, codec)
        messages = _stream(data.draw, header, payload)
        metadata = (("authorization", f"Device {device_id}:{secret}"),)
        try:
            reply = fuzz.stub.UploadUpdate(iter(messages), metadata=metadata, timeout=60)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            reply = None
        fuzz.codes[code.name] = fuzz.codes.get(code.name, 0) + 1
        assert code in ALLOWED, f"{code.name}: {details}"
        if reply is not None and reply.state == pb.UPLOAD_STATE_ACCEPTED:
            update = store.find_update_by_upload(device_id, reply.upload_id)
            assert update is not None and update.state is UpdateState.ACCEPTED and update.blob_key
        else:
            # A stream refused after its last valid chunk (an oversized message behind it, say) may be refused
            # by gRPC after the update was accepted: the device learns so on its next status call.
            update = store.find_update_by_upload(device_id, header.upload_id) if header.upload_id else None
            if update is None or update.state is not UpdateState.ACCEPTED:
                return
        assert blobs.get(update.blob_key) in valid_bytes, "accepted bytes that are not a valid payload"
        fuzz.retired.add(device_id)
        fuzz.accepted += 1

    upload_once()

    # Nothing crashed, and everything the round holds as accepted is byte for byte a valid payload.
    assert _internal_errors() == internal
    accepted = [u for u in store.list_updates(fuzz.task.round_id) if u.state is UpdateState.ACCEPTED]
    assert len(accepted) == fuzz.accepted
    assert all(u.blob_key and blobs.get(u.blob_key) in valid_bytes for u in accepted)
    assert set(fuzz.codes) - {"OK"}, fuzz.codes  # the fuzzer did reach the refusals
    # The coordinator still serves: the spare device's valid upload is accepted.
    device_id, secret = fuzz.spare
    payload = fuzz.valid["fp16"]
    header = pb.UploadHeader(
        round_id=fuzz.task.round_id, device_id=device_id, upload_id=uuid.uuid4().hex, codec=pb.CODEC_FP16_ZSTD,
        total_size=len(payload), sha256=sha256_hex(payload), modalities=[pb.MODALITY_IMAGE],
        base_version_id=fuzz.task.version_id, samples=pb.SampleCounts(public_samples=10, private_samples=10))
    reply = fuzz.stub.UploadUpdate(iter([pb.UploadMessage(header=header),
                                         pb.UploadMessage(chunk=pb.UploadChunk(offset=0, data=payload))]),
                                   metadata=(("authorization", f"Device {device_id}:{secret}"),), timeout=60)
    assert reply.state == pb.UPLOAD_STATE_ACCEPTED
    assert fuzz.c.admin.get("/healthz").status_code == 200
    print(f"fuzzed uploads by status: {fuzz.codes}; accepted {fuzz.accepted}")
