"""A federation with a robust rule, over real gRPC on both backends: an attacker's update is scored,
left out, and the committed version is what the honest devices sent."""

from __future__ import annotations

import numpy as np

from mlecs.codec import decode_tensors, encode_tensors
from tests.integration.coordinator_harness import wait_for_round
from tests.integration.test_grpc_loopback import (  # noqa: F401  (backend, coordinator: fixtures)
    _delta_for,
    _device,
    _federation,
    _request,
    backend,
    coordinator,
)
from tests.integration.test_scheduling_modes import AV, CHUNK, FAST, _train


def _attacked_round(running, federation: dict, attack) -> dict:
    """Five devices train a round of ``federation``; the first uploads ``attack(delta)`` instead of its own.
    Checks the round committed base + the honest delta (as fp16 carried it), not the attack; returns the
    round."""
    devices = [_device(running, federation["name"], f"dev-{i}", AV) for i in range(5)]
    started = running.admin.post(f"/v1/federations/{federation['id']}/rounds")
    assert started.status_code == 201, started.text
    round_id = started.json()["id"]

    honest_delta = None
    for index, (client, device_id) in enumerate(devices):
        task, _ = _train(client, device_id, AV)
        adapter = client.download_global(device_id, task.version_id).adapter
        base, delta = decode_tensors(adapter), _delta_for(adapter, set(AV))
        honest_delta = delta
        if index == 0:
            delta = attack(delta)
        payload = encode_tensors(delta, "fp16")
        state, _ = client.upload(_request(task, device_id, payload, AV), payload, 0, CHUNK)
        assert state == "accepted"

    body = wait_for_round(running.admin, round_id)
    assert body["state"] == "committed", body
    client, device_id = devices[1]
    committed = decode_tensors(client.download_global(device_id, body["version_id"]).adapter)
    assert honest_delta is not None
    for name, value in honest_delta.items():
        expected = base[name] + value.astype(np.float16).astype(np.float32)
        np.testing.assert_allclose(committed[name], expected, rtol=1e-5, atol=1e-6)
    return body


def test_a_scaled_update_is_left_out_and_the_median_of_the_honest_ones_commits(coordinator):  # noqa: F811
    federation = _federation(coordinator, robust_rule="median", exclude_above=3.0, min_updates=5, **FAST)
    # the attacker: the same direction, ten times as long
    body = _attacked_round(coordinator, federation, lambda delta: {n: v * 10 for n, v in delta.items()})
    assert body["metrics"]["robust_excluded"] == 1.0
    assert body["metrics"]["anomaly_score_max"] > 3


def test_a_sign_flipped_update_is_left_out_by_its_direction_and_the_honest_median_commits(coordinator):  # noqa: F811
    for config, named in (({"exclude_cosine_below": 0.0}, "needs a robust_rule"),
                          ({"robust_rule": "median", "exclude_cosine_below": 1.0}, "exclude_cosine_below")):
        refused = coordinator.admin.post("/v1/federations", json={"name": "bad-cosine", "config": config})
        assert refused.status_code == 422 and named in refused.json()["detail"], refused.text
    federation = _federation(coordinator, robust_rule="median", exclude_cosine_below=0.0, min_updates=5, **FAST)
    stored = coordinator.admin.get(f"/v1/federations/{federation['id']}").json()
    assert stored["config"]["exclude_cosine_below"] == 0.0  # 0 is a threshold here, not "off"
    # the attacker: an honest norm, the opposite direction
    body = _attacked_round(coordinator, federation, lambda delta: {n: -v for n, v in delta.items()})
    assert body["metrics"]["robust_excluded"] == 1.0
    assert body["metrics"]["centre_cosine_min"] < -0.999  # the flipped update is the honest one reversed
