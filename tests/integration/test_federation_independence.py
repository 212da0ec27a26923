"""Federations are driven side by side: one federation's round stuck in its commit (here: its round lock held,
as a long aggregation holds it) does not hold another federation's round."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from edge_agent.client import CoordinatorClient
from edge_agent.tasks import TrainTask, UploadRequest
from mlecs.codec import decode_tensors, encode_tensors, sha256_hex
from server.config import CoordinatorSettings
from tests.integration.coordinator_harness import RunningCoordinator, running_coordinator, wait_for_round

BOTH = ["audio", "image"]


@pytest.fixture
def coordinator(tmp_path) -> Iterator[RunningCoordinator]:
    with running_coordinator(CoordinatorSettings(state_dir=tmp_path, scheduler_interval_s=0.2)) as running:
        yield running


def _federation_with_a_device(c: RunningCoordinator) -> tuple[dict, CoordinatorClient, str]:
    body = {"name": f"fed-{uuid.uuid4().hex[:8]}",
            "config": {"model": {"backbone": "tiny"}, "server_learning": False, "fused_upload_samples": 0}}
    response = c.admin.post("/v1/federations", json=body)
    assert response.status_code == 201, response.text
    federation = response.json()
    client = CoordinatorClient(c.grpc_address)
    device_id, secret, _ = client.enrol(federation["name"], "cam", BOTH)
    client.authenticate(device_id, secret)
    client.heartbeat(device_id)
    assert c.admin.post(f"/v1/federations/{federation['id']}/rounds").status_code == 201
    return federation, client, device_id


def _upload(client: CoordinatorClient, device_id: str) -> str:
    task = client.get_task(device_id)
    assert isinstance(task, TrainTask)
    adapter = client.download_global(device_id, task.version_id).adapter
    tensors = {name: np.full(value.shape, 0.01, np.float32) for name, value in decode_tensors(adapter).items()}
    payload = encode_tensors(tensors, "fp32")
    request = UploadRequest(round_id=task.round_id, device_id=device_id, upload_id=uuid.uuid4().hex, codec="fp32",
                            sha256=sha256_hex(payload), modalities=BOTH, public_samples=10, private_samples=10,
                            base_version_id=task.version_id, fused_sample_ids=[])
    assert client.upload(request, payload, 0, 65536)[0] == "accepted"
    return task.round_id


def test_a_federation_stuck_in_its_round_does_not_hold_another_federations_round(coordinator):
    stuck, _, _ = _federation_with_a_device(coordinator)  # listed first: a sequential tick would wait on it
    stuck_round = coordinator.admin.get(f"/v1/federations/{stuck['id']}/rounds").json()[-1]
    services = coordinator.coordinator.services
    assert services is not None
    lock = services.rounds._locks(stuck_round["id"])  # what an aggregation in progress holds
    with lock:
        time.sleep(0.5)  # a tick or two: the stuck federation's driver is now waiting on the lock
        _, client, device_id = _federation_with_a_device(coordinator)
        started = time.monotonic()
        round_ = wait_for_round(coordinator.admin, _upload(client, device_id), timeout_s=30)
        assert round_["state"] == "committed", round_
        assert time.monotonic() - started < 10
        assert coordinator.admin.get(f"/v1/rounds/{stuck_round['id']}").json()["state"] == "open"
    # Released, the stuck federation is driven again (its round waits for its device, as before).
    time.sleep(0.5)
    assert coordinator.admin.get(f"/v1/rounds/{stuck_round['id']}").json()["state"] == "open"
