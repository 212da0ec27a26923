"""Device identity over real gRPC on loopback: mutual TLS with certificates made by ``mlecs.certs``, one-time
enrolment tokens, and revocation that takes effect on the device's next call, on every replica.

Every refusal is checked for its status and for having no effect: no device row, the token still unused,
no update and no new model version.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from edge_agent.client import CoordinatorClient
from edge_agent.config import TlsMaterial
from edge_agent.errors import CoordinatorUnavailable, CredentialRejected, RequestRefused
from edge_agent.tasks import TrainTask, UploadRequest, Wait
from mlecs import certs
from mlecs.codec import decode_tensors, encode_tensors, sha256_hex
from mlecs.proto.v1 import fleet_pb2 as pb
from mlecs.proto.v1 import fleet_pb2_grpc
from server.config import ConfigurationError, CoordinatorSettings
from server.domain.models import Device
from tests.integration.coordinator_harness import RunningCoordinator, running_coordinator

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"model": {"backbone": "tiny"}, "public_epochs": 1, "server_learning": False, "min_updates": 1}


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A development CA with certificates for cam-1 and cam-2, and a rogue CA that also signed a cam-1."""
    certs.init_directory(tmp_path / "pki")
    certs.init_directory(tmp_path / "rogue")
    for name in ("cam-1", "cam-2"):
        certs.issue_device_files(tmp_path / "pki", name)
    certs.issue_device_files(tmp_path / "rogue", "cam-1")
    return tmp_path / "pki"


def _mtls(pki: Path) -> dict:
    layout = certs.CaLayout(pki)
    return {"tls_cert_file": layout.coordinator.cert, "tls_key_file": layout.coordinator.key,
            "tls_client_ca_file": layout.ca.cert}


def _material(pki: Path, name: str, issuer: Path | None = None) -> TlsMaterial:
    """Client TLS for ``name`` with the certificate ``issuer`` (default: the real CA) signed; the client
    always checks the coordinator against the real CA."""
    files = certs.CaLayout(issuer or pki).device(name)
    return TlsMaterial(certs.CaLayout(pki).ca.cert.read_bytes(), files.cert.read_bytes(), files.key.read_bytes())


@pytest.fixture
def secure(tmp_path: Path, pki: Path) -> Iterator[RunningCoordinator]:
    with running_coordinator(CoordinatorSettings(state_dir=tmp_path / "coordinator", **_mtls(pki))) as running:
        yield running


def _federation(c: RunningCoordinator, **config) -> dict:
    response = c.admin.post("/v1/federations", json={"name": f"fed-{uuid.uuid4().hex[:8]}",
                                                     "config": {**CONFIG, **config}})
    assert response.status_code == 201, response.text
    return dict(response.json())


def _token(c: RunningCoordinator, federation: str, device_name: str | None = None, ttl_s: float = 600) -> str:
    assert c.coordinator.services is not None
    return c.coordinator.services.devices.issue_enrolment_token(federation, device_name, ttl_s, "tests")[0]


def _devices(c: RunningCoordinator, federation: dict) -> list[Device]:
    assert c.coordinator.services is not None
    return c.coordinator.services.ctx.store.list_devices(federation["id"])


def _token_unused(c: RunningCoordinator, federation: dict) -> bool:
    assert c.coordinator.services is not None
    return all(t.used_at is None for t in c.coordinator.services.devices.list_enrolment_tokens(federation["id"]))


def _client(c: RunningCoordinator, tls: TlsMaterial | None, **options) -> CoordinatorClient:
    return CoordinatorClient(c.grpc_address, timeout_s=10, task_wait_s=0, tls=tls, **options)


def _enrolled(c: RunningCoordinator, pki: Path, federation: dict, name: str) -> tuple[CoordinatorClient, str, str]:
    client = _client(c, _material(pki, name))
    device_id, secret, _ = client.enrol(federation["name"], name, ["image"], _token(c, federation["name"], name))
    client.authenticate(device_id, secret)
    return client, device_id, secret


# ---- mutual TLS ---------------------------------------------------------------------------------

def test_a_device_enrols_and_calls_over_mutual_tls_with_a_one_time_token(secure, pki):
    federation = _federation(secure)
    client, device_id, _ = _enrolled(secure, pki, federation, "cam-1")
    assert client.heartbeat(device_id) > 0
    assert isinstance(client.get_task(device_id), Wait)
    assert [d.name for d in _devices(secure, federation)] == ["cam-1"]
    tokens = secure.coordinator.services.devices.list_enrolment_tokens(federation["id"])  # type: ignore[union-attr]
    assert [(t.device_name, t.used_by_device_id) for t in tokens] == [("cam-1", device_id)]


