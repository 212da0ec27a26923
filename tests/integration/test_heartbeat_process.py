"""The heartbeat process (MLECS_HEARTBEAT_PORT) over real gRPC, Redis and mutual TLS: devices are told its
port and heartbeat there, it refuses what the device port refuses, it is restarted when it dies (devices
fall back to the device port meanwhile), and it never outlives the coordinator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from prometheus_client import REGISTRY

from edge_agent.client import CoordinatorClient
from edge_agent.config import TlsMaterial
from edge_agent.errors import RequestRefused
from mlecs import certs
from mlecs.proto.v1 import fleet_pb2 as pb
from mlecs.proto.v1 import fleet_pb2_grpc
from server.config import CoordinatorSettings
from tests.integration.coordinator_harness import RunningCoordinator, free_port, running_coordinator

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"model": {"backbone": "tiny"}, "server_learning": False, "min_updates": 1}


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s} s")
        time.sleep(0.05)


def _heartbeats_on_device_port() -> float:
    """Heartbeats the coordinator's device port answered (its metrics share this test's registry)."""
    return REGISTRY.get_sample_value("mlecs_rpc_duration_seconds_count", {"method": "Heartbeat", "code": "OK"}) or 0.0


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    certs.init_directory(tmp_path / "pki")
    for name in ("cam-1", "cam-2"):
        certs.issue_device_files(tmp_path / "pki", name)
    return tmp_path / "pki"


def _tls(pki: Path, name: str = "cam-1") -> TlsMaterial:
    layout = certs.CaLayout(pki)
    files = layout.device(name)
    return TlsMaterial(layout.ca.cert.read_bytes(), files.cert.read_bytes(), files.key.read_bytes())


@pytest.fixture
def coordinator(tmp_path: Path, pki: Path, redis_prefix: str) -> Iterator[RunningCoordinator]:
    layout = certs.CaLayout(pki)
    settings = CoordinatorSettings(
        state_dir=tmp_path / "coordinator", redis_url="redis://127.0.0.1:6379/0", redis_prefix=redis_prefix,
        heartbeat_port=0, tls_cert_file=layout.coordinator.cert, tls_key_file=layout.coordinator.key,
        tls_client_ca_file=layout.ca.cert, revocation_poll_interval_s=0.1)
    with running_coordinator(settings) as running:
        _wait_for(lambda: running.coordinator.heartbeat_port > 0, 60, "the heartbeat process did not serve")
        yield running


def _enrolled(c: RunningCoordinator, pki: Path) -> tuple[CoordinatorClient, str, str, str]:
    """(client, device id, secret, federation name) for cam-1, enrolled with a one-time token."""
    name = f"fed-{uuid.uuid4().hex[:8]}"
    assert c.admin.post("/v1/federations", json={"name": name, "config": CONFIG}).status_code == 201
    assert c.coordinator.services is not None
    token = c.coordinator.services.devices.issue_enrolment_token(name, "cam-1", 600, "tests")[0]
    client = CoordinatorClient(c.grpc_address, timeout_s=10, task_wait_s=0, tls=_tls(pki))
    device_id, secret, _ = client.enrol(name, "cam-1", ["image"], token)
    client.authenticate(device_id, secret)
    return client, device_id, secret, name


def _online(c: RunningCoordinator, federation: str, device_id: str) -> bool:
    devices = c.admin.get(f"/v1/federations/{federation}/devices").json()
    return any(d["id"] == device_id and d["online"] for d in devices)


def _secure_channel(port: int, pki: Path, tls: TlsMaterial | None = None) -> grpc.Channel:
    material = tls or _tls(pki)
    credentials = grpc.ssl_channel_credentials(material.ca_pem, material.key_pem, material.cert_pem)
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def test_devices_heartbeat_on_the_heartbeat_port_and_show_online(coordinator, pki):
    port = coordinator.coordinator.heartbeat_port
    assert port != coordinator.coordinator.grpc_port
    client, device_id, _, federation = _enrolled(coordinator, pki)  # the Enrol reply named the port
    before = _heartbeats_on_device_port()
    for _ in range(3):
        assert client.heartbeat(device_id) == coordinator.coordinator.settings.heartbeat_interval_s
    assert _heartbeats_on_device_port() == before  # all three went to the heartbeat process
    # It marked the device seen in Redis (buffered), where the coordinator reads presence.
    _wait_for(lambda: _online(coordinator, federation, device_id), 10, "the device did not show online")
    client.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a priority needs root (or CAP_SYS_NICE / RLIMIT_NICE)")
def test_every_thread_of_the_heartbeat_process_runs_at_its_raised_priority(coordinator):
    process = coordinator.coordinator.heartbeat_process
    assert process is not None and process.pid is not None
    threads = [int(tid) for tid in os.listdir(f"/proc/{process.pid}/task")]
    assert len(threads) > 3  # gRPC's and the control threads, not only the main one
    nice = coordinator.coordinator.settings.heartbeat_nice
    assert nice < 0 and {os.getpriority(os.PRIO_PROCESS, tid) for tid in threads} == {nice}


def test_the_heartbeat_port_serves_heartbeats_only_and_refuses_what_the_device_port_refuses(coordinator, pki):
    port = coordinator.coordinator.heartbeat_port
    _, device_id, secret, _ = _enrolled(coordinator, pki)
    metadata = (("authorization", f"Device {device_id}:{secret}"),)
    with _secure_channel(port, pki) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        reply = stub.Heartbeat(pb.HeartbeatRequest(device_id=device_id), metadata=metadata, timeout=10)
        assert reply.heartbeat_port == port and reply.next_heartbeat_s > 0
        with pytest.raises(grpc.RpcError) as other_method:
            stub.GetTask(pb.GetTaskRequest(device_id=device_id), metadata=metadata, timeout=10)
        assert other_method.value.code() is grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as anonymous:
            stub.Heartbeat(pb.HeartbeatRequest(device_id=device_id), timeout=10)
        assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong_secret:
            stub.Heartbeat(pb.HeartbeatRequest(device_id=device_id), timeout=10,
                           metadata=(("authorization", f"Device {device_id}:not-the-secret"),))
        assert wrong_secret.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as as_another:
            stub.Heartbeat(pb.HeartbeatRequest(device_id="someone-else"), metadata=metadata, timeout=10)
        assert as_another.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with _secure_channel(port, pki, _tls(pki, "cam-2")) as other_certificate:  # cam-1's secret, cam-2's certificate
        with pytest.raises(grpc.RpcError) as stolen:
            fleet_pb2_grpc.FleetStub(other_certificate).Heartbeat(pb.HeartbeatRequest(device_id=device_id),
                                                                  metadata=metadata, timeout=10)
        assert stolen.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with grpc.insecure_channel(f"127.0.0.1:{port}") as plaintext:  # same mutual TLS as the device port
        with pytest.raises(grpc.RpcError) as handshake:
            fleet_pb2_grpc.FleetStub(plaintext).Heartbeat(pb.HeartbeatRequest(device_id=device_id),
                                                         metadata=metadata, timeout=5)
        assert handshake.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_device_revoked_on_the_coordinator_is_refused_by_the_heartbeat_process(coordinator, pki):
    client, device_id, _, _ = _enrolled(coordinator, pki)
    assert client.heartbeat(device_id) > 0  # the heartbeat process now remembers the credential
    assert coordinator.coordinator.services is not None
    coordinator.coordinator.services.devices.revoke(device_id)
    time.sleep(5 * coordinator.coordinator.settings.revocation_poll_interval_s)  # it follows the Redis feed
    with pytest.raises(RequestRefused, match="PERMISSION_DENIED: device revoked"):
        client.heartbeat(device_id)


def test_a_dead_heartbeat_process_is_restarted_and_devices_fall_back_to_the_device_port_meanwhile(coordinator, pki):
    client, device_id, _, _ = _enrolled(coordinator, pki)
    process = coordinator.coordinator.heartbeat_process
    assert process is not None and process.pid is not None
    first_pid = process.pid
    os.kill(first_pid, signal.SIGKILL)
    _wait_for(lambda: coordinator.coordinator.heartbeat_port == 0, 10, "the dead port was still advertised")

    before = _heartbeats_on_device_port()
    assert client.heartbeat(device_id) > 0  # the heartbeat port refuses connections: sent to the device port
    assert _heartbeats_on_device_port() == before + 1

    _wait_for(lambda: coordinator.coordinator.heartbeat_port > 0, 60, "the heartbeat process was not restarted")
    assert process.pid not in (None, first_pid)
    assert client.heartbeat(device_id) > 0  # the device port's reply names the new port (0 ⇒ any free one)
    after_fallback = _heartbeats_on_device_port()
    assert client.heartbeat(device_id) > 0
    assert _heartbeats_on_device_port() == after_fallback  # back on the heartbeat process
    client.close()


def _heartbeat_child(parent_pid: int) -> psutil.Process | None:
    for child in psutil.Process(parent_pid).children():
        if "serve-heartbeats" in " ".join(child.cmdline()):
            return child
    return None


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_the_heartbeat_process_stops_with_the_coordinator(tmp_path, redis_prefix, stop_signal):
    """SIGTERM stops both; after a SIGKILL of the coordinator the child notices it is orphaned."""
    env = {**os.environ, "MLECS_STATE_DIR": str(tmp_path / "coordinator"), "MLECS_GRPC_PORT": "0",
           "MLECS_ADMIN_PORT": str(free_port()), "MLECS_REDIS_URL": "redis://127.0.0.1:6379/0",
           "MLECS_REDIS_PREFIX": redis_prefix, "MLECS_HEARTBEAT_PORT": "0", "MLECS_ALLOW_PLAINTEXT": "true",
           "MLECS_LOG_LEVEL": "WARNING"}
    env.pop("MLECS_DATABASE_URL", None)
    parent = subprocess.Popen([sys.executable, "-m", "server", "serve"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _heartbeat_child(parent.pid) is not None, 90, "the heartbeat process did not start")
        child = _heartbeat_child(parent.pid)
        assert child is not None
        parent.send_signal(stop_signal)
        parent.wait(timeout=30)
        gone, _ = psutil.wait_procs([child], timeout=15)
        assert gone, f"the heartbeat process outlived a coordinator stopped by {stop_signal.name}"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_heartbeat_port_without_redis_is_a_configuration_error(tmp_path):
    with pytest.raises(ValueError, match="MLECS_HEARTBEAT_PORT needs MLECS_REDIS_URL"):
        CoordinatorSettings(state_dir=tmp_path, heartbeat_port=0)
