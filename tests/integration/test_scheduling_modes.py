"""Scheduling over real gRPC on loopback: eligibility, over-selection, quorum, deadlines and async buffers.

Tests 1-2 run on both backends (the ``coordinator`` fixture); tests 3-5 start their own embedded coordinator
with a fast scheduler (and a short presence TTL where expiry matters).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.client import CoordinatorClient
from edge_agent.errors import CoordinatorUnavailable, RequestRefused
from edge_agent.tasks import Stop, TrainTask, Wait
from mlecs.codec import encode_tensors
from server.config import CoordinatorSettings
from tests.integration.coordinator_harness import RunningCoordinator, running_coordinator, wait_for_round
from tests.integration.test_grpc_loopback import (  # noqa: F401  (backend, coordinator: fixtures)
    _delta_for,
    _device,
    _federation,
    _request,
    backend,
    coordinator,
)

FAST = {"server_learning": False, "fused_upload_samples": 0}
"""Commits aggregate only: no evaluation, cloud tuning or anchors."""
CHUNK = 64 * 1024
AV = ["audio", "image"]


def _payload(client: CoordinatorClient, device_id: str, version_id: str, modalities: list[str]) -> bytes:
    """Downloads ``version_id`` and returns an fp16 delta over the device's modalities for it."""
    version = client.download_global(device_id, version_id)
    assert version.version_id == version_id
    return encode_tensors(_delta_for(version.adapter, set(modalities)), "fp16")


def _train(client: CoordinatorClient, device_id: str, modalities: list[str]) -> tuple[TrainTask, bytes]:
    task = client.get_task(device_id)
    assert isinstance(task, TrainTask), task
    return task, _payload(client, device_id, task.version_id, modalities)


def _upload(client: CoordinatorClient, device_id: str, task: TrainTask, payload: bytes,
            modalities: list[str]) -> str:
    state, offset = client.upload(_request(task, device_id, payload, modalities), payload, 0, CHUNK)
    assert (state, offset) == ("accepted", len(payload))
    return state


def _rounds(c: RunningCoordinator, federation_id: str) -> list[dict]:
    response = c.admin.get(f"/v1/federations/{federation_id}/rounds")
    assert response.status_code == 200, response.text
    return sorted(response.json(), key=lambda r: r["number"])


def _await(what: str, probe: Callable[[], dict | None], timeout_s: float = 20,
           tick: Callable[[], None] = lambda: None) -> dict:
    """Polls ``probe`` (calling ``tick`` between polls, e.g. heartbeats) until it returns a value."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s} s")
        tick()
        time.sleep(0.05)


def _await_round(c: RunningCoordinator, federation_id: str, number: int, states: tuple[str, ...] = ("open",),
                 timeout_s: float = 20, tick: Callable[[], None] = lambda: None) -> dict:
    def probe() -> dict | None:
        return next((r for r in _rounds(c, federation_id) if r["number"] == number and r["state"] in states), None)
    return _await(f"round {number} in state {states}", probe, timeout_s, tick)


def _metric(c: RunningCoordinator, sample: str) -> float:
    """Value of one Prometheus sample (name with labels) in the coordinator's /metrics text."""
    text = c.admin.get("/metrics").text
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{sample} missing from /metrics"
    return float(match.group(1))


def _store(c: RunningCoordinator):  # type: ignore[no-untyped-def]
    assert c.coordinator.services is not None
    return c.coordinator.services.ctx.store


# ---- 1. eligibility -------------------------------------------------------------------------------------


def test_only_devices_with_an_eligible_modality_set_are_invited(coordinator):  # noqa: F811
    federation = _federation(coordinator, eligible_modality_sets=[AV], **FAST)
    av, av_id = _device(coordinator, federation["name"], "av-1", AV)
    cam, cam_id = _device(coordinator, federation["name"], "cam-1", ["image"])
    mic, mic_id = _device(coordinator, federation["name"], "mic-1", ["audio"])

    started = coordinator.admin.post(f"/v1/federations/{federation['id']}/rounds")
    assert started.status_code == 201, started.text
    round_ = started.json()
    assert round_["participants"] == [av_id]
    assert round_["target_updates"] == 1

    for client, device_id in ((cam, cam_id), (mic, mic_id)):
        task = client.get_task(device_id)
        assert isinstance(task, Wait), task
        assert "not a participant" in task.reason
    task = av.get_task(av_id)
    assert isinstance(task, TrainTask) and task.round_id == round_["id"]

    # The ineligible device cannot feed the round by naming it either.
    payload = _payload(cam, cam_id, task.version_id, ["image"])
    with pytest.raises(RequestRefused, match=r"PERMISSION_DENIED.*not invited"):
        cam.upload(_request(task, cam_id, payload, ["image"]), payload, 0, CHUNK)


