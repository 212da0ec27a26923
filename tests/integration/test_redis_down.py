"""With Redis unreachable the coordinator degrades to clear errors, never to wrong state."""

from __future__ import annotations

import grpc
import pytest

from mlecs.proto.v1 import fleet_pb2 as pb
from mlecs.proto.v1 import fleet_pb2_grpc
from server.config import CoordinatorSettings
from tests.integration.coordinator_harness import free_port, running_coordinator


@pytest.fixture
def coordinator_without_redis(tmp_path):
    # A port nobody listens on: every Redis call is refused at once.
    settings = CoordinatorSettings(state_dir=tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with running_coordinator(settings) as running:
        yield running


def test_the_coordinator_stays_ready_and_says_presence_is_down(coordinator_without_redis):
    response = coordinator_without_redis.admin.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"ready": True, "database": True, "presence": False}


def test_devices_enrol_and_get_tasks_while_heartbeats_and_new_rounds_are_unavailable(coordinator_without_redis):
    admin = coordinator_without_redis.admin
    assert admin.post("/v1/federations", json={"name": "f", "config": {
        "model": {"backbone": "tiny"}, "server_learning": False}}).status_code == 201
    with grpc.insecure_channel(coordinator_without_redis.grpc_address) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        enrolled = stub.Enrol(pb.EnrolRequest(federation="f", device_name="d", modalities=[pb.MODALITY_IMAGE]),
                              timeout=30)
        metadata = (("authorization", f"Device {enrolled.device_id}:{enrolled.device_secret}"),)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Heartbeat(pb.HeartbeatRequest(device_id=enrolled.device_id), metadata=metadata, timeout=30)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "Redis is unavailable" in refused.value.details()
        task = stub.GetTask(pb.GetTaskRequest(device_id=enrolled.device_id), metadata=metadata, timeout=30)
        assert task.WhichOneof("task") == "wait"  # the database still answers what to do

    response = admin.post("/v1/federations/f/rounds")  # who is live cannot be told: said, not guessed
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "Redis is unavailable" in response.json()["detail"]
    assert response.json()["retryable"] is True
    assert admin.get("/v1/federations/f/rounds").json() == []  # nothing half-created
    assert admin.get("/v1/federations/f/devices").status_code == 503
