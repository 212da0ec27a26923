"""A hostile enrolled device over the real transport: its influence on the global model and its claims
are bounded, and the federation still commits. (Malformed uploads are in ``test_upload_security``.)"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from mlecs.codec import decode_tensors, encode_tensors
from mlecs.model import tensor_modality
from mlecs.proto.v1 import fleet_pb2 as pb
from server.config import CoordinatorSettings
from server.domain.models import UpdateState
from server.domain.rounds import RoundState
from server.services import staging
from tests.integration.coordinator_harness import RunningCoordinator, running_coordinator, wait_for_round
from tests.integration.test_upload_security import (
    Dev,
    Setup,
    _chunk,
    _count,
    _delta,
    _enrol,
    _expect_refused,
    _header,
    _messages,
    _open_round,
    _outer,
)

HEAD_BIAS = "head.bias"


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    settings = CoordinatorSettings(state_dir=tmp_path_factory.mktemp("hostile"), scheduler_interval_s=0.2)
    with running_coordinator(settings) as running:
        yield running


def _federation(c: RunningCoordinator, **config: Any) -> dict[str, Any]:
    body = {"name": f"hostile-{uuid.uuid4().hex[:8]}",
            "config": {"model": {"backbone": "tiny"}, "server_learning": False, **config}}
    response = c.admin.post("/v1/federations", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def _bias_only(s: Setup, value: float) -> bytes:
    """An update that moves only the head's bias, by ``value``: its effect on the global model is plain."""
    delta = {name: np.zeros_like(tensor) for name, tensor in s.base.items() if tensor_modality(name) in (None, "image")}
    delta[HEAD_BIAS] = np.full_like(s.base[HEAD_BIAS], value)
    return encode_tensors(delta, "fp32")


def _send(s: Setup, dev: Dev, payload: bytes, public: int, private: int = 0) -> None:
    header = _header(s, dev, payload, codec=pb.CODEC_FP32_ZSTD,
                     samples=pb.SampleCounts(public_samples=public, private_samples=private))
    assert dev.send(_messages(header, payload)).state == pb.UPLOAD_STATE_ACCEPTED


def _bias_moved(c: RunningCoordinator, s: Setup) -> float:
    round_ = wait_for_round(c.admin, s.task.round_id)
    assert round_["state"] == "committed", round_
    after = decode_tensors(c.admin.get(f"/v1/versions/{round_['version_id']}/adapter").content)
    moved = after[HEAD_BIAS] - s.base[HEAD_BIAS]
    assert np.allclose(moved, moved[0], atol=1e-6)
    return float(moved[0])


@pytest.mark.parametrize("aggregation", ["mma", "fedavg"])
def test_a_claimed_sample_count_weighs_at_most_the_ratio_times_the_median(
        coordinator: RunningCoordinator, aggregation: str) -> None:
    # The attack that moved the global model by exactly +1.0: 2^31 - 1 samples claimed against 100.
    federation = _federation(coordinator, aggregation=aggregation, min_updates=2, max_weight_ratio=4.0)
    mallory = _enrol(coordinator, federation, "mallory", ["image"])
    honest = _enrol(coordinator, federation, "honest", ["image"])
    s = _open_round(coordinator, federation, mallory, honest)

    _send(s, mallory, _bias_only(s, +1.0), public=2**31 - 1)
    _send(s, honest, _bias_only(s, -1.0), public=100)

    # Mallory counts as 4 x 100 samples: (400 - 100) / 500.
    assert _bias_moved(coordinator, s) == pytest.approx(0.6, abs=1e-5)
    round_ = coordinator.admin.get(f"/v1/rounds/{s.task.round_id}").json()
    assert round_["metrics"]["weight_capped"] == 1.0


def test_without_the_cap_the_claimed_count_decides_as_the_operator_chose(coordinator: RunningCoordinator) -> None:
    federation = _federation(coordinator, aggregation="fedavg", min_updates=2, max_weight_ratio=0)
    mallory = _enrol(coordinator, federation, "mallory", ["image"])
    honest = _enrol(coordinator, federation, "honest", ["image"])
    s = _open_round(coordinator, federation, mallory, honest)

    _send(s, mallory, _bias_only(s, +1.0), public=300)
    _send(s, honest, _bias_only(s, -1.0), public=100)

    assert _bias_moved(coordinator, s) == pytest.approx(0.5, abs=1e-5)  # (300 - 100) / 400