# ---- 2. over-selection and stragglers --------------------------------------------------------------------


def test_over_selected_round_commits_at_its_target_and_refuses_the_stragglers(coordinator):  # noqa: F811
    federation = _federation(coordinator, clients_per_round=3, overselect=0.5, min_updates=2, **FAST)
    modality_sets = [["image"], ["image"], ["audio"], ["audio"], AV, AV]
    devices: dict[str, tuple[CoordinatorClient, list[str]]] = {}
    for i, mods in enumerate(modality_sets):
        client, device_id = _device(coordinator, federation["name"], f"dev-{i}", mods)
        devices[device_id] = (client, mods)

    started = coordinator.admin.post(f"/v1/federations/{federation['id']}/rounds")
    assert started.status_code == 201, started.text
    round_ = started.json()
    assert len(round_["participants"]) == 5  # ceil(3 x 1.5)
    assert set(round_["participants"]) <= set(devices)
    assert round_["target_updates"] == 3

    invited = round_["participants"]
    trained = {}
    for device_id in invited[:4]:  # four train; the fifth never shows up
        client, mods = devices[device_id]
        task, payload = _train(client, device_id, mods)
        assert task.round_id == round_["id"]
        trained[device_id] = (task, payload)

    for device_id in invited[:3]:
        client, mods = devices[device_id]
        _upload(client, device_id, *trained[device_id], mods)
    committed = wait_for_round(coordinator.admin, round_["id"], timeout_s=30)
    assert committed["state"] == "committed", committed
    assert committed["metrics"]["participants"] == 3
    assert committed["metrics"]["stragglers"] == 2
    assert committed["metrics"]["invited"] == 5

    straggler = invited[3]
    client, mods = devices[straggler]
    task, payload = trained[straggler]
    late = _request(task, straggler, payload, mods)
    with pytest.raises(RequestRefused) as refused:
        client.upload(late, payload, 0, CHUNK)
    assert "FAILED_PRECONDITION" in str(refused.value) and "too late" in str(refused.value), str(refused.value)
    state, offset = client.upload_status(straggler, task.round_id, late.upload_id)
    assert state == "rejected" or (state, offset) == ("partial", 0), (state, offset)  # rejected, or never stored
    assert _store(coordinator).find_update_by_upload(straggler, late.upload_id) is None or state == "rejected"

    versions = coordinator.admin.get(f"/v1/federations/{federation['id']}/versions").json()
    assert [v["round_number"] for v in versions] == [0, 1]
    assert _metric(coordinator, 'mlecs_update_rejections_total{reason="late"}') >= 1


# ---- 3. quorum with the missing devices offline ----------------------------------------------------------


def test_round_commits_at_quorum_once_the_missing_devices_go_offline(tmp_path: Path):
    settings = CoordinatorSettings(state_dir=tmp_path, presence_ttl_s=1.0, scheduler_interval_s=0.2)
    with running_coordinator(settings) as c:
        federation = _federation(c, min_updates=1, **FAST)
        alive, alive_id = _device(c, federation["name"], "alive", ["image"])
        quiet, quiet_id = _device(c, federation["name"], "quiet", ["audio"])
        alive.heartbeat(alive_id)
        quiet.heartbeat(quiet_id)
        started = c.admin.post(f"/v1/federations/{federation['id']}/rounds")
        assert started.status_code == 201, started.text
        round_ = started.json()
        assert sorted(round_["participants"]) == sorted([alive_id, quiet_id])
        assert round_["target_updates"] == 2

        task, payload = _train(alive, alive_id, ["image"])
        quiet.heartbeat(quiet_id)  # last sign of life: offline 1 s from now
        beat = time.monotonic()
        _upload(alive, alive_id, task, payload, ["image"])
        state = c.admin.get(f"/v1/rounds/{round_['id']}").json()["state"]
        if time.monotonic() - beat < 0.5:  # the quiet device is surely still live: quorum alone must not close
            assert state in ("open", "collecting"), state

        committed = wait_for_round(c.admin, round_["id"], timeout_s=15)
        assert committed["state"] == "committed", committed
        assert committed["metrics"]["participants"] == 1
        assert committed["metrics"]["stragglers"] == 1
        assert committed["metrics"]["wall_s"] < 15  # the quorum rule, not the 600 s deadline
        assert isinstance(alive.get_task(alive_id), Wait)


# ---- 4. deadline without quorum, and automatic rounds up to target_rounds --------------------------------


