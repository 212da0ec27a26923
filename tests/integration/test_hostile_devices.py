"""A hostile enrolled device over the real transport: its influence on the global model and its claims
are bounded, and the federation still commits. (Malformed uploads are in ``test_upload_security``.)"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from mlecs.codec import decode_tensors, encode_tensors
from mlecs.model import tensor_modality
from mlecs.proto.v1 import fleet_pb2 as pb
from server.config import CoordinatorSettings
from tests.integration.coordinator_harness import RunningCoordinator, running_coordinator, wait_for_round
from tests.integration.test_upload_security import Dev, Setup, _enrol, _header, _messages, _open_round

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