def test_honest_counts_within_the_ratio_are_weighed_as_claimed(coordinator: RunningCoordinator) -> None:
    federation = _federation(coordinator, aggregation="fedavg", min_updates=3, max_weight_ratio=4.0)
    devices = [_enrol(coordinator, federation, name, ["image"]) for name in ("a", "b", "c")]
    s = _open_round(coordinator, federation, *devices)

    for dev, value, samples in zip(devices, (+1.0, -1.0, -1.0), (350, 100, 150), strict=True):
        _send(s, dev, _bias_only(s, value), public=samples)

    assert _bias_moved(coordinator, s) == pytest.approx((350 - 100 - 150) / 600, abs=1e-5)
    assert coordinator.admin.get(f"/v1/rounds/{s.task.round_id}").json()["metrics"]["weight_capped"] == 0.0


# ---- claims the coordinator can check --------------------------------------------------------------------


def _round_of_two(c: RunningCoordinator) -> tuple[Setup, Dev, Dev]:
    federation = _federation(c, min_updates=1, round_deadline_s=3)  # mallory sends nothing that counts
    mallory = _enrol(c, federation, "mallory", ["image"])
    honest = _enrol(c, federation, "honest", ["image"])
    return _open_round(c, federation, mallory, honest), mallory, honest


def _commits_with_the_honest_update(c: RunningCoordinator, s: Setup, honest: Dev) -> None:
    payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
    assert honest.send(_messages(_header(s, honest, payload), payload)).state == pb.UPLOAD_STATE_ACCEPTED
    round_ = wait_for_round(c.admin, s.task.round_id)
    assert round_["state"] == "committed" and round_["metrics"]["participants"] == 1


def test_a_modality_the_device_did_not_enrol_with_is_refused_at_the_header(coordinator: RunningCoordinator) -> None:
    s, mallory, honest = _round_of_two(coordinator)
    payload = encode_tensors(_delta(s.base, ["image", "audio"]), "fp16")  # audio extractor tensors too
    header = _header(s, mallory, payload, modalities=[pb.MODALITY_IMAGE, pb.MODALITY_AUDIO])

    _expect_refused(s, mallory, lambda: mallory.send(_messages(header, payload)), grpc.StatusCode.INVALID_ARGUMENT,
                    "modalities", "claims audio, which this device did not enrol with (enrolled: image)")

    _commits_with_the_honest_update(coordinator, s, honest)
    participants = coordinator.admin.get(f"/v1/rounds/{s.task.round_id}/participants").json()
    assert mallory.id not in [p["device_id"] for p in participants if p["update_state"] == "accepted"]


@pytest.mark.parametrize(("metrics", "match"), [
    ({"loss": float("nan")}, "'loss' is nan, not a finite number"),
    ({"loss": float("inf")}, "'loss' is inf, not a finite number"),
    ({f"m{i}": 1.0 for i in range(10_000)}, "metrics: 10000 values, at most 64"),
    ({"x" * 65: 1.0}, "must be 1-64 characters"),
])
def test_upload_header_metrics_are_checked_as_reports_are(
        coordinator: RunningCoordinator, metrics: dict[str, float], match: str) -> None:
    s, mallory, honest = _round_of_two(coordinator)
    payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
    header = _header(s, mallory, payload, metrics=metrics)

    _expect_refused(s, mallory, lambda: mallory.send(_messages(header, payload)), grpc.StatusCode.INVALID_ARGUMENT,
                    "invalid_request", match)

    _commits_with_the_honest_update(coordinator, s, honest)


def test_a_header_listing_far_more_tensors_than_the_schema_is_refused_before_its_entries_are_read(
        coordinator: RunningCoordinator) -> None:
    s, mallory, honest = _round_of_two(coordinator)
    count = 150_000
    entries = [{"name": f"t{i:06d}", "shape": [1], "dtype": "float32", "offset": 4 * i, "nbytes": 4}
               for i in range(count)]
    payload = _outer({"codec": "fp32", "payload_bytes": 4 * count, "tensors": entries}, bytes(4 * count))
    header = _header(s, mallory, payload, codec=pb.CODEC_FP32_ZSTD)
    expected = len(s.base) + 1  # the schema's tensors and the fused features

    _expect_refused(s, mallory, lambda: mallory.send(_messages(header, payload)), grpc.StatusCode.INVALID_ARGUMENT,
                    "codec", f"exceeds {512 * expected}")

    _commits_with_the_honest_update(coordinator, s, honest)