def test_a_round_without_quorum_fails_at_its_deadline_and_the_scheduler_opens_the_next(tmp_path: Path):
    settings = CoordinatorSettings(state_dir=tmp_path, presence_ttl_s=60.0, scheduler_interval_s=0.2)
    with running_coordinator(settings) as c:
        federation = _federation(c, min_updates=2, round_deadline_s=1.5, target_rounds=2, **FAST)
        fid = federation["id"]
        a, a_id = _device(c, federation["name"], "a", ["image"])
        b, b_id = _device(c, federation["name"], "b", AV)

        def beat() -> None:
            a.heartbeat(a_id)
            b.heartbeat(b_id)

        first = _await_round(c, fid, 1, ("open",), tick=beat)
        assert sorted(first["participants"]) == sorted([a_id, b_id])
        task, payload = _train(a, a_id, ["image"])
        assert task.round_id == first["id"]
        _upload(a, a_id, task, payload, ["image"])

        failed = _await_round(c, fid, 1, ("failed", "committed"), tick=beat)
        assert failed["state"] == "failed", failed
        assert "deadline passed with 1 of 2" in (failed["failure_reason"] or ""), failed["failure_reason"]
        assert failed["version_id"] is None

        # target_rounds counts committed rounds: after the failure, two more rounds are needed to reach it.
        for number in (2, 3):
            opened = _await_round(c, fid, number, ("open", "collecting"), tick=beat)
            assert sorted(opened["participants"]) == sorted([a_id, b_id]), opened
            for client, device_id, mods in ((a, a_id, ["image"]), (b, b_id, AV)):
                task, payload = _train(client, device_id, mods)
                assert task.round_id == opened["id"] and task.round_number == number
                _upload(client, device_id, task, payload, mods)
            done = wait_for_round(c.admin, opened["id"], timeout_s=15)
            assert done["state"] == "committed", done
            assert done["metrics"]["participants"] == 2

        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            beat()
            time.sleep(0.2)
        assert [(r["number"], r["state"]) for r in _rounds(c, fid)] == [
            (1, "failed"), (2, "committed"), (3, "committed")]
        versions = c.admin.get(f"/v1/federations/{fid}/versions").json()
        assert [v["round_number"] for v in versions] == [0, 2, 3]

        # Its target reached, the federation is completed: devices are told to stop, and it stays so.
        assert c.admin.get(f"/v1/federations/{fid}").json()["state"] == "completed"
        told = a.get_task(a_id)
        assert isinstance(told, Stop) and told.reason.endswith("completed its 2 rounds"), told
        resumed = c.admin.post(f"/v1/federations/{fid}/resume")
        assert resumed.status_code == 409 and "completed for good" in resumed.text, resumed.text
        assert c.admin.post(f"/v1/federations/{fid}/rounds").status_code == 409
        assert c.admin.post(f"/v1/federations/{fid}/stop").json()["state"] == "completed"


# ---- 5. async buffers and the staleness bound ------------------------------------------------------------


