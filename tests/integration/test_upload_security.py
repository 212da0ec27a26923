"""Hostile and broken uploads over real gRPC on loopback: each is refused with the right status and reason,
recorded as a refusal, counted in ``mlecs_refusals_total``, and leaves the model and the round untouched.

One coordinator (embedded store) serves the module; every test makes its own federation and devices, so
metric deltas and refusal rows belong to the test that reads them.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import zstandard
from prometheus_client import REGISTRY

from edge_agent.client import CoordinatorClient, translate
from edge_agent.errors import CoordinatorUnavailable, RequestRefused
from edge_agent.tasks import TrainTask
from mlecs.codec import MAGIC, decode_tensors, encode_tensors, iter_chunks, sha256_hex
from mlecs.model import tensor_modality
from mlecs.proto.v1 import fleet_pb2 as pb
from mlecs.proto.v1 import fleet_pb2_grpc
from server.config import CoordinatorSettings
from server.domain.models import Refusal, UpdateState
from tests.integration.coordinator_harness import RunningCoordinator, running_coordinator, wait_for_round

TINY = {"backbone": "tiny"}
MAX_MESSAGE = 64 * 1024
MAX_UPLOAD = 1024 * 1024
CHUNK = 16 * 1024
_CODEC = {"fp32": pb.CODEC_FP32_ZSTD, "fp16": pb.CODEC_FP16_ZSTD, "int8": pb.CODEC_INT8_ZSTD}
_MODALITY = {"image": pb.MODALITY_IMAGE, "audio": pb.MODALITY_AUDIO}


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    settings = CoordinatorSettings(state_dir=tmp_path_factory.mktemp("security"), max_message_bytes=MAX_MESSAGE,
                                   max_upload_bytes=MAX_UPLOAD)
    with running_coordinator(settings) as running:
        yield running


# ---- helpers ------------------------------------------------------------------------------------------


@dataclass
class Dev:
    id: str
    secret: str
    client: CoordinatorClient
    stub: fleet_pb2_grpc.FleetStub
    modalities: list[str]

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Device {self.id}:{self.secret}"),)

    def send(self, messages: Iterable[pb.UploadMessage]) -> pb.UploadResponse:
        return self.stub.UploadUpdate(iter(list(messages)), metadata=self.metadata, timeout=60)


@dataclass
class Setup:
    c: RunningCoordinator
    federation: dict[str, Any]
    task: TrainTask
    base: dict[str, np.ndarray]


def _federation(c: RunningCoordinator, **config: Any) -> dict[str, Any]:
    body = {"name": f"sec-{uuid.uuid4().hex[:8]}",
            "config": {"model": TINY, "public_epochs": 1, "server_learning": False, **config}}
    response = c.admin.post("/v1/federations", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def _enrol(c: RunningCoordinator, federation: dict[str, Any], name: str, modalities: list[str]) -> Dev:
    client = CoordinatorClient(c.grpc_address, task_wait_s=0)
    device_id, secret, _ = client.enrol(federation["name"], name, modalities)
    client.authenticate(device_id, secret)
    return Dev(device_id, secret, client, fleet_pb2_grpc.FleetStub(grpc.insecure_channel(c.grpc_address)),
               modalities)


def _open_round(c: RunningCoordinator, federation: dict[str, Any], *devices: Dev) -> Setup:
    started = c.admin.post(f"/v1/federations/{federation['id']}/rounds")
    assert started.status_code == 201, started.text
    tasks = [d.client.get_task(d.id) for d in devices]
    assert all(isinstance(t, TrainTask) for t in tasks), tasks
    base = decode_tensors(devices[0].client.download_global(devices[0].id).adapter)
    return Setup(c, federation, tasks[0], base)  # type: ignore[arg-type]


def _delta(base: dict[str, np.ndarray], modalities: list[str], scale: float = 0.01,
           seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)  # random, so the payload does not compress to a few bytes
    return {name: rng.normal(0, scale, value.shape).astype(np.float32) for name, value in base.items()
            if tensor_modality(name) is None or tensor_modality(name) in modalities}


def _header(s: Setup, dev: Dev, payload: bytes, **overrides: Any) -> pb.UploadHeader:
    fields: dict[str, Any] = dict(
        round_id=s.task.round_id, device_id=dev.id, upload_id=uuid.uuid4().hex, codec=pb.CODEC_FP16_ZSTD,
        total_size=len(payload), sha256=sha256_hex(payload), modalities=[_MODALITY[m] for m in dev.modalities],
        base_version_id=s.task.version_id, samples=pb.SampleCounts(public_samples=50, private_samples=200))
    fields.update(overrides)
    return pb.UploadHeader(**fields)


def _messages(header: pb.UploadHeader, payload: bytes, chunk: int = CHUNK,
              start: int = 0) -> list[pb.UploadMessage]:
    return [pb.UploadMessage(header=header)] + [
        pb.UploadMessage(chunk=pb.UploadChunk(offset=start + offset, data=piece))
        for offset, piece in iter_chunks(payload[start:], chunk)]


def _chunk(offset: int, data: bytes) -> pb.UploadMessage:
    return pb.UploadMessage(chunk=pb.UploadChunk(offset=offset, data=data))


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _state(s: Setup) -> tuple[Any, ...]:
    """Everything a refused upload must leave as it was: the round, its accepted updates, the model."""
    services = s.c.coordinator.services
    assert services is not None
    store = services.ctx.store
    round_ = store.get_round(s.task.round_id)
    federation = store.get_federation(s.federation["id"])
    accepted = sorted(u.id for u in store.list_updates(round_.id) if u.state is UpdateState.ACCEPTED)
    return (round_.state, dict(round_.metrics), list(round_.participants), accepted,
            federation.current_version_id, [v.id for v in store.list_versions(federation.id)])


def _refusals(c: RunningCoordinator, device_id: str) -> list[Refusal]:
    services = c.coordinator.services
    assert services is not None and services.refusals.flush()
    return services.ctx.store.list_refusals(device_id=device_id)


def _expect_refused(s: Setup, dev: Dev, call: Callable[[], Any], code: grpc.StatusCode, reason: str,
                    match: str, method: str = "UploadUpdate") -> grpc.RpcError:
    """Runs ``call``; asserts it is refused with ``code`` (details matching ``match``), counted under
    ``reason``, recorded as a refusal of ``dev``, and without effect on the round or the model."""
    before, counted = _state(s), _count("mlecs_refusals_total", method=method, reason=reason)
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == code, error.details()
    assert match in error.details(), error.details()
    assert _count("mlecs_refusals_total", method=method, reason=reason) == counted + 1
    recorded = [r for r in _refusals(s.c, dev.id) if (r.method, r.reason) == (method, reason)]
    assert recorded, f"no {method}/{reason} refusal recorded for {dev.id}: {_refusals(s.c, dev.id)}"
    assert recorded[0].detail == error.details()
    assert recorded[0].federation_id == s.federation["id"]
    assert _state(s) == before
    return error


def _inner(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """The header and payload inside an encoded tensor set (to forge what an honest encoder never writes)."""
    inner = zstandard.ZstdDecompressor().decompress(payload[6:])
    (length,) = struct.unpack_from("<I", inner)
    return json.loads(inner[4:4 + length]), inner[4 + length:]


def _outer(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    inner = struct.pack("<I", len(raw)) + raw + body
    return MAGIC + struct.pack("<H", 1) + zstandard.ZstdCompressor(write_content_size=True,
                                                                   write_checksum=True).compress(inner)


@pytest.fixture
def two(coordinator: RunningCoordinator) -> tuple[Setup, Dev, Dev]:
    federation = _federation(coordinator)
    alice = _enrol(coordinator, federation, "alice", ["image"])
    bob = _enrol(coordinator, federation, "bob", ["image"])
    return _open_round(coordinator, federation, alice, bob), alice, bob


# ---- identity: another device's name or upload ------------------------------------------------------------


def test_uploading_as_another_device_is_permission_denied(two) -> None:
    s, alice, bob = two
    payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
    error = _expect_refused(s, alice, lambda: alice.send(_messages(_header(s, alice, payload, device_id=bob.id),
                                                                   payload)),
                            grpc.StatusCode.PERMISSION_DENIED, "permission_denied", "only as itself")
    assert "PERMISSION_DENIED" in str(translate(error))
    [row] = [r for r in _refusals(s.c, alice.id) if r.reason == "permission_denied"]
    assert row.round_id == s.task.round_id
    store = s.c.coordinator.services.ctx.store  # type: ignore[union-attr]
    assert store.list_updates(s.task.round_id) == []  # not even a partial row under either name


def test_reusing_another_devices_upload_id_cannot_touch_that_upload(two) -> None:
    s, alice, bob = two
    payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
    header = _header(s, alice, payload)
    first = alice.send([pb.UploadMessage(header=header), _chunk(0, payload[:CHUNK])])
    assert (first.state, first.acknowledged_offset) == (pb.UPLOAD_STATE_PARTIAL, CHUNK)

    # Upload ids belong to their device: Bob naming Alice's starts an upload of his own, so he can neither
    # continue hers where she stopped nor learn how far she got.
    forged = _header(s, bob, payload, upload_id=header.upload_id, resume_offset=CHUNK)
    second = _chunk(CHUNK, payload[CHUNK:2 * CHUNK])
    _expect_refused(s, bob, lambda: bob.send([pb.UploadMessage(header=forged), second]),
                    grpc.StatusCode.INVALID_ARGUMENT, "invalid_request", "must start at offset 0")
    assert bob.client.upload_status(bob.id, s.task.round_id, header.upload_id) == ("partial", 0)
    spliced = _header(s, bob, payload, upload_id=header.upload_id)
    second = _chunk(CHUNK, payload[CHUNK:2 * CHUNK])
    _expect_refused(s, bob, lambda: bob.send([pb.UploadMessage(header=spliced), second]),
                    grpc.StatusCode.INVALID_ARGUMENT, "chunk_offset", "does not continue at the acknowledged offset 0")

    # Alice's upload is as she left it and completes with her bytes.
    assert alice.client.upload_status(alice.id, s.task.round_id, header.upload_id) == ("partial", CHUNK)
    done = alice.send(_messages(_header(s, alice, payload, upload_id=header.upload_id, resume_offset=CHUNK),
                                payload, start=CHUNK))
    assert done.state == pb.UPLOAD_STATE_ACCEPTED
    store = s.c.coordinator.services.ctx.store  # type: ignore[union-attr]
    accepted = [u for u in store.list_updates(s.task.round_id) if u.state is UpdateState.ACCEPTED]
    assert [(u.device_id, u.sha256) for u in accepted] == [(alice.id, sha256_hex(payload))]


def test_replaying_a_committed_upload_changes_nothing_and_other_bytes_under_its_id_are_refused(
        coordinator) -> None:
    federation = _federation(coordinator)
    alice = _enrol(coordinator, federation, "alice", ["image"])
    s = _open_round(coordinator, federation, alice)
    payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
    header = _header(s, alice, payload)
    assert alice.send(_messages(header, payload)).state == pb.UPLOAD_STATE_ACCEPTED
    assert wait_for_round(coordinator.admin, s.task.round_id)["state"] == "committed"
    before = _state(s)

    # The same upload again (a retry after a lost reply) is answered "accepted" and counted once.
    again = alice.send(_messages(header, payload))
    assert (again.state, again.acknowledged_offset) == (pb.UPLOAD_STATE_ACCEPTED, len(payload))
    assert _state(s) == before
    # Other bytes under the committed upload's id, and a new upload for the committed round, are refused.
    other = encode_tensors(_delta(s.base, ["image"], seed=1), "fp16")
    _expect_refused(s, alice, lambda: alice.send(_messages(_header(s, alice, other, upload_id=header.upload_id),
                                                           other)),
                    grpc.StatusCode.FAILED_PRECONDITION, "conflict", "used for different content")
    _expect_refused(s, alice, lambda: alice.send(_messages(_header(s, alice, other), other)),
                    grpc.StatusCode.FAILED_PRECONDITION, "late", "arrived too late")


# ---- sizes --------------------------------------------------------------------------------------------


def test_a_message_over_max_message_bytes_is_refused_by_grpc_itself(two) -> None:
    s, alice, _ = two
    payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
    assert len(payload) > MAX_MESSAGE
    before = _state(s)
    with pytest.raises(grpc.RpcError) as caught:
        alice.send(_messages(_header(s, alice, payload), payload, chunk=MAX_MESSAGE + 1))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in caught.value.details()
    # The agent does not retry what can never pass.
    assert isinstance(translate(caught.value), RequestRefused)
    with pytest.raises(grpc.RpcError) as unary:
        alice.stub.Heartbeat(pb.HeartbeatRequest(device_id="x" * MAX_MESSAGE), metadata=alice.metadata)
    assert unary.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _state(s) == before


def test_a_declared_size_over_max_upload_bytes_is_refused_at_the_header(two) -> None:
    s, alice, _ = two
    payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
    rejected = _count("mlecs_update_rejections_total", reason="upload_too_large")
    _expect_refused(s, alice, lambda: alice.send([pb.UploadMessage(
                        header=_header(s, alice, payload, total_size=MAX_UPLOAD + 1))]),
                    grpc.StatusCode.INVALID_ARGUMENT, "upload_too_large", f"limit of {MAX_UPLOAD} bytes")
    assert _count("mlecs_update_rejections_total", reason="upload_too_large") == rejected + 1
    assert s.c.coordinator.services.ctx.store.list_updates(s.task.round_id) == []  # type: ignore[union-attr]


@pytest.mark.parametrize("samples", [pb.SampleCounts(public_samples=2**63 - 1, private_samples=1),
                                     pb.SampleCounts(public_samples=1, private_samples=2**31)])
def test_a_sample_count_beyond_what_the_database_holds_is_refused_at_the_header(two, samples) -> None:
    s, alice, _ = two
    payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
    _expect_refused(s, alice, lambda: alice.send([pb.UploadMessage(header=_header(s, alice, payload,
                                                                                  samples=samples))]),
                    grpc.StatusCode.INVALID_ARGUMENT, "invalid_request", "must be at most 2147483647")
    assert s.c.coordinator.services.ctx.store.list_updates(s.task.round_id) == []  # type: ignore[union-attr]


def test_bytes_beyond_the_declared_size_are_refused(two) -> None:
    s, alice, _ = two
    payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
    header = _header(s, alice, payload, total_size=len(payload) - 10)
    _expect_refused(s, alice, lambda: alice.send(_messages(header, payload)),
                    grpc.StatusCode.INVALID_ARGUMENT, "size", "beyond the declared size")


# ---- malformed and out-of-order streams ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "build", "match"), [
    ("no header first", lambda h, p: [_chunk(0, p[:CHUNK]), pb.UploadMessage(header=h)], "must be its header"),
    ("two headers", lambda h, p: [pb.UploadMessage(header=h), pb.UploadMessage(header=h)], "exactly one header"),
    ("empty stream", lambda h, p: [], "no header"),
    ("a message with neither part", lambda h, p: [pb.UploadMessage(header=h), pb.UploadMessage()],
     "exactly one header"),
    ("an empty chunk", lambda h, p: [pb.UploadMessage(header=h), _chunk(0, b"")], "empty chunk"),
])
def test_a_malformed_stream_is_refused(two, name, build, match) -> None:
    s, alice, _ = two
    payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
    _expect_refused(s, alice, lambda: alice.send(build(_header(s, alice, payload), payload)),
                    grpc.StatusCode.INVALID_ARGUMENT, "malformed", match)


@pytest.mark.parametrize(("name", "offsets"), [
    ("a gap", [0, 2 * CHUNK]),
    ("an overlap", [0, 0]),
    ("backwards", [0, CHUNK, CHUNK // 2]),
    ("not starting at zero", [CHUNK]),
])
def test_out_of_order_chunks_are_refused_and_the_upload_resumes_from_what_was_acknowledged(
        two, name, offsets) -> None:
    s, alice, _ = two
    payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
    header = _header(s, alice, payload)
    stream = [pb.UploadMessage(header=header)] + [_chunk(o, payload[o:o + CHUNK]) for o in offsets]
    _expect_refused(s, alice, lambda: alice.send(stream), grpc.StatusCode.INVALID_ARGUMENT, "chunk_offset",
                    "does not continue at the acknowledged offset")
    # Only the chunks in order before the bad one were staged; the upload goes on from there.
    in_order = next(k for k, offset in enumerate(offsets) if offset != k * CHUNK)
    state, acknowledged = alice.client.upload_status(alice.id, s.task.round_id, header.upload_id)
    assert (state, acknowledged) == ("partial", in_order * CHUNK)
    resumed = alice.send(_messages(_header(s, alice, payload, upload_id=header.upload_id,
                                           resume_offset=acknowledged), payload, start=acknowledged))
    assert resumed.state == pb.UPLOAD_STATE_ACCEPTED


# ---- the bytes: values, schema, codec, norm -------------------------------------------------------------


def _forge_non_finite(payload: bytes, value: float, codec: str) -> bytes:
    header, body = _inner(payload)
    fmt = "<f" if codec == "fp32" else "<e"
    return _outer(header, body[:-struct.calcsize(fmt)] + struct.pack(fmt, value))


@pytest.mark.parametrize(("value", "codec"), [(float("nan"), "fp32"), (float("inf"), "fp16"),
                                              (float("-inf"), "fp32")])
def test_nan_or_inf_tensors_are_rejected_as_non_finite(two, value, codec) -> None:
    s, alice, _ = two
    forged = _forge_non_finite(encode_tensors(_delta(s.base, ["image"]), codec), value, codec)
    header = _header(s, alice, forged, codec=_CODEC[codec])
    _expect_refused(s, alice, lambda: alice.send(_messages(header, forged)),
                    grpc.StatusCode.INVALID_ARGUMENT, "non_finite", "non-finite values")
    # The update is rejected for good: its id cannot be used again, and its bytes are gone.
    assert alice.client.upload_status(alice.id, s.task.round_id, header.upload_id) == ("rejected", 0)


def test_a_tensor_of_the_wrong_shape_is_rejected(two) -> None:
    s, alice, _ = two
    delta = _delta(s.base, ["image"])
    delta["head.weight"] = np.zeros((delta["head.weight"].shape[0], delta["head.weight"].shape[1] + 1), np.float32)
    payload = encode_tensors(delta, "fp16")
    _expect_refused(s, alice, lambda: alice.send(_messages(_header(s, alice, payload), payload)),
                    grpc.StatusCode.INVALID_ARGUMENT, "schema", "'head.weight' has shape")


def test_an_extra_tensor_is_rejected(two) -> None:
    s, alice, _ = two
    delta = _delta(s.base, ["image"]) | {"backdoor.weight": np.ones((4, 4), np.float32)}
    payload = encode_tensors(delta, "fp16")
    _expect_refused(s, alice, lambda: alice.send(_messages(_header(s, alice, payload), payload)),
                    grpc.StatusCode.INVALID_ARGUMENT, "schema", "unexpected tensor 'backdoor.weight'")


def test_a_checksum_that_differs_is_rejected(two) -> None:
    s, alice, _ = two
    payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
    _expect_refused(s, alice, lambda: alice.send(_messages(_header(s, alice, payload, sha256="0" * 64), payload)),
                    grpc.StatusCode.INVALID_ARGUMENT, "checksum", "sha256")


def test_stored_dtypes_must_be_what_the_codec_says(two) -> None:
    s, alice, _ = two
    header, body = _inner(encode_tensors(_delta(s.base, ["image"]), "fp32"))
    for entry in header["tensors"]:
        entry["dtype"] = "float16"  # fp32 bytes presented as half precision
    forged = _outer(header, body)
    _expect_refused(s, alice, lambda: alice.send(_messages(_header(s, alice, forged, codec=pb.CODEC_FP32_ZSTD),
                                                           forged)),
                    grpc.StatusCode.INVALID_ARGUMENT, "codec", "codec fp32 needs float32")


def test_a_codec_less_precise_than_the_federations_is_refused_at_the_header(two) -> None:
    s, alice, _ = two  # the federation asks for fp16
    payload = encode_tensors(_delta(s.base, ["image"]), "int8")
    _expect_refused(s, alice, lambda: alice.send(_messages(_header(s, alice, payload, codec=pb.CODEC_INT8_ZSTD),
                                                           payload)),
                    grpc.StatusCode.INVALID_ARGUMENT, "codec", "less precise than this federation's upload codec")
    # A more precise codec is fine.
    exact = encode_tensors(_delta(s.base, ["image"]), "fp32")
    assert alice.send(_messages(_header(s, alice, exact, codec=pb.CODEC_FP32_ZSTD), exact)).state == \
        pb.UPLOAD_STATE_ACCEPTED


def test_a_payload_that_would_inflate_past_its_tensors_is_refused_before_inflating(two) -> None:
    s, alice, _ = two
    header = {"codec": "fp32", "payload_bytes": 256 * 1024 * 1024, "tensors": [
        {"name": "head.bias", "shape": [10], "dtype": "float32", "offset": 0, "nbytes": 40}]}
    bomb = _outer(header, bytes(256 * 1024 * 1024))  # 256 MiB of zeros in a few KiB
    assert len(bomb) < MAX_UPLOAD
    _expect_refused(s, alice, lambda: alice.send(_messages(_header(s, alice, bomb, codec=pb.CODEC_FP32_ZSTD), bomb)),
                    grpc.StatusCode.INVALID_ARGUMENT, "codec",
                    "the tensors cover 40 of the 268435456 payload bytes")  # the codec's layout check, from the header


def test_an_update_over_the_norm_bound_is_rejected_and_the_model_takes_only_the_rest(coordinator) -> None:
    federation = _federation(coordinator, max_update_norm=1.0, min_updates=1)
    assert federation["config"]["max_update_norm"] == 1.0
    alice = _enrol(coordinator, federation, "alice", ["image"])
    s = _open_round(coordinator, federation, alice)
    big = _delta(s.base, ["image"], scale=0.05)  # norm ~ 0.05 * sqrt(60k) >> 1
    small = {name: value * np.float32(0.001) for name, value in _delta(s.base, ["image"], seed=3).items()}
    payload = encode_tensors(big, "fp32")
    header = _header(s, alice, payload, codec=pb.CODEC_FP32_ZSTD)
    _expect_refused(s, alice, lambda: alice.send(_messages(header, payload)),
                    grpc.StatusCode.INVALID_ARGUMENT, "norm_bound", "over this federation's max_update_norm 1")
    assert alice.client.upload_status(alice.id, s.task.round_id, header.upload_id) == ("rejected", 0)

    # The device can still send an update within the bound; the new version is base + that update alone.
    fine = encode_tensors(small, "fp32")
    assert alice.send(_messages(_header(s, alice, fine, codec=pb.CODEC_FP32_ZSTD), fine)).state == \
        pb.UPLOAD_STATE_ACCEPTED
    round_ = wait_for_round(coordinator.admin, s.task.round_id)
    assert round_["state"] == "committed" and round_["metrics"]["participants"] == 1
    after = decode_tensors(coordinator.admin.get(f"/v1/versions/{round_['version_id']}/adapter").content)
    for name, value in small.items():
        np.testing.assert_allclose(after[name], s.base[name] + value, atol=1e-6)


def test_max_update_norm_must_be_a_finite_non_negative_number(coordinator) -> None:
    for bad in (-1, "inf"):
        response = coordinator.admin.post("/v1/federations", json={
            "name": f"bad-{uuid.uuid4().hex[:6]}", "config": {"max_update_norm": bad}})
        assert response.status_code == 422 and "max_update_norm" in response.text, response.text


# ---- rate limits ----------------------------------------------------------------------------------------


def test_a_device_over_its_rate_is_told_when_to_retry_and_an_upload_stream_counts_once(tmp_path: Path) -> None:
    # One request every 10 s after a burst of 4: the test's own pace cannot earn a token back in time.
    settings = CoordinatorSettings(state_dir=tmp_path, device_rate_per_s=0.1, device_burst=4,
                                   refusal_record_interval_s=60.0)
    with running_coordinator(settings) as c:
        federation = _federation(c)
        alice = _enrol(c, federation, "alice", ["image"])
        s = _open_round(c, federation, alice)  # GetTask and DownloadGlobal: two of the burst
        payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
        # An upload of many chunks is one request.
        assert len(_messages(_header(s, alice, payload), payload, chunk=4096)) > 10
        assert alice.send(_messages(_header(s, alice, payload), payload, chunk=4096)).state == \
            pb.UPLOAD_STATE_ACCEPTED
        alice.stub.Heartbeat(pb.HeartbeatRequest(device_id=alice.id), metadata=alice.metadata)  # the fourth
        counted = _count("mlecs_refusals_total", method="Heartbeat", reason="rate_limited")
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as caught:
                alice.stub.Heartbeat(pb.HeartbeatRequest(device_id=alice.id), metadata=alice.metadata)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "rate limit of 0.1 requests/s (burst 4); retry in" in caught.value.details()
        hint = dict(caught.value.trailing_metadata())["retry-after-ms"]
        assert 5000 < int(hint) <= 10_000
        # The agent backs off for at least the hint.
        refused = translate(caught.value)
        assert isinstance(refused, CoordinatorUnavailable) and refused.retry_after_s == int(hint) / 1000
        assert _count("mlecs_refusals_total", method="Heartbeat", reason="rate_limited") == counted + 5
        rows = [r for r in _refusals(c, alice.id) if r.reason == "rate_limited"]
        assert len(rows) == 1 and rows[0].method == "Heartbeat"  # a flood is counted in full, recorded once

        # Another device has an allowance of its own; enrolment is limited per name before any database work.
        bob = _enrol(c, federation, "bob", ["audio"])
        bob.stub.Heartbeat(pb.HeartbeatRequest(device_id=bob.id), metadata=bob.metadata)
        for _ in range(3):
            bob.client.enrol(federation["name"], "bob", ["audio"])
        with pytest.raises(CoordinatorUnavailable, match="RESOURCE_EXHAUSTED: enrolment of 'bob'"):
            bob.client.enrol(federation["name"], "bob", ["audio"])


def test_a_healthy_agents_round_stays_far_below_the_default_limits(coordinator) -> None:
    settings = coordinator.coordinator.settings
    federation = _federation(coordinator, min_updates=1)
    alice = _enrol(coordinator, federation, "alice", ["image"])
    # What an agent does in a round (task, download, status, upload, report, task), heartbeats, and a burst of
    # retries on top, all at once: nothing is refused.
    s = _open_round(coordinator, federation, alice)
    payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
    for _ in range(3):
        alice.client.heartbeat(alice.id)
    request_id = uuid.uuid4().hex
    alice.client.upload_status(alice.id, s.task.round_id, request_id)
    assert alice.send(_messages(_header(s, alice, payload, upload_id=request_id), payload)).state == \
        pb.UPLOAD_STATE_ACCEPTED
    alice.client.report_metrics(alice.id, s.task.round_id, {"personal_accuracy": 0.5})
    for _ in range(10):
        alice.client.get_task(alice.id)
    assert not [r for r in _refusals(coordinator, alice.id) if r.reason == "rate_limited"]
    assert settings.device_rate_per_s >= 1 and settings.device_burst >= 20


def test_a_wrong_secret_is_refused_and_recorded_once_per_peer_while_every_attempt_is_counted(coordinator) -> None:
    federation = _federation(coordinator)
    alice = _enrol(coordinator, federation, "alice", ["image"])
    forged = (("authorization", f"Device {alice.id}:not-the-secret"),)
    counted = _count("mlecs_refusals_total", method="GetUploadStatus", reason="unauthenticated")
    for _ in range(5):
        with pytest.raises(grpc.RpcError) as caught:
            alice.stub.GetUploadStatus(pb.UploadStatusRequest(upload_id="x" * 8), metadata=forged)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _count("mlecs_refusals_total", method="GetUploadStatus", reason="unauthenticated") == counted + 5
    rows = [r for r in _refusals(coordinator, alice.id) if r.reason == "unauthenticated"]
    # The id claimed is kept (whose credential is being guessed), never the federation: nothing was proven.
    assert [(r.method, r.federation_id) for r in rows] == [("GetUploadStatus", None)]


@pytest.mark.postgres
@pytest.mark.redis
def test_refusals_are_recorded_in_postgres_with_redis_presence(tmp_path: Path, make_postgres_database,
                                                              redis_prefix) -> None:
    settings = CoordinatorSettings(state_dir=tmp_path, database_url=make_postgres_database(),
                                   redis_url="redis://127.0.0.1:6379/0", redis_prefix=redis_prefix,
                                   max_upload_bytes=MAX_UPLOAD)
    with running_coordinator(settings) as c:
        federation = _federation(c)
        alice = _enrol(c, federation, "alice", ["image"])
        s = _open_round(c, federation, alice)
        payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
        _expect_refused(s, alice, lambda: alice.send([pb.UploadMessage(
                            header=_header(s, alice, payload, total_size=MAX_UPLOAD + 1))]),
                        grpc.StatusCode.INVALID_ARGUMENT, "upload_too_large", "max_upload_bytes")
        forged = _forge_non_finite(encode_tensors(_delta(s.base, ["image"]), "fp32"), float("nan"), "fp32")
        _expect_refused(s, alice, lambda: alice.send(_messages(_header(s, alice, forged, codec=pb.CODEC_FP32_ZSTD),
                                                               forged, chunk=MAX_MESSAGE // 2)),
                        grpc.StatusCode.INVALID_ARGUMENT, "non_finite", "non-finite")
        rows = _refusals(c, alice.id)
        assert [r.reason for r in rows] == ["non_finite", "upload_too_large"]  # newest first
        assert {r.round_id for r in rows} == {s.task.round_id}