# ---- bytes that are not protobuf ----------------------------------------------------------------------------

GARBAGE = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"  # a varint longer than 64 bits: no message parses it


def _raw(c: RunningCoordinator, method: str, kind: str = "unary_unary") -> Any:
    channel = grpc.insecure_channel(c.grpc_address)
    return getattr(channel, kind)(f"/mlecs.v1.Fleet/{method}")  # no serializers: bytes go as they are


@pytest.mark.parametrize("method", ["Enrol", "GetTask", "Heartbeat", "GetUploadStatus", "ReportMetrics"])
def test_garbage_bytes_to_a_unary_method_are_a_counted_invalid_argument_without_a_traceback(
        coordinator: RunningCoordinator, method: str, caplog: pytest.LogCaptureFixture) -> None:
    before = _count("mlecs_refusals_total", method=method, reason="malformed")

    with pytest.raises(grpc.RpcError) as caught:
        _raw(coordinator, method)(GARBAGE, timeout=10)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "is not a valid" in caught.value.details() and "Request message" in caught.value.details()
    assert _count("mlecs_refusals_total", method=method, reason="malformed") == before + 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_garbage_bytes_to_download_are_refused(coordinator: RunningCoordinator) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(_raw(coordinator, "DownloadGlobal", "unary_stream")(GARBAGE, timeout=10))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid DownloadGlobalRequest message" in caught.value.details()


def test_a_garbage_frame_in_an_upload_is_refused_and_the_round_still_commits(
        coordinator: RunningCoordinator, caplog: pytest.LogCaptureFixture) -> None:
    s, mallory, honest = _round_of_two(coordinator)
    payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
    frames = [message.SerializeToString() for message in _messages(_header(s, mallory, payload), payload)]
    upload = grpc.insecure_channel(coordinator.grpc_address).stream_unary("/mlecs.v1.Fleet/UploadUpdate")

    _expect_refused(s, mallory, lambda: upload(iter([frames[0], GARBAGE, *frames[1:]]), metadata=mallory.metadata,
                                               timeout=30),
                    grpc.StatusCode.INVALID_ARGUMENT, "malformed", "not a valid UploadMessage message")

    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    _commits_with_the_honest_update(coordinator, s, honest)


# ---- streams and staged bytes ------------------------------------------------------------------------------

IDLE_S = 2.0


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    """A coordinator with few upload slots, a short idle timeout and 1 MiB of staging."""
    settings = CoordinatorSettings(state_dir=tmp_path_factory.mktemp("tight"), scheduler_interval_s=0.2,
                                   max_concurrent_uploads=2, upload_idle_timeout_s=IDLE_S,
                                   max_staged_bytes=1024 * 1024, device_burst=200)
    with running_coordinator(settings) as running:
        yield running


class IdleStreams:
    """Upload streams that send nothing (or only a header) until released: a hostile device's tactic."""

    def __init__(self, dev: Dev, first: list[pb.UploadMessage] | None = None) -> None:
        self._release = threading.Event()
        self._dev, self._first = dev, first or []
        self.calls: list[Any] = []

    def _messages(self) -> Iterator[pb.UploadMessage]:
        yield from self._first
        self._release.wait(60)

    def open(self, count: int) -> None:
        for _ in range(count):
            self.calls.append(self._dev.stub.UploadUpdate.future(self._messages(), metadata=self._dev.metadata,
                                                                 timeout=60))

    def outcomes(self) -> list[grpc.StatusCode]:
        self._release.set()
        codes = []
        for call in self.calls:
            try:
                call.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        return codes


def _staged_bytes(c: RunningCoordinator) -> int:
    assert c.coordinator.services is not None
    return c.coordinator.services.ctx.blobs.staged_bytes()