def test_async_buffers_take_updates_up_to_max_staleness_and_refuse_older_ones(tmp_path: Path):
    settings = CoordinatorSettings(state_dir=tmp_path, presence_ttl_s=60.0, scheduler_interval_s=0.2)
    with running_coordinator(settings) as c:
        federation = _federation(c, mode="async", async_buffer=1, max_staleness=1, target_rounds=0,
                                 min_updates=1, **FAST)
        fid = federation["id"]
        v0 = federation["current_version_id"]
        a, a_id = _device(c, federation["name"], "a", ["image"])
        b, b_id = _device(c, federation["name"], "b", ["audio"])
        d, d_id = _device(c, federation["name"], "d", AV)

        def beat() -> None:
            for client, device_id in ((a, a_id), (b, b_id), (d, d_id)):
                client.heartbeat(device_id)

        round1 = _await_round(c, fid, 1, ("open",), tick=beat)
        assert round1["base_version_id"] == v0 and round1["target_updates"] == 1
        trained = {}
        for client, device_id, mods in ((a, a_id, ["image"]), (b, b_id, ["audio"]), (d, d_id, AV)):
            task, payload = _train(client, device_id, mods)
            assert task.round_id == round1["id"] and task.version_id == v0
            trained[device_id] = (task, payload)

        # A's fresh update fills buffer 1: version 1, and buffer 2 opens from it.
        _upload(a, a_id, *trained[a_id], ["image"])
        committed1 = wait_for_round(c.admin, round1["id"], timeout_s=15)
        assert committed1["state"] == "committed", committed1
        assert committed1["metrics"]["staleness_max"] == 0
        v1 = committed1["version_id"]
        round2 = _await_round(c, fid, 2, ("open",), tick=beat)
        assert round2["base_version_id"] == v1

        # B's update, trained from version 0 for round 1, is one version stale: buffer 2 takes it.
        task_b, payload_b = trained[b_id]
        stale_ok = _request(task_b, b_id, payload_b, ["audio"])
        assert b.upload(stale_ok, payload_b, 0, CHUNK) == ("accepted", len(payload_b))
        row = _store(c).find_update_by_upload(b_id, stale_ok.upload_id)
        assert row is not None and row.round_id == round2["id"] != task_b.round_id
        committed2 = wait_for_round(c.admin, round2["id"], timeout_s=15)
        assert committed2["state"] == "committed", committed2
        assert committed2["metrics"]["staleness_max"] == 1
        assert committed2["metrics"]["participants"] == 1
        v2 = committed2["version_id"]

        # A moves on to buffer 3, built from version 2.
        round3 = _await_round(c, fid, 3, ("open",), tick=beat)
        assert round3["base_version_id"] == v2
        task_a3 = a.get_task(a_id)
        assert isinstance(task_a3, TrainTask) and task_a3.round_id == round3["id"] and task_a3.version_id == v2
        version = a.download_global(a_id, v2)
        assert version.round_number == 2

        # D's update, also from version 0, is now two versions stale: refused.
        task_d, payload_d = trained[d_id]
        too_old = _request(task_d, d_id, payload_d, AV)
        with pytest.raises(RequestRefused) as refused:
            d.upload(too_old, payload_d, 0, CHUNK)
        assert "too_stale" in str(refused.value), str(refused.value)
        assert "2 versions old" in str(refused.value), str(refused.value)
        state, offset = d.upload_status(d_id, task_d.round_id, too_old.upload_id)
        assert state == "rejected" or (state, offset) == ("partial", 0), (state, offset)
        assert c.admin.get(f"/v1/rounds/{round3['id']}").json()["state"] == "open"
        assert _metric(c, 'mlecs_update_rejections_total{reason="too_stale"}') >= 1

        # A's fresh update for buffer 3 still commits it, without staleness.
        payload_a3 = encode_tensors(_delta_for(version.adapter, {"image"}), "fp16")
        _upload(a, a_id, task_a3, payload_a3, ["image"])
        committed3 = wait_for_round(c.admin, round3["id"], timeout_s=15)
        assert committed3["state"] == "committed" and committed3["metrics"]["staleness_max"] == 0, committed3

        _await_round(c, fid, 4, ("open",), tick=beat)
        stopped = c.admin.post(f"/v1/federations/{fid}/stop")
        assert stopped.status_code == 200, stopped.text
        assert isinstance(a.get_task(a_id), Stop)
        fourth = _await_round(c, fid, 4, ("failed",))
        assert fourth["failure_reason"] == "federation stopped"
        time.sleep(0.6)  # a few scheduler ticks: no buffer opens after the stop
        assert [r["number"] for r in _rounds(c, fid)] == [1, 2, 3, 4]


# ---- 6. embedded store under a busy scheduler ------------------------------------------------------------


def test_embedded_uploads_are_not_refused_as_unavailable_while_the_scheduler_writes(tmp_path: Path):
    """SQLite's busy_timeout should make concurrent writers wait, not fail. A deferred transaction that
    reads and then writes (accept_update, acquire_lease) gets SQLITE_BUSY_SNAPSHOT at once in WAL mode
    when another connection committed in between; busy_timeout does not cover that case."""
    # The device polls in a tight loop to keep the writers busy: far past the per-device rate limit, which
    # is not what this test is about.
    settings = CoordinatorSettings(state_dir=tmp_path, presence_ttl_s=60.0, scheduler_interval_s=0.005,
                                   device_rate_per_s=0)
    with running_coordinator(settings) as c:
        federation = _federation(c, mode="async", async_buffer=1, min_updates=1, **FAST)
        client, device_id = _device(c, federation["name"], "busy", ["image"])
        payload = b""
        attempts, failures = 0, []
        deadline = time.monotonic() + 60
        while attempts < 150 and time.monotonic() < deadline:
            task = client.get_task(device_id)
            if not isinstance(task, TrainTask):
                time.sleep(0.01)
                continue
            payload = payload or _payload(client, device_id, task.version_id, ["image"])
            attempts += 1
            try:
                client.upload(_request(task, device_id, payload, ["image"]), payload, 0, CHUNK)
            except CoordinatorUnavailable as exc:
                failures.append(str(exc))
        c.admin.post(f"/v1/federations/{federation['id']}/stop")
        assert attempts == 150
        assert not failures, f"{len(failures)} of {attempts} uploads failed: {failures[0]}"