def _refused_at_handshake(c: RunningCoordinator, federation: dict, channel: grpc.Channel) -> None:
    token = _token(c, federation["name"], "cam-1")
    with pytest.raises(grpc.RpcError) as refused:
        fleet_pb2_grpc.FleetStub(channel).Enrol(
            pb.EnrolRequest(federation=federation["name"], device_name="cam-1", enrolment_token=token,
                            modalities=[pb.MODALITY_IMAGE]), timeout=10)
    # The handshake fails: no RPC reaches the servicer, so there is no status from it, only the transport's.
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert _devices(c, federation) == [] and _token_unused(c, federation)


def test_a_connection_without_a_client_certificate_fails_the_handshake(secure, pki):
    federation = _federation(secure)
    no_cert = grpc.ssl_channel_credentials(certs.CaLayout(pki).ca.cert.read_bytes())
    with grpc.secure_channel(secure.grpc_address, no_cert) as channel:
        _refused_at_handshake(secure, federation, channel)


def test_a_certificate_from_another_ca_fails_the_handshake(secure, pki):
    federation = _federation(secure)
    rogue = _material(pki, "cam-1", issuer=pki.parent / "rogue")
    credentials = grpc.ssl_channel_credentials(rogue.ca_pem, rogue.key_pem, rogue.cert_pem)
    with grpc.secure_channel(secure.grpc_address, credentials) as channel:
        _refused_at_handshake(secure, federation, channel)
    with pytest.raises(CoordinatorUnavailable, match="UNAVAILABLE"):  # what the agent sees, and retries
        _client(secure, rogue).enrol(federation["name"], "cam-1", ["image"], _token(secure, federation["name"]))


def test_a_plaintext_connection_to_the_mutual_tls_port_fails(secure):
    federation = _federation(secure)
    with grpc.insecure_channel(secure.grpc_address) as channel:
        _refused_at_handshake(secure, federation, channel)


def test_a_certificate_naming_another_device_cannot_enrol_as_this_one(secure, pki):
    federation = _federation(secure)
    cam2 = _client(secure, _material(pki, "cam-2"))
    with pytest.raises(RequestRefused, match=r"PERMISSION_DENIED.*certificate is for 'cam-2'.*'cam-1'"):
        cam2.enrol(federation["name"], "cam-1", ["image"], _token(secure, federation["name"]))
    assert _devices(secure, federation) == [] and _token_unused(secure, federation)


def test_a_device_presenting_its_own_certificate_re_enrols_with_a_token_for_any_new_device(secure, pki):
    # The rule the README states: the certificate proves the device, the token allows one more enrolment.
    federation = _federation(secure)
    old_client, device_id, _ = _enrolled(secure, pki, federation, "cam-1")
    reinstalled = _client(secure, _material(pki, "cam-1"))

    again, secret, _ = reinstalled.enrol(federation["name"], "cam-1", ["image"], _token(secure, federation["name"]))

    assert again == device_id and [d.name for d in _devices(secure, federation)] == ["cam-1"]
    reinstalled.authenticate(again, secret)
    assert reinstalled.heartbeat(again) > 0
    with pytest.raises(CredentialRejected, match="UNAUTHENTICATED"):  # the old secret stopped working
        old_client.heartbeat(device_id)


def test_device_a_cannot_act_as_device_b(secure, pki):
    federation = _federation(secure)
    alice, alice_id, alice_secret = _enrolled(secure, pki, federation, "cam-1")
    _bob, bob_id, bob_secret = _enrolled(secure, pki, federation, "cam-2")
    assert alice.heartbeat(alice_id) > 0  # remembered: the cached path must check the certificate too

    # Alice's certificate with Bob's (stolen) credential: refused on every call, cached or not.
    alice.authenticate(bob_id, bob_secret)
    with pytest.raises(RequestRefused, match=r"PERMISSION_DENIED.*certificate is for 'cam-1'.*'cam-2'"):
        alice.heartbeat(bob_id)
    with pytest.raises(RequestRefused, match="PERMISSION_DENIED"):
        alice.get_task(bob_id)
    with pytest.raises(RequestRefused, match="PERMISSION_DENIED"):
        alice.download_global(bob_id)
    # Alice's secret with Bob's id: no such credential.
    alice.authenticate(bob_id, alice_secret)
    with pytest.raises(CredentialRejected, match="UNAUTHENTICATED"):
        alice.heartbeat(bob_id)
    # Her own credential, naming Bob in the request: refused too.
    alice.authenticate(alice_id, alice_secret)
    with pytest.raises(RequestRefused, match=r"PERMISSION_DENIED.*only as itself"):
        alice.heartbeat(bob_id)
    assert alice.heartbeat(alice_id) > 0