def test_idle_streams_of_one_device_are_capped_and_closed_and_nobody_else_waits(tight: RunningCoordinator) -> None:
    federation = _federation(tight, min_updates=2)
    mallory = _enrol(tight, federation, "mallory", ["image"])
    eve = _enrol(tight, federation, "eve", ["image"])
    honest = _enrol(tight, federation, "honest", ["image"])
    s = _open_round(tight, federation, mallory, eve, honest)
    # The attack that blocked every other upload: 20 streams that send nothing. Eve adds two of her own,
    # so that together the idle streams outnumber the coordinator's two upload slots.
    idle, idle_too = IdleStreams(mallory), IdleStreams(eve)
    idle.open(20)
    idle_too.open(2)
    time.sleep(0.5)

    payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
    started = time.monotonic()
    assert honest.send(_messages(_header(s, honest, payload), payload)).state == pb.UPLOAD_STATE_ACCEPTED
    honest_s = time.monotonic() - started
    time.sleep(IDLE_S + 1)  # past the idle timeout: the admitted idle streams are closed by now

    codes = idle.outcomes() + idle_too.outcomes()
    # Bound: the honest upload does not wait for any idle stream (they hold no slot before their header).
    assert honest_s < IDLE_S, honest_s
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 18  # mallory: 2 streams admitted, 18 refused
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == 4    # the admitted ones, closed when idle
    assert _count("mlecs_upload_streams_open") == 0


def test_a_header_then_silence_is_closed_after_the_idle_timeout_and_frees_its_slot(tight: RunningCoordinator) -> None:
    federation = _federation(tight, min_updates=1, round_deadline_s=30)
    devices = [_enrol(tight, federation, name, ["image"]) for name in ("m1", "m2", "honest")]
    s = _open_round(tight, federation, *devices)
    payload = encode_tensors(_delta(s.base, ["image"]), "fp16")
    stalled = []
    for dev in devices[:2]:  # two headers, then nothing: both slots held until the idle timeout
        streams = IdleStreams(dev, [pb.UploadMessage(header=_header(s, dev, payload))])
        streams.open(1)
        stalled.append(streams)
    time.sleep(0.5)

    started = time.monotonic()
    honest = devices[2]
    assert honest.send(_messages(_header(s, honest, payload), payload)).state == pb.UPLOAD_STATE_ACCEPTED

    # Bound: a slot held by a silent stream is back within the idle timeout (plus scheduling slack).
    assert time.monotonic() - started < IDLE_S + 3
    assert [code for streams in stalled for code in streams.outcomes()] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2


def test_partial_uploads_are_capped_per_device_and_expire_with_their_round(tight: RunningCoordinator) -> None:
    federation = _federation(tight, min_updates=1, round_deadline_s=30)
    mallory = _enrol(tight, federation, "mallory", ["image"])
    honest = _enrol(tight, federation, "honest", ["image"])
    s = _open_round(tight, federation, mallory, honest)
    # The attack that left 84 MB in staging: many upload ids, each declaring more than it sends.
    declared = bytes(range(256)) * 1024  # 256 KiB declared; 16 KiB sent
    for _ in range(6):
        header = _header(s, mallory, declared)
        response = mallory.send([pb.UploadMessage(header=header), _chunk(0, declared[:16 * 1024])])
        assert response.state == pb.UPLOAD_STATE_PARTIAL
    services = tight.coordinator.services
    assert services is not None
    updates = services.ctx.store.list_updates(s.task.round_id)
    assert sum(u.state is UpdateState.PARTIAL for u in updates) == 2  # the device's two newest
    assert sorted(u.rejection_reason for u in updates if u.state is UpdateState.REJECTED) == ["superseded"] * 4
    assert _staged_bytes(tight) == 2 * 16 * 1024

    _commits_with_the_honest_update(tight, s, honest)

    assert _staged_bytes(tight) == 0
    assert _count("mlecs_staged_bytes") == 0
    after = services.ctx.store.list_updates(s.task.round_id)
    assert not [u for u in after if u.state is UpdateState.PARTIAL]
    assert sum(u.rejection_reason == "expired" for u in after) == 2


