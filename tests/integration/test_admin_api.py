"""The admin API's operations against a real coordinator with devices on loopback gRPC: pausing and resuming,
per-device participation, refusals and metrics of a round, promoting and rolling back versions, devices,
enrolment tokens, problem+json errors, and an OpenAPI document with examples."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from edge_agent.client import CoordinatorClient
from edge_agent.errors import CredentialRejected, RequestRefused
from edge_agent.tasks import TrainTask, UploadRequest, Wait
from mlecs.codec import decode_tensors, encode_tensors, sha256_hex
from mlecs.model import tensor_modality
from server.config import CoordinatorSettings
from tests.integration.coordinator_harness import RunningCoordinator, running_coordinator, wait_for_round

TINY = {"model": {"backbone": "tiny"}, "server_learning": False, "public_epochs": 1}


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    settings = CoordinatorSettings(state_dir=tmp_path_factory.mktemp("api"), scheduler_interval_s=0.2)
    with running_coordinator(settings) as running:
        yield running


def _federation(c: RunningCoordinator, **config: Any) -> dict:
    body = {"name": f"fed-{uuid.uuid4().hex[:8]}", "config": {**TINY, **config}}
    response = c.admin.post("/v1/federations", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def _device(c: RunningCoordinator, federation: str, name: str, modalities: list[str],
            token: str = "") -> tuple[CoordinatorClient, str]:
    client = CoordinatorClient(c.grpc_address, task_wait_s=0)
    device_id, secret, _ = client.enrol(federation, name, modalities, enrolment_token=token)
    client.authenticate(device_id, secret)
    return client, device_id


def _upload(client: CoordinatorClient, device_id: str, task: TrainTask, modalities: list[str],
            **overrides: Any) -> str:
    rng = np.random.default_rng(0)
    tensors = decode_tensors(client.download_global(device_id, task.version_id).adapter)
    delta = {n: rng.normal(0, 0.01, v.shape).astype(np.float32) for n, v in tensors.items()
             if tensor_modality(n) is None or tensor_modality(n) in modalities}
    payload = encode_tensors(delta, "fp16")
    fields: dict[str, Any] = dict(round_id=task.round_id, device_id=device_id, upload_id=uuid.uuid4().hex,
                                  codec="fp16", sha256=sha256_hex(payload), modalities=modalities, public_samples=50,
                                  private_samples=200, base_version_id=task.version_id,
                                  metrics={"personal_accuracy": 0.5})
    fields.update(overrides)
    return client.upload(UploadRequest(**fields), payload, 0, 65536)[0]


def _eventually(check: Callable[[], Any], timeout_s: float = 15) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true within {timeout_s} s")
        time.sleep(0.1)


def _task(client: CoordinatorClient, device_id: str) -> TrainTask:
    task = client.get_task(device_id)
    assert isinstance(task, TrainTask), task
    return task


def test_a_paused_federation_opens_no_round_and_its_devices_wait_until_resumed(c: RunningCoordinator) -> None:
    federation = _federation(c)
    name = federation["name"]
    client, device_id = _device(c, name, "cam", ["image"])

    paused = c.admin.post(f"/v1/federations/{name}/pause")
    assert paused.status_code == 200 and paused.json()["state"] == "paused"
    assert c.admin.post(f"/v1/federations/{name}/pause").json()["state"] == "paused"  # again: no change
    launch = c.admin.post(f"/v1/federations/{name}/rounds")
    assert launch.status_code == 409 and "paused; resume it" in launch.json()["detail"]
    task = client.get_task(device_id)
    assert isinstance(task, Wait) and "paused" in task.reason

    assert c.admin.post(f"/v1/federations/{name}/resume").json()["state"] == "active"
    assert c.admin.post(f"/v1/federations/{name}/rounds").status_code == 201
    assert _task(client, device_id).round_number == 1


def test_the_scheduler_opens_no_round_for_a_paused_federation(c: RunningCoordinator) -> None:
    federation = _federation(c, target_rounds=1)
    name = federation["name"]
    c.admin.post(f"/v1/federations/{name}/pause")
    _device(c, name, "mic", ["audio"])  # enough live devices: the scheduler would open a round now
    time.sleep(1.5)
    assert c.admin.get(f"/v1/federations/{name}/rounds").json() == []

    c.admin.post(f"/v1/federations/{name}/resume")
    rounds = _eventually(lambda: c.admin.get(f"/v1/federations/{name}/rounds").json())
    assert rounds[0]["number"] == 1


def test_a_stopped_federation_can_be_neither_paused_nor_resumed(c: RunningCoordinator) -> None:
    name = _federation(c)["name"]
    c.admin.post(f"/v1/federations/{name}/pause")
    assert c.admin.post(f"/v1/federations/{name}/stop").json()["state"] == "stopped"
    for verb in ("pause", "resume"):
        response = c.admin.post(f"/v1/federations/{name}/{verb}")
        assert response.status_code == 409 and "stopped for good" in response.json()["detail"], verb
    assert c.admin.get(f"/v1/federations/{name}").json()["state"] == "stopped"


def test_a_round_shows_each_devices_participation_refusals_and_metrics(c: RunningCoordinator) -> None:
    federation = _federation(c, min_updates=1, round_deadline_s=3)
    name = federation["name"]
    cam, cam_id = _device(c, name, "cam", ["image"])
    mic, mic_id = _device(c, name, "mic", ["audio"])
    round_ = c.admin.post(f"/v1/federations/{name}/rounds").json()
    assert sorted(round_["participants"]) == sorted([cam_id, mic_id])

    assert _upload(cam, cam_id, _task(cam, cam_id), ["image"]) == "accepted"
    with pytest.raises(RequestRefused, match="checksum"):
        _upload(mic, mic_id, _task(mic, mic_id), ["audio"], sha256="0" * 64)
    cam.report_metrics(cam_id, round_["id"], {"personal_accuracy": 0.75})
    assert wait_for_round(c.admin, round_["id"])["state"] == "committed"  # quorum 1 at the deadline

    participants = c.admin.get(f"/v1/rounds/{round_['id']}/participants").json()
    by_name = {p["device_name"]: p for p in participants}
    assert set(by_name) == {"cam", "mic"} and all(p["invited"] for p in participants)
    assert by_name["cam"]["update_state"] == "accepted" and by_name["cam"]["accepted_at"] is not None
    assert by_name["cam"]["modalities"] == ["image"] and by_name["cam"]["uploads"] == 1
    assert by_name["cam"]["reported"] == {"personal_accuracy": 0.75}
    assert by_name["mic"]["update_state"] == "rejected" and "checksum" in by_name["mic"]["rejection_reason"]
    assert by_name["mic"]["accepted_at"] is None and by_name["mic"]["reported"] == {}

    refusals = _eventually(lambda: c.admin.get(f"/v1/rounds/{round_['id']}/refusals").json())
    assert [(r["device_id"], r["reason"]) for r in refusals] == [(mic_id, "checksum")]
    assert c.admin.get(f"/v1/rounds/{round_['id']}/refusals", params={"limit": 0}).status_code == 422

    metrics = c.admin.get(f"/v1/rounds/{round_['id']}/metrics").json()
    assert metrics["state"] == "committed" and metrics["number"] == 1
    assert metrics["metrics"]["participants"] == 1 and metrics["metrics"]["invited"] == 2
    assert metrics["version_id"] == c.admin.get(f"/v1/rounds/{round_['id']}").json()["version_id"]
    assert metrics["device_reports"] == {cam_id: {"personal_accuracy": 0.75}}

    for sub in ("participants", "refusals", "metrics"):
        assert c.admin.get(f"/v1/rounds/nope/{sub}").status_code == 404, sub


def test_promoting_an_older_version_rolls_back_and_the_next_round_starts_from_it(c: RunningCoordinator) -> None:
    federation = _federation(c, min_updates=1)
    name, v0 = federation["name"], federation["current_version_id"]
    cam, cam_id = _device(c, name, "cam", ["image"])
    first = c.admin.post(f"/v1/federations/{name}/rounds").json()
    blocked = c.admin.post(f"/v1/federations/{name}/versions/{v0}/promote")
    assert blocked.status_code == 409 and "round 1 is still open" in blocked.json()["detail"]
    assert _upload(cam, cam_id, _task(cam, cam_id), ["image"]) == "accepted"
    v1 = wait_for_round(c.admin, first["id"])["version_id"]
    assert c.admin.get(f"/v1/federations/{name}").json()["current_version_id"] == v1

    rolled_back = c.admin.post(f"/v1/federations/{name}/versions/{v0}/promote")
    assert rolled_back.status_code == 200 and rolled_back.json()["current_version_id"] == v0
    second = c.admin.post(f"/v1/federations/{name}/rounds").json()
    assert second["base_version_id"] == v0
    task = _task(cam, cam_id)
    assert task.version_id == v0
    assert cam.download_global(cam_id).version_id == v0  # what devices download as current

    [entry] = c.admin.get("/v1/audit", params={"action": "versions.promote", "limit": 1}).json()
    assert entry["status"] == 200 and entry["actor_name"] == "harness"
    assert entry["detail"] == f"federation {name}: current version {v1} -> {v0}"


def test_promoting_a_version_of_another_federation_or_an_unknown_one_is_refused(c: RunningCoordinator) -> None:
    mine, other = _federation(c), _federation(c)
    wrong = c.admin.post(f"/v1/federations/{mine['name']}/versions/{other['current_version_id']}/promote")
    assert wrong.status_code == 422 and "belongs to another federation" in wrong.json()["detail"]
    assert c.admin.post(f"/v1/federations/{mine['name']}/versions/nope/promote").status_code == 404
    assert c.admin.get(f"/v1/federations/{mine['name']}").json()["current_version_id"] == mine["current_version_id"]


def test_a_device_can_be_read_and_revoked_and_its_next_call_is_refused(c: RunningCoordinator) -> None:
    federation = _federation(c)
    client, device_id = _device(c, federation["name"], "cam", ["image", "audio"])
    client.heartbeat(device_id)

    device = c.admin.get(f"/v1/devices/{device_id}").json()
    assert device["name"] == "cam" and device["federation_id"] == federation["id"]
    assert device["modalities"] == ["audio", "image"] and device["online"] and not device["revoked"]

    revoked = c.admin.post(f"/v1/devices/{device_id}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    with pytest.raises((CredentialRejected, RequestRefused)):
        client.heartbeat(device_id)
    listed = c.admin.get(f"/v1/federations/{federation['name']}/devices").json()
    assert [d["revoked"] for d in listed] == [True]
    assert c.admin.get("/v1/devices/nope").status_code == 404
    assert c.admin.post("/v1/devices/nope/revoke").status_code == 404


def test_an_enrolment_token_is_shown_once_and_listed_as_used_after_enrolment(c: RunningCoordinator) -> None:
    federation = _federation(c)
    name = federation["name"]
    issued = c.admin.post(f"/v1/federations/{name}/enrolment-tokens",
                          json={"device_name": "door-cam", "expires_in_hours": 2})
    assert issued.status_code == 201, issued.text
    body = issued.json()
    assert body["token"].startswith("mlecs_enrol_") and body["state"] == "unused"
    assert body["created_by"].startswith("token:harness")

    _client, device_id = _device(c, name, "door-cam", ["image"], token=body["token"])
    [listed] = c.admin.get(f"/v1/federations/{name}/enrolment-tokens").json()
    assert "token" not in listed
    assert (listed["id"], listed["state"], listed["used_by_device_id"]) == (body["id"], "used", device_id)
    too_long = c.admin.post(f"/v1/federations/{name}/enrolment-tokens", json={"expires_in_hours": 721})
    assert too_long.status_code == 422


def test_errors_are_problem_json_including_validation_and_unknown_routes(c: RunningCoordinator) -> None:
    for response, status in ((c.admin.get("/v1/federations/nope"), 404),
                             (c.admin.post("/v1/federations", json={"name": "bad name!", "config": {}}), 422),
                             (c.admin.post("/v1/federations", json={"name": "x", "config": {"min_updates": 0}}), 422),
                             (c.admin.post("/v1/federations", content=b"{not json",
                                           headers={"content-type": "application/json"}), 422),
                             (c.admin.get("/v1/no-such-thing"), 404),
                             (c.admin.put("/v1/federations"), 405)):
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/problem+json"), response.request.url
        body = response.json()
        assert body["status"] == status and body["detail"] and body["title"]
    invalid = c.admin.post("/v1/federations", json={"name": "x", "config": {"min_updates": 0}}).json()
    assert invalid["errors"][0]["loc"] == ["body", "config", "min_updates"]
    assert "config.min_updates" in invalid["detail"]


def test_every_operation_documents_its_bodies_with_examples_and_its_errors_as_problem_json(
        c: RunningCoordinator) -> None:
    document = c.admin.get("/openapi.json").json()
    schemas = document["components"]["schemas"]

    def component(schema: dict) -> dict:
        ref = schema.get("$ref") or schema.get("items", {}).get("$ref")
        assert ref, schema
        return dict(schemas[ref.rsplit("/", 1)[1]])

    for path, item in document["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in item.items():
            where = f"{method.upper()} {path}"
            assert operation.get("description") or operation.get("summary"), where
            if "requestBody" in operation:
                assert "examples" in component(operation["requestBody"]["content"]["application/json"]["schema"]), where
            ok = next(v for k, v in operation["responses"].items() if k.startswith("2"))
            if "application/json" in ok.get("content", {}):
                assert "examples" in component(ok["content"]["application/json"]["schema"]), where
            for code in ("401", "403", "422"):
                content = operation["responses"][code]["content"]
                assert list(content) == ["application/problem+json"], (where, code)
    assert "examples" in schemas["Problem"]


def test_devices_are_told_which_data_their_upload_is_learned_on(c: RunningCoordinator) -> None:
    method = _federation(c)
    prototype = _federation(c, upload_stage="public", public_epochs=3, personal_epochs=2)
    tasks = {}
    for federation in (method, prototype):
        client, device_id = _device(c, federation["name"], "cam", ["image"])
        assert c.admin.post(f"/v1/federations/{federation['id']}/rounds").status_code == 201
        tasks[federation["name"]] = _task(client, device_id)

    assert (tasks[method["name"]].upload_stage, tasks[method["name"]].personal_epochs) == ("private", 1)
    assert (tasks[prototype["name"]].upload_stage, tasks[prototype["name"]].public_epochs,
            tasks[prototype["name"]].personal_epochs) == ("public", 3, 2)
    assert c.admin.get(f"/v1/federations/{method['id']}").json()["config"]["upload_stage"] == "private"


@pytest.mark.parametrize(("config", "message"), [
    ({"cloud_model": {"fused_dim": 128}}, "cloud_model.fused_dim (128) must equal the devices' (256)"),
    ({"cloud_model": {"backbone": "huge"}}, "backbone must be one of"),
    ({"upload_stage": "both"}, "upload_stage"),
    ({"upload_stage": "private", "private_epochs": 0}, "private_epochs must be >= 1 with upload_stage 'private'"),
])
def test_a_federation_config_that_cannot_train_is_refused_with_the_reason(
        c: RunningCoordinator, config: dict[str, Any], message: str) -> None:
    response = c.admin.post("/v1/federations", json={"name": f"bad-{uuid.uuid4().hex[:6]}",
                                                      "config": {**TINY, **config}})

    assert response.status_code in (400, 422), response.text
    assert message in response.json()["detail"]


def test_a_cloud_model_deeper_than_the_devices_is_accepted_and_kept(c: RunningCoordinator) -> None:
    federation = _federation(c, model={"backbone": "tiny", "backbone_layers": 1}, cloud_model={"backbone": "tiny"})

    assert federation["config"]["cloud_model"] == {"backbone": "tiny"}
    assert federation["config"]["model"]["backbone_layers"] == 1


def test_a_bug_behind_an_operation_is_a_problem_json_500_with_a_reference_and_no_internals(
        c: RunningCoordinator, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    services = c.coordinator.services
    assert services is not None

    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("secret internal state: postgresql://user:pw@db/mlecs")

    monkeypatch.setattr(services.federations, "list_all", broken)  # fault injection: a bug in one service call
    response = c.admin.get("/v1/federations")

    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert "secret" not in response.text and "[ref " in problem["detail"]
    ref = problem["detail"].split("[ref ")[1].rstrip("]")
    assert any(ref in record.getMessage() and record.exc_info for record in caplog.records)