# ---- enrolment tokens ---------------------------------------------------------------------------

@pytest.fixture
def strict(tmp_path: Path) -> Iterator[RunningCoordinator]:
    """Plaintext (so tokens are tested alone) but enrolment needs a token."""
    with running_coordinator(CoordinatorSettings(state_dir=tmp_path / "c", open_enrolment=False)) as running:
        yield running


def test_enrolment_without_a_token_is_refused_saying_how_to_get_one(strict):
    federation = _federation(strict)
    with pytest.raises(CredentialRejected, match=r"UNAUTHENTICATED.*enrolment-tokens create"):
        _client(strict, None).enrol(federation["name"], "cam-1", ["image"])
    with pytest.raises(CredentialRejected, match="UNAUTHENTICATED: unknown enrolment token"):
        _client(strict, None).enrol(federation["name"], "cam-1", ["image"], "mlecs_enrol_guess")
    assert _devices(strict, federation) == []


def test_a_token_enrols_one_device_once(strict):
    federation = _federation(strict)
    token = _token(strict, federation["name"])
    device_id, _, _ = _client(strict, None).enrol(federation["name"], "cam-1", ["image"], token)
    with pytest.raises(CredentialRejected, match=r"UNAUTHENTICATED.*already used"):
        _client(strict, None).enrol(federation["name"], "cam-2", ["image"], token)
    assert [d.id for d in _devices(strict, federation)] == [device_id]


def test_an_expired_token_is_refused(strict):
    federation = _federation(strict)
    token = _token(strict, federation["name"], ttl_s=0.05)
    time.sleep(0.2)
    with pytest.raises(CredentialRejected, match=r"UNAUTHENTICATED.*expired"):
        _client(strict, None).enrol(federation["name"], "cam-1", ["image"], token)
    assert _devices(strict, federation) == [] and _token_unused(strict, federation)


def test_a_token_of_another_federation_or_for_another_name_is_refused(strict):
    federation, other = _federation(strict), _federation(strict)
    with pytest.raises(CredentialRejected, match="another federation"):
        _client(strict, None).enrol(federation["name"], "cam-1", ["image"], _token(strict, other["name"]))
    with pytest.raises(CredentialRejected, match="for device 'cam-2', not 'cam-1'"):
        _client(strict, None).enrol(federation["name"], "cam-1", ["image"], _token(strict, federation["name"], "cam-2"))
    assert _devices(strict, federation) == [] and _devices(strict, other) == []
    assert _token_unused(strict, federation) and _token_unused(strict, other)