def test_an_upload_starting_as_its_round_closes_leaves_nothing_staged(
        tight: RunningCoordinator, monkeypatch: pytest.MonkeyPatch) -> None:
    # Seen in the soak: a partial row written just after the round's expiry listed its partials survived the
    # close, and its stream staged 4 MiB into a closed round. The round closes here between the check and the row.
    federation = _federation(tight, min_updates=1, round_deadline_s=30)
    mallory = _enrol(tight, federation, "late", ["image"])
    s = _open_round(tight, federation, mallory)
    services = tight.coordinator.services
    assert services is not None
    store = services.ctx.store
    add_update = store.add_update

    def add_then_close(update: Any) -> None:
        add_update(update)
        round_ = store.get_round(update.round_id)
        round_.state = RoundState.FAILED
        store.save_round(round_)

    monkeypatch.setattr(store, "add_update", add_then_close)
    payload = bytes(64 * 1024)
    with pytest.raises(grpc.RpcError) as info:
        mallory.send([pb.UploadMessage(header=_header(s, mallory, payload)), _chunk(0, payload[:16 * 1024])])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    assert "closed while the upload started" in str(info.value.details())
    assert _staged_bytes(tight) == 0
    [update] = store.list_updates(s.task.round_id)
    assert (update.state, update.rejection_reason) == (UpdateState.REJECTED, "expired")


def test_a_new_upload_that_would_overfill_staging_is_refused_until_room_is_made(tight: RunningCoordinator) -> None:
    federation = _federation(tight, min_updates=1, round_deadline_s=30)
    devices = [_enrol(tight, federation, f"d{i}", ["image"]) for i in range(3)]
    s = _open_round(tight, federation, *devices)
    big = bytes(600 * 1024)  # two of these pass the 1 MiB of staging
    first = _header(s, devices[0], big)
    assert devices[0].send([pb.UploadMessage(header=first), _chunk(0, big[:512 * 1024])]).state == \
        pb.UPLOAD_STATE_PARTIAL

    _expect_refused(s, devices[1], lambda: devices[1].send([pb.UploadMessage(header=_header(s, devices[1], big)),
                                                            _chunk(0, big[:1024])]),
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "staging_full", "max_staged_bytes")
    assert _staged_bytes(tight) == 512 * 1024

    _commits_with_the_honest_update(tight, s, devices[2])  # small, still fits
    assert _staged_bytes(tight) == 0


def test_the_sweep_removes_staged_files_no_open_upload_owns(tight: RunningCoordinator) -> None:
    services = tight.coordinator.services
    assert services is not None
    blobs = services.ctx.blobs
    orphan = uuid.uuid4().hex
    blobs.append_staged(orphan, 0, b"left by a crash")

    assert staging.sweep(services.ctx, min_age_s=0) >= 1
    assert orphan not in [staging_id for staging_id, _, _ in blobs.staged_uploads()]
    assert blobs.staged_bytes() == 0


# ---- credential guessing ----------------------------------------------------------------------------------


def test_an_address_that_keeps_failing_authentication_is_refused_before_any_database_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = CoordinatorSettings(state_dir=tmp_path, failed_auth_burst=5, failed_auth_rate_per_s=0.01)
    with running_coordinator(settings) as c:
        federation = _federation(c)
        honest = _enrol(c, federation, "honest", ["image"])
        for _ in range(20):  # calls that authenticate are never charged
            assert honest.client.heartbeat(honest.id) > 0
        services = c.coordinator.services
        assert services is not None
        reads: list[str] = []
        real_get_device = services.ctx.store.get_device
        monkeypatch.setattr(services.ctx.store, "get_device",  # a spy on the real store: counts database reads
                            lambda device_id: reads.append(device_id) or real_get_device(device_id))
        stub = honest.stub

        def guess(i: int) -> grpc.StatusCode:
            try:
                stub.GetTask(pb.GetTaskRequest(device_id=f"guess-{i}"), timeout=10,
                             metadata=(("authorization", f"Device guess-{i}:wrong"),))
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        codes = [guess(i) for i in range(8)]

        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 5 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
        assert len(reads) == 5  # the refused guesses cost no read
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetTask(pb.GetTaskRequest(), timeout=10, metadata=(("authorization", "Device x:y"),))
        assert "too many failed authentications" in caught.value.details()
        assert ("retry-after-ms" in dict(caught.value.trailing_metadata() or ()))
        # A device behind the same address (a NAT) whose credential is remembered is not locked out.
        assert honest.client.heartbeat(honest.id) > 0
        assert len(reads) == 5
