"""The device protocol over real gRPC on loopback, against a real coordinator, on both backends."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text

from edge_agent.client import CoordinatorClient
from edge_agent.errors import CredentialRejected, RequestRefused
from edge_agent.tasks import Stop, TrainTask, UploadRequest, Wait
from mlecs.codec import decode_tensors, encode_tensors, iter_chunks, sha256_hex
from mlecs.model import tensor_modality
from mlecs.proto.v1 import fleet_pb2 as pb
from mlecs.proto.v1 import fleet_pb2_grpc
from server.config import CoordinatorSettings
from server.persistence.database import normalise_url
from tests.integration.coordinator_harness import RunningCoordinator, running_coordinator, wait_for_round

TINY = {"backbone": "tiny"}


@pytest.fixture(params=["embedded", pytest.param("postgres+redis", marks=[pytest.mark.postgres, pytest.mark.redis])])
def backend(request, tmp_path) -> dict:
    if request.param == "embedded":
        return {"state_dir": tmp_path}
    url = request.getfixturevalue("make_postgres_database")()
    prefix = request.getfixturevalue("redis_prefix")
    return {"state_dir": tmp_path, "database_url": url, "redis_url": "redis://127.0.0.1:6379/0",
            "redis_prefix": prefix}


@pytest.fixture
def coordinator(backend) -> Iterator[RunningCoordinator]:
    with running_coordinator(CoordinatorSettings(**backend)) as running:
        yield running


def _federation(c: RunningCoordinator, **config) -> dict:
    body = {"name": f"fed-{uuid.uuid4().hex[:8]}", "config": {"model": TINY, "public_epochs": 1, **config}}
    response = c.admin.post("/v1/federations", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def _device(c: RunningCoordinator, federation: str, name: str, modalities: list[str],
            task_wait_s: int = 0) -> tuple[CoordinatorClient, str]:
    # task_wait_s 0 by default: most tests here check the reply to each poll, so it must come at once.
    client = CoordinatorClient(c.grpc_address, task_wait_s=task_wait_s)
    device_id, secret, interval = client.enrol(federation, name, modalities)
    assert interval > 0
    client.authenticate(device_id, secret)
    return client, device_id


def _delta_for(adapter: bytes, modalities: set[str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)  # random, so the payload does not compress to a few bytes
    tensors = decode_tensors(adapter)
    return {name: rng.normal(0, 0.01, value.shape).astype(np.float32) for name, value in tensors.items()
            if tensor_modality(name) is None or tensor_modality(name) in modalities}


def _request(task: TrainTask, device_id: str, payload: bytes, modalities: list[str], **overrides) -> UploadRequest:
    fields = dict(round_id=task.round_id, device_id=device_id, upload_id=uuid.uuid4().hex, codec="fp16",
                  sha256=sha256_hex(payload), modalities=modalities, public_samples=50, private_samples=200,
                  base_version_id=task.version_id, metrics={"personal_accuracy": 0.5})
    fields.update(overrides)
    return UploadRequest(**fields)  # type: ignore[arg-type]


def test_a_device_enrols_trains_uploads_with_resume_and_the_round_commits(coordinator, backend):
    federation = _federation(coordinator)
    client, device_id = _device(coordinator, federation["name"], "cam-1", ["image"])
    assert client.heartbeat(device_id) > 0
    assert isinstance(client.get_task(device_id), Wait)

    started = coordinator.admin.post(f"/v1/federations/{federation['id']}/rounds")
    assert started.status_code == 201, started.text
    assert started.json()["state"] == "open" and started.json()["participants"] == [device_id]
    task = client.get_task(device_id)
    assert isinstance(task, TrainTask) and task.round_number == 1 and task.model == TINY

    version = client.download_global(device_id, task.version_id)
    assert version.version_id == federation["current_version_id"]
    assert decode_tensors(version.anchors)["text.class"].shape == (10, 384)  # published with every version
    delta = _delta_for(version.adapter, {"image"})
    payload = encode_tensors(delta, "fp16")
    assert len(payload) > 3 * 4096
    request = _request(task, device_id, payload, ["image"])

    # Send the header and only the first chunk, as if the link dropped mid-upload.
    stub = fleet_pb2_grpc.FleetStub(grpc.insecure_channel(coordinator.grpc_address))
    metadata = (("authorization", f"Device {device_id}:{client._metadata[0][1].split(':', 1)[1]}"),)
    first = next(iter_chunks(payload, 4096))
    header = pb.UploadHeader(round_id=task.round_id, device_id=device_id, upload_id=request.upload_id,
                             codec=pb.CODEC_FP16_ZSTD, total_size=len(payload), sha256=request.sha256,
                             modalities=[pb.MODALITY_IMAGE], base_version_id=task.version_id,
                             samples=pb.SampleCounts(public_samples=50, private_samples=200),
                             metrics={"personal_accuracy": 0.5})
    reply = stub.UploadUpdate(iter([pb.UploadMessage(header=header),
                                    pb.UploadMessage(chunk=pb.UploadChunk(offset=0, data=first[1]))]),
                              metadata=metadata)
    assert reply.state == pb.UPLOAD_STATE_PARTIAL and reply.acknowledged_offset == 4096

    state, offset = client.upload_status(device_id, task.round_id, request.upload_id)
    assert (state, offset) == ("partial", 4096)
    state, offset = client.upload(request, payload, offset, 4096)
    assert (state, offset) == ("accepted", len(payload))
    # Idempotent: the same upload again is still accepted, and counted once.
    assert client.upload(request, payload, 0, 4096)[0] == "accepted"

    round_ = wait_for_round(coordinator.admin, task.round_id)
    assert round_["state"] == "committed", round_
    assert round_["metrics"]["participants"] == 1
    assert round_["metrics"].get("client_accuracy_mean") == pytest.approx(0.5), str(round_["metrics"])
    assert round_["metrics"]["upload_bytes_per_client"] == len(payload)
    assert 0 <= round_["metrics"]["global_accuracy"] <= 1

    versions = coordinator.admin.get(f"/v1/federations/{federation['id']}/versions").json()
    assert [v["round_number"] for v in versions] == [0, 1]
    downloaded = coordinator.admin.get(f"/v1/versions/{round_['version_id']}/adapter")
    assert sha256_hex(downloaded.content) == downloaded.headers["x-checksum-sha256"]
    before, after = decode_tensors(version.adapter), decode_tensors(downloaded.content)
    name = next(n for n in after if n.startswith("extractors.image"))
    np.testing.assert_allclose(after[name], before[name] + delta[name], atol=1e-4)
    untouched = next(n for n in after if n.startswith("extractors.audio"))
    np.testing.assert_array_equal(after[untouched], before[untouched])
    # Devices get the new version by gRPC too (its stream is encoded once, then served from memory), and an
    # older version they ask for by id is still the one they had.
    for _ in range(2):
        current = client.download_global(device_id)
        assert current.version_id == round_["version_id"] and current.adapter == downloaded.content
        assert client.download_global(device_id, version.version_id).adapter == version.adapter

    # A late upload for the committed round is refused with a clear reason.
    late = _request(task, device_id, payload, ["image"])
    with pytest.raises(RequestRefused, match="arrived too late"):
        client.upload(late, payload, 0, 4096)

    coordinator.admin.post(f"/v1/federations/{federation['id']}/stop")
    assert isinstance(client.get_task(device_id), Stop)

    if "database_url" in backend:  # the rows really are in Postgres
        engine = create_engine(normalise_url(backend["database_url"]))
        with engine.connect() as conn:
            states = conn.execute(text("SELECT state FROM rounds")).scalars().all()
            n_versions = conn.execute(text("SELECT count(*) FROM model_versions")).scalar()
        engine.dispose()
        assert states == ["committed"] and n_versions == 2


def test_an_update_whose_checksum_differs_is_rejected_and_not_counted(coordinator):
    federation = _federation(coordinator)
    client, device_id = _device(coordinator, federation["name"], "mic-1", ["audio"])
    coordinator.admin.post(f"/v1/federations/{federation['id']}/rounds")
    task = client.get_task(device_id)
    assert isinstance(task, TrainTask)
    payload = encode_tensors(_delta_for(client.download_global(device_id).adapter, {"audio"}), "fp16")
    bad = _request(task, device_id, payload, ["audio"], sha256="0" * 64)
    with pytest.raises(RequestRefused, match="checksum"):
        client.upload(bad, payload, 0, 65536)
    round_ = coordinator.admin.get(f"/v1/rounds/{task.round_id}").json()
    assert round_["state"] == "open"
    # The device can still send a correct update afterwards.
    assert client.upload(_request(task, device_id, payload, ["audio"]), payload, 0, 65536)[0] == "accepted"


def test_tensors_of_a_modality_the_device_lacks_are_rejected(coordinator):
    federation = _federation(coordinator)
    client, device_id = _device(coordinator, federation["name"], "cam-2", ["image"])
    coordinator.admin.post(f"/v1/federations/{federation['id']}/rounds")
    task = client.get_task(device_id)
    assert isinstance(task, TrainTask)
    payload = encode_tensors(_delta_for(client.download_global(device_id).adapter, {"image", "audio"}), "fp16")
    with pytest.raises(RequestRefused, match="modality the device lacks"):
        client.upload(_request(task, device_id, payload, ["image"]), payload, 0, 65536)


def test_calls_without_a_valid_credential_are_refused(coordinator):
    federation = _federation(coordinator)
    _client, device_id = _device(coordinator, federation["name"], "cam-3", ["image"])
    stranger = CoordinatorClient(coordinator.grpc_address)
    with pytest.raises(CredentialRejected, match="UNAUTHENTICATED"):
        stranger.get_task(device_id)
    stranger.authenticate(device_id, "not-the-secret")
    with pytest.raises(CredentialRejected, match="UNAUTHENTICATED"):
        stranger.heartbeat(device_id)


def test_every_method_of_the_fleet_contract_is_served(coordinator):
    # The handler table is built from the proto's descriptor; an unknown caller is refused by each method
    # (or, for Enrol, told what is wrong with its request), never answered UNIMPLEMENTED.
    channel = grpc.insecure_channel(coordinator.grpc_address)
    for method in pb.DESCRIPTOR.services_by_name["Fleet"].methods:
        path = f"/mlecs.v1.Fleet/{method.name}"
        kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                (True, False): channel.stream_unary}[(method.client_streaming, method.server_streaming)]
        call = kind(path, request_serializer=lambda m: m, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as refused:
            result = call(iter([b""]) if method.client_streaming else b"", timeout=10)
            list(result) if method.server_streaming else result
        assert refused.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT,
                                        grpc.StatusCode.NOT_FOUND), (method.name, refused.value)


def test_a_remembered_credential_still_refuses_a_wrong_or_replaced_secret(coordinator):
    federation = _federation(coordinator)
    client = CoordinatorClient(coordinator.grpc_address, task_wait_s=0)
    device_id, old_secret, _ = client.enrol(federation["name"], "cam-4", ["image"])
    client.authenticate(device_id, old_secret)
    assert client.heartbeat(device_id) > 0  # verified once: later calls are answered from memory
    assert client.heartbeat(device_id) > 0
    wrong = CoordinatorClient(coordinator.grpc_address, task_wait_s=0)
    wrong.authenticate(device_id, old_secret + "x")
    with pytest.raises(CredentialRejected, match="UNAUTHENTICATED"):
        wrong.heartbeat(device_id)

    # Re-enrolling under the same name issues a new secret; the old one stops working at once.
    again = CoordinatorClient(coordinator.grpc_address, task_wait_s=0)
    same_id, new_secret, _ = again.enrol(federation["name"], "cam-4", ["image"])
    assert same_id == device_id and new_secret != old_secret
    with pytest.raises(CredentialRejected, match="UNAUTHENTICATED"):
        client.heartbeat(device_id)
    with pytest.raises(CredentialRejected, match="UNAUTHENTICATED"):
        client.get_task(device_id)
    again.authenticate(device_id, new_secret)
    assert again.heartbeat(device_id) > 0


def test_a_device_cannot_upload_as_another_device(coordinator):
    federation = _federation(coordinator, min_updates=1)
    alice, alice_id = _device(coordinator, federation["name"], "alice", ["image"])
    _bob, bob_id = _device(coordinator, federation["name"], "bob", ["image"])
    coordinator.admin.post(f"/v1/federations/{federation['id']}/rounds")
    task = alice.get_task(alice_id)
    assert isinstance(task, TrainTask)
    payload = encode_tensors(_delta_for(alice.download_global(alice_id).adapter, {"image"}), "fp16")
    with pytest.raises(RequestRefused, match=r"PERMISSION_DENIED.*only as itself"):
        alice.upload(_request(task, bob_id, payload, ["image"]), payload, 0, 65536)


def test_enrolling_in_an_unknown_federation_names_it(coordinator):
    with pytest.raises(RequestRefused, match="no-such-federation"):
        CoordinatorClient(coordinator.grpc_address).enrol("no-such-federation", "cam", ["image"])


def test_the_grpc_health_service_reports_the_fleet_service_serving(coordinator):
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(coordinator.grpc_address))
    reply = stub.Check(health_pb2.HealthCheckRequest(service="mlecs.v1.Fleet"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_admin_api_errors_are_problem_json_that_say_what_to_do(coordinator):
    federation = _federation(coordinator)
    response = coordinator.admin.post(f"/v1/federations/{federation['id']}/rounds")
    assert response.status_code == 409
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "start agents, lower min_updates" in response.json()["detail"]
    assert coordinator.admin.get("/v1/federations/nope").status_code == 404
    duplicate = coordinator.admin.post("/v1/federations", json={"name": federation["name"]})
    assert duplicate.status_code == 409 and "already exists" in duplicate.json()["detail"]
    bad = coordinator.admin.post("/v1/federations", json={"name": "x", "config": {"aggregation": "median"}})
    assert bad.status_code == 422
    metrics = coordinator.admin.get("/metrics").text
    assert "mlecs_rpc_duration_seconds" in metrics and "mlecs_enrolments_total" in metrics


def test_exact_lora_mode_commits_the_product_of_what_the_client_trained(coordinator):
    federation = _federation(coordinator, lora_mode="exact")
    assert federation["config"]["lora_mode"] == "exact"
    client, device_id = _device(coordinator, federation["name"], "cam-x", ["image"])
    coordinator.admin.post(f"/v1/federations/{federation['id']}/rounds")
    task = client.get_task(device_id)
    assert isinstance(task, TrainTask)
    base = decode_tensors(client.download_global(device_id).adapter)
    delta = _delta_for(encode_tensors(base, "fp32"), {"image"})
    payload = encode_tensors(delta, "fp32")
    request = _request(task, device_id, payload, ["image"], codec="fp32")
    assert client.upload(request, payload, 0, 65536)[0] == "accepted"
    round_ = wait_for_round(coordinator.admin, task.round_id)
    assert round_["state"] == "committed", round_
    after = decode_tensors(coordinator.admin.get(f"/v1/versions/{round_['version_id']}/adapter").content)
    a, b = "lora.layer0.query.A", "lora.layer0.query.B"
    trained = (base[b] + delta[b]).astype(np.float64) @ (base[a] + delta[a]).astype(np.float64)
    np.testing.assert_allclose(after[b].astype(np.float64) @ after[a], trained, atol=1e-4)


def _forge_nan(payload: bytes) -> bytes:
    """An fp32 tensor set whose last value is NaN: what a poisoned client could send (the encoder won't)."""
    import struct

    import zstandard

    prefix, body = payload[:6], payload[6:]
    raw = bytearray(zstandard.ZstdDecompressor().decompress(body))
    raw[-4:] = struct.pack("<f", float("nan"))
    return prefix + zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(bytes(raw))


def test_an_update_carrying_nan_is_rejected_as_non_finite(coordinator):
    federation = _federation(coordinator)
    client, device_id = _device(coordinator, federation["name"], "cam-nan", ["image"])
    coordinator.admin.post(f"/v1/federations/{federation['id']}/rounds")
    task = client.get_task(device_id)
    assert isinstance(task, TrainTask)
    clean = encode_tensors(_delta_for(client.download_global(device_id).adapter, {"image"}), "fp32")
    poisoned = _forge_nan(clean)
    with pytest.raises(RequestRefused, match="non_finite"):
        client.upload(_request(task, device_id, poisoned, ["image"], codec="fp32"), poisoned, 0, 65536)
    assert coordinator.admin.get(f"/v1/rounds/{task.round_id}").json()["state"] == "open"
    assert 'mlecs_update_rejections_total{reason="non_finite"}' in coordinator.admin.get("/metrics").text



def test_a_held_task_poll_is_answered_as_soon_as_a_round_opens(coordinator):
    federation = _federation(coordinator, server_learning=False)
    client, device_id = _device(coordinator, federation["name"], "cam-1", ["image"], task_wait_s=20)
    answered: list = []

    def poll() -> None:
        started = time.monotonic()
        answered.append((client.get_task(device_id), time.monotonic() - started))

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(1.5)
    assert not answered  # held: there is no round yet
    opened = time.monotonic()
    assert coordinator.admin.post(f"/v1/federations/{federation['id']}/rounds").status_code == 201
    thread.join(timeout=25)
    task, held_s = answered[0]
    assert isinstance(task, TrainTask)
    assert held_s > 1.5 and time.monotonic() - opened < 3  # answered when the round opened, not after 20 s


def test_admin_actions_wake_held_task_polls_without_waiting_for_a_scheduler_tick(backend):
    # Ticks and the watcher's own look every 30 s: only the admin action itself can wake the polls in time.
    settings = CoordinatorSettings(**backend, scheduler_interval_s=30, task_watch_interval_s=30)
    with running_coordinator(settings) as coordinator:

        def held_poll_answer(action: str) -> tuple[object, float]:
            federation = _federation(coordinator, server_learning=False)
            client, device_id = _device(coordinator, federation["name"], "cam-1", ["image"], task_wait_s=20)
            answered: list = []
            thread = threading.Thread(target=lambda: answered.append(client.get_task(device_id)))
            thread.start()
            time.sleep(1.0)
            assert not answered  # held: there is no round yet
            acted = time.monotonic()
            response = coordinator.admin.post(f"/v1/federations/{federation['id']}/{action}")
            assert response.status_code in (200, 201), response.text
            thread.join(timeout=25)
            return answered[0], time.monotonic() - acted

        task, after_s = held_poll_answer("rounds")
        assert isinstance(task, TrainTask) and after_s < 5
        task, after_s = held_poll_answer("stop")
        assert isinstance(task, Stop) and after_s < 5


def test_the_update_that_completes_a_round_commits_it_without_waiting_for_a_scheduler_tick(backend):
    # Ticks every 30 s: only the arrival of the last update can start the aggregation in time. The first of
    # the two updates cannot close the round (quorum 2) and leaves it collecting.
    settings = CoordinatorSettings(**backend, scheduler_interval_s=30)
    with running_coordinator(settings) as coordinator:
        federation = _federation(coordinator, server_learning=False, min_updates=2)
        devices = [_device(coordinator, federation["name"], name, ["image"]) for name in ("cam-1", "cam-2")]
        started = coordinator.admin.post(f"/v1/federations/{federation['id']}/rounds")
        assert started.status_code == 201, started.text
        for number, (client, device_id) in enumerate(devices, start=1):
            task = client.get_task(device_id)
            assert isinstance(task, TrainTask)
            payload = encode_tensors(_delta_for(client.download_global(device_id).adapter, {"image"}), "fp16")
            assert client.upload(_request(task, device_id, payload, ["image"]), payload, 0, 65536)[0] == "accepted"
            if number == 1:
                time.sleep(0.5)
                assert coordinator.admin.get(f"/v1/rounds/{task.round_id}").json()["state"] == "collecting"
        uploaded = time.monotonic()
        round_ = wait_for_round(coordinator.admin, task.round_id)
        assert round_["state"] == "committed", round_
        assert time.monotonic() - uploaded < 10


def test_a_held_task_poll_with_nothing_to_do_says_ask_again_now(coordinator):
    federation = _federation(coordinator, server_learning=False)
    client, device_id = _device(coordinator, federation["name"], "cam-1", ["image"], task_wait_s=2)
    started = time.monotonic()
    task = client.get_task(device_id)
    assert isinstance(task, Wait) and task.seconds == 0
    assert 1.9 < time.monotonic() - started < 10