def test_two_enrolments_racing_with_one_token_enrol_one_device(strict):
    federation = _federation(strict)
    token = _token(strict, federation["name"])
    barrier = threading.Barrier(3)
    outcomes: list[str] = []

    def enrol(name: str) -> None:
        client = _client(strict, None)
        barrier.wait()
        try:
            client.enrol(federation["name"], name, ["image"], token)
            outcomes.append("enrolled")
        except CredentialRejected as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=enrol, args=(f"cam-{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert outcomes.count("enrolled") == 1, outcomes
    assert len(_devices(strict, federation)) == 1


def test_re_enrolling_an_enrolled_name_needs_a_token_for_that_name(strict):
    federation = _federation(strict)
    device_id, _, _ = _client(strict, None).enrol(federation["name"], "cam-1", ["image"],
                                                  _token(strict, federation["name"]))
    with pytest.raises(RequestRefused, match=r"PERMISSION_DENIED.*already enrolled.*token issued for that device name"):
        _client(strict, None).enrol(federation["name"], "cam-1", ["image"], _token(strict, federation["name"]))
    again, _, _ = _client(strict, None).enrol(federation["name"], "cam-1", ["image"],
                                              _token(strict, federation["name"], "cam-1"))
    assert again == device_id


# ---- revocation ---------------------------------------------------------------------------------

def _payload_for(client: CoordinatorClient, device_id: str, task: TrainTask) -> tuple[UploadRequest, bytes]:
    adapter = decode_tensors(client.download_global(device_id, task.version_id).adapter)
    rng = np.random.default_rng(0)
    payload = encode_tensors({n: rng.normal(0, 0.01, v.shape).astype(np.float32) for n, v in adapter.items()
                              if not n.startswith("extractors.audio")}, "fp16")
    request = UploadRequest(round_id=task.round_id, device_id=device_id, upload_id=uuid.uuid4().hex, codec="fp16",
                            sha256=sha256_hex(payload), modalities=["image"], public_samples=10, private_samples=10,
                            base_version_id=task.version_id, metrics={})
    return request, payload


def test_a_revoked_device_is_refused_on_its_next_call_and_changes_nothing(secure, pki):
    federation = _federation(secure)
    client, device_id, _ = _enrolled(secure, pki, federation, "cam-1")
    assert secure.admin.post(f"/v1/federations/{federation['id']}/rounds").status_code == 201
    task = client.get_task(device_id)
    assert isinstance(task, TrainTask)
    request, payload = _payload_for(client, device_id, task)
    assert client.heartbeat(device_id) > 0  # its credential is remembered now

    services = secure.coordinator.services
    assert services is not None
    assert services.devices.revoke(device_id).revoked
    for call in (lambda: client.heartbeat(device_id), lambda: client.get_task(device_id),
                 lambda: client.upload(request, payload, 0, 65536),
                 lambda: client.upload_status(device_id, task.round_id, request.upload_id),
                 lambda: client.report_metrics(device_id, task.round_id, {"accuracy": 0.5})):
        with pytest.raises(RequestRefused, match="PERMISSION_DENIED: device revoked"):
            call()
    with pytest.raises(RequestRefused, match="PERMISSION_DENIED: device revoked"):  # not by re-enrolling either
        _client(secure, _material(pki, "cam-1")).enrol(federation["name"], "cam-1", ["image"],
                                                        _token(secure, federation["name"], "cam-1"))

    assert services.ctx.store.list_updates(task.round_id) == []
    assert secure.admin.get(f"/v1/rounds/{task.round_id}").json()["state"] == "open"
    assert len(services.ctx.store.list_versions(federation["id"])) == 1
    assert services.ctx.store.get_device(device_id).revoked


@pytest.mark.postgres
@pytest.mark.redis
def test_a_device_revoked_through_one_replica_is_refused_by_the_other(tmp_path, pki, make_postgres_database,
                                                                      redis_prefix):
    shared = {"state_dir": tmp_path / "shared", "database_url": make_postgres_database(),
              "redis_url": "redis://127.0.0.1:6379/0", "redis_prefix": redis_prefix, **_mtls(pki)}
    with running_coordinator(CoordinatorSettings(replica_id="a", **shared)) as a, \
            running_coordinator(CoordinatorSettings(replica_id="b", **shared)) as b:
        federation = _federation(a)
        on_a, device_id, secret = _enrolled(a, pki, federation, "cam-1")
        on_b = _client(b, _material(pki, "cam-1"))
        on_b.authenticate(device_id, secret)
        assert on_b.heartbeat(device_id) > 0 and on_b.heartbeat(device_id) > 0  # B remembers it (for 30 s)
        assert isinstance(on_b.get_task(device_id), Wait)

        assert a.coordinator.services is not None
        a.coordinator.services.devices.revoke(device_id)
        with pytest.raises(RequestRefused, match="device revoked"):  # at once on the replica that revoked
            on_a.heartbeat(device_id)
        time.sleep(4 * b.coordinator.settings.revocation_poll_interval_s)  # B reads the feed meanwhile
        with pytest.raises(RequestRefused, match="PERMISSION_DENIED: device revoked"):
            on_b.heartbeat(device_id)
        with pytest.raises(RequestRefused, match="PERMISSION_DENIED: device revoked"):
            on_b.get_task(device_id)


# ---- start-up -----------------------------------------------------------------------------------

def test_plaintext_is_refused_at_start_unless_allowed(tmp_path):
    settings = CoordinatorSettings(state_dir=tmp_path, allow_plaintext=False)
    with pytest.raises(RuntimeError, match="failed to start") as failed, running_coordinator(settings):
        pass
    assert isinstance(failed.value.__cause__, ConfigurationError)
    assert "mlecs certs init" in str(failed.value.__cause__)
    assert "MLECS_ALLOW_PLAINTEXT=true" in str(failed.value.__cause__)
    assert not (tmp_path / "coordinator.db").exists()  # refused before anything was created


def test_a_key_that_does_not_match_the_certificate_is_a_configuration_error(tmp_path, pki):
    settings = CoordinatorSettings(state_dir=tmp_path, **{**_mtls(pki), "tls_key_file": pki / "ca.key"})
    with pytest.raises(RuntimeError, match="failed to start") as failed, running_coordinator(settings):
        pass
    assert isinstance(failed.value.__cause__, ConfigurationError)
    assert "does not belong" in str(failed.value.__cause__)


def _serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLECS_")}
    return subprocess.run([sys.executable, "-m", "server", "serve"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**clean, "MLECS_STATE_DIR": str(tmp_path / "state"), "MLECS_GRPC_PORT": "0",
                                         "HF_HUB_OFFLINE": "1", **env})


def test_the_coordinator_without_tls_config_exits_2_saying_how_to_fix_it(tmp_path):
    result = _serve(tmp_path)
    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr and "mlecs certs init" in result.stderr
    assert "MLECS_ALLOW_PLAINTEXT=true" in result.stderr


def test_half_a_tls_configuration_exits_2_naming_what_is_missing(tmp_path, pki):
    result = _serve(tmp_path, MLECS_TLS_CERT_FILE=str(pki / "coordinator.pem"))
    assert result.returncode == 2, result.stderr
    assert "MLECS_TLS_KEY_FILE" in result.stderr and "MLECS_TLS_CLIENT_CA_FILE" in result.stderr


def test_the_enrolment_token_command_prints_a_token_that_enrols_a_device(tmp_path):
    state = tmp_path / "state"
    with running_coordinator(CoordinatorSettings(state_dir=state, open_enrolment=False)) as c:
        federation = _federation(c)
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MLECS_")}
        result = subprocess.run(
            [sys.executable, "-m", "server", "enrolment-tokens", "create", "--federation", federation["name"],
             "--device-name", "cam-1", "--device-name", "cam-2", "--ttl-hours", "1", "--quiet"],
            capture_output=True, text=True, timeout=120, cwd=ROOT, env={**clean, "MLECS_STATE_DIR": str(state)})
        assert result.returncode == 0, result.stderr
        first, second = result.stdout.split()
        assert first.startswith("mlecs_enrol_") and first != second
        with pytest.raises(CredentialRejected, match="for device 'cam-1', not 'cam-2'"):
            _client(c, None).enrol(federation["name"], "cam-2", ["image"], first)
        _client(c, None).enrol(federation["name"], "cam-1", ["image"], first)
        _client(c, None).enrol(federation["name"], "cam-2", ["image"], second)
        assert sorted(d.name for d in _devices(c, federation)) == ["cam-1", "cam-2"]

        unknown = subprocess.run(
            [sys.executable, "-m", "server", "enrolment-tokens", "create", "--federation", "no-such-federation"],
            capture_output=True, text=True, timeout=120, cwd=ROOT, env={**clean, "MLECS_STATE_DIR": str(state)})
        assert unknown.returncode == 1 and "no-such-federation" in unknown.stderr


# ---- the admin API's transport ------------------------------------------------------------------------------

def test_the_admin_api_serves_https_with_the_coordinator_certificate(tmp_path, pki):
    layout = certs.CaLayout(pki)
    settings = CoordinatorSettings(state_dir=tmp_path / "coordinator", admin_tls_cert_file=layout.coordinator.cert,
                                   admin_tls_key_file=layout.coordinator.key)
    with running_coordinator(settings) as c:
        port = c.admin.base_url.port
        trusted = ssl.create_default_context(cafile=layout.ca.cert)
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=trusted, timeout=10) as verified:
            response = verified.get("/v1/federations", headers={"Authorization": f"Bearer {c.admin_token}"})
            assert response.status_code == 200, response.text
        with pytest.raises(httpx.TransportError):  # plain HTTP is not served on it
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_half_an_admin_tls_configuration_is_refused_naming_what_is_missing(tmp_path, pki):
    with pytest.raises(ValueError, match="missing MLECS_ADMIN_TLS_KEY_FILE"):
        CoordinatorSettings(state_dir=tmp_path, admin_tls_cert_file=certs.CaLayout(pki).coordinator.cert)


def test_a_plaintext_admin_api_off_loopback_is_warned_about_and_on_loopback_is_not(tmp_path, caplog):
    for host, warned in (("0.0.0.0", True), ("127.0.0.1", False)):
        caplog.clear()
        with running_coordinator(CoordinatorSettings(state_dir=tmp_path / host, admin_host=host)):
            pass
        assert any("PLAINTEXT ADMIN API" in r.getMessage() for r in caplog.records) == warned, host
