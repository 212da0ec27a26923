"""SE-CCL over the real protocol: anchors per version, fused z in updates, and MMA's noise weight."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from edge_agent.client import CoordinatorClient
from edge_agent.errors import RequestRefused
from edge_agent.tasks import TrainTask, UploadRequest
from mlecs.codec import decode_tensors, encode_tensors, sha256_hex
from server.config import CoordinatorSettings
from tests.integration.coordinator_harness import RunningCoordinator, running_coordinator, wait_for_round

TINY = {"backbone": "tiny"}
BOTH = ["audio", "image"]


@pytest.fixture
def coordinator(tmp_path) -> Iterator[RunningCoordinator]:
    with running_coordinator(CoordinatorSettings(state_dir=tmp_path)) as running:
        yield running


def _federation(c: RunningCoordinator, **config) -> dict:
    body = {"name": f"fed-{uuid.uuid4().hex[:8]}",
            "config": {"model": TINY, "public_epochs": 1, "fused_upload_samples": 8, **config}}
    response = c.admin.post("/v1/federations", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def _device(c: RunningCoordinator, federation: str, name: str) -> tuple[CoordinatorClient, str]:
    client = CoordinatorClient(c.grpc_address)
    device_id, secret, _ = client.enrol(federation, name, BOTH)
    client.authenticate(device_id, secret)
    return client, device_id


def _delta(adapter: bytes, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0, 0.01, value.shape).astype(np.float32)
            for name, value in decode_tensors(adapter).items()}


def _upload(client: CoordinatorClient, device_id: str, task: TrainTask, tensors: dict[str, np.ndarray],
            fused_ids: list[int]) -> str:
    payload = encode_tensors(tensors, "fp32")
    request = UploadRequest(round_id=task.round_id, device_id=device_id, upload_id=uuid.uuid4().hex, codec="fp32",
                            sha256=sha256_hex(payload), modalities=BOTH, public_samples=50, private_samples=100,
                            base_version_id=task.version_id, fused_sample_ids=fused_ids)
    return client.upload(request, payload, 0, 65536)[0]


def _start(c: RunningCoordinator, federation: dict, *clients: tuple[CoordinatorClient, str]) -> list[TrainTask]:
    for client, device_id in clients:
        client.heartbeat(device_id)
    assert c.admin.post(f"/v1/federations/{federation['id']}/rounds").status_code == 201
    tasks = [client.get_task(device_id) for client, device_id in clients]
    assert all(isinstance(t, TrainTask) for t in tasks)
    return tasks  # type: ignore[return-value]


def test_anchors_follow_the_cloud_and_disagreeing_clients_weigh_almost_nothing(coordinator):
    federation = _federation(coordinator, anchors="wait")  # each version carries the anchors made from it
    honest = _device(coordinator, federation["name"], "honest")
    noisy = _device(coordinator, federation["name"], "noisy")

    # Round 1: version 0 carries text anchors only, so there is no evidence yet about anyone.
    tasks = _start(coordinator, federation, honest, noisy)
    version0 = honest[0].download_global(honest[1], tasks[0].version_id)
    assert set(decode_tensors(version0.anchors)) == {"text.class"}
    for (client, device_id), task, seed in zip((honest, noisy), tasks, (1, 2), strict=True):
        assert _upload(client, device_id, task, _delta(version0.adapter, seed), []) == "accepted"
    round1 = wait_for_round(coordinator.admin, tasks[0].round_id)
    assert round1["state"] == "committed", round1
    assert "anchor_agreement_mean" not in round1["metrics"]

    # Version 1 carries the cloud model's fused z for every public sample, and the cloud is evaluated.
    version1 = honest[0].download_global(honest[1])
    anchors = decode_tensors(version1.anchors)
    ids, z = anchors["fused.ids"].astype(np.int64), anchors["fused.z"]
    assert anchors["text.class"].shape == (10, 384)
    assert len(ids) == 540 and z.shape == (540, 256) and len(np.unique(ids)) == 540
    listed = coordinator.admin.get(f"/v1/federations/{federation['id']}/versions").json()
    assert 0 <= listed[-1]["metrics"]["cloud_accuracy"] <= 1

    # Round 2: one client's z agrees with the anchors, the other's points the opposite way.
    tasks = _start(coordinator, federation, honest, noisy)
    chosen = [int(i) for i in ids[:8]]
    honest_delta, noisy_delta = _delta(version1.adapter, 3), _delta(version1.adapter, 4)
    assert _upload(*honest, tasks[0], honest_delta | {"fused.z": z[:8]}, chosen) == "accepted"
    assert _upload(*noisy, tasks[1], noisy_delta | {"fused.z": -z[:8]}, chosen) == "accepted"
    round2 = wait_for_round(coordinator.admin, tasks[0].round_id)
    assert round2["state"] == "committed", round2
    assert round2["metrics"]["anchor_agreement_mean"] == pytest.approx(0.0, abs=1e-5)  # mean of +1 and -1
    assert round2["metrics"]["quality_weight_min"] == pytest.approx(np.exp(-2 / 0.2), rel=1e-3)

    after = decode_tensors(coordinator.admin.get(f"/v1/versions/{round2['version_id']}/adapter").content)
    before = decode_tensors(version1.adapter)
    name = "head.weight"
    np.testing.assert_allclose(after[name] - before[name], honest_delta[name], atol=1e-5)


def test_fused_representations_that_do_not_match_their_ids_are_refused(coordinator):
    federation = _federation(coordinator)
    client, device_id = _device(coordinator, federation["name"], "cam")
    [task] = _start(coordinator, federation, (client, device_id))
    adapter = client.download_global(device_id, task.version_id).adapter
    rows = np.ones((3, 256), dtype=np.float32)

    with pytest.raises(RequestRefused, match=r"fused\.z"):  # 3 rows for 2 ids
        _upload(client, device_id, task, _delta(adapter, 1) | {"fused.z": rows}, [1, 2])
    with pytest.raises(RequestRefused, match=r"fused\.z"):  # ids declared, tensor missing
        _upload(client, device_id, task, _delta(adapter, 1), [1, 2, 3])
    with pytest.raises(RequestRefused, match="at most 8"):
        _upload(client, device_id, task, _delta(adapter, 1) | {"fused.z": np.ones((9, 256), np.float32)},
                list(range(9)))
    with pytest.raises(RequestRefused, match="distinct"):
        _upload(client, device_id, task, _delta(adapter, 1) | {"fused.z": rows}, [1, 1, 2])
    assert coordinator.admin.get(f"/v1/rounds/{task.round_id}").json()["state"] == "open"
    assert _upload(client, device_id, task, _delta(adapter, 1) | {"fused.z": rows}, [1, 2, 3]) == "accepted"


def _round_of_two(c: RunningCoordinator, federation: dict, *devices: tuple[CoordinatorClient, str],
                  evaluated: bool = True) -> tuple[dict, TrainTask]:
    tasks = _start(c, federation, *devices)
    adapter = devices[0][0].download_global(devices[0][1], tasks[0].version_id).adapter
    for (client, device_id), task, seed in zip(devices, tasks, (1, 2), strict=True):
        assert _upload(client, device_id, task, _delta(adapter, seed), []) == "accepted"
    round_ = wait_for_round(c.admin, tasks[0].round_id, evaluated=evaluated)
    assert round_["state"] == "committed", round_
    return round_, tasks[0]


def _anchor_names(c: RunningCoordinator, device: tuple[CoordinatorClient, str], version_id: str) -> set[str]:
    return set(decode_tensors(device[0].download_global(device[1], version_id).anchors))


def test_with_latest_anchors_a_version_carries_the_newest_the_cloud_has_made(coordinator):
    federation = _federation(coordinator)  # anchors = "latest", the default
    devices = (_device(coordinator, federation["name"], "a"), _device(coordinator, federation["name"], "b"))

    round1, _ = _round_of_two(coordinator, federation, *devices)
    # Committed before its cloud work ran: version 1 carries version 0's anchors (text only) ...
    assert _anchor_names(coordinator, devices[0], round1["version_id"]) == {"text.class"}
    version1 = coordinator.admin.get(f"/v1/versions/{round1['version_id']}").json()
    assert version1["cloud_state"] == "done" and 0 <= version1["metrics"]["cloud_accuracy"] <= 1
    assert 0 <= round1["metrics"]["global_accuracy"] <= 1  # the job's evaluation, joined to the round

    # ... and version 2 the anchors the cloud made from version 1.
    round2, _ = _round_of_two(coordinator, federation, *devices)
    assert _anchor_names(coordinator, devices[0], round2["version_id"]) == {"text.class", "fused.ids", "fused.z"}


@pytest.fixture
def workerless(tmp_path) -> Iterator[RunningCoordinator]:
    """A coordinator that runs no cloud jobs itself (as where workers are a service of their own)."""
    with running_coordinator(CoordinatorSettings(state_dir=tmp_path, worker_inprocess=False,
                                                 cloud_job_timeout_s=0.5)) as running:
        yield running


def test_with_wait_anchors_no_round_opens_until_the_version_has_its_anchors(workerless):
    federation = _federation(workerless, anchors="wait")
    devices = (_device(workerless, federation["name"], "a"), _device(workerless, federation["name"], "b"))
    round1, _ = _round_of_two(workerless, federation, *devices, evaluated=False)
    version = workerless.admin.get(f"/v1/versions/{round1['version_id']}").json()
    assert (version["cloud_state"], version["anchors_size"], version["metrics"]) == ("pending", 0, {})

    launch = workerless.admin.post(f"/v1/federations/{federation['id']}/rounds")
    assert launch.status_code == 409 and "waits for the anchors of version 1" in launch.text, launch.text

    # Nobody runs the queue here; the job is still owed, and put on the queue again once it is stale.
    services = workerless.coordinator.services
    assert services is not None
    time.sleep(1.5)
    assert services.jobs.depth() >= 2  # queued at the commit, and again at least once since
    services.cloud_work.run(round1["version_id"])  # what a worker does with the job
    services.cloud_work.run(round1["version_id"])  # run twice (a redelivered copy): nothing changes
    version = workerless.admin.get(f"/v1/versions/{round1['version_id']}").json()
    assert version["cloud_state"] == "done" and version["cloud_attempts"] == 1 and version["anchors_size"] > 0
    assert _start(workerless, federation, *devices)  # the round opens now
