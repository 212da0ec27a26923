"""The round gauges the learning dashboard reads: modality coverage and each modality set's weight share."""

from __future__ import annotations

import math

import pytest
from prometheus_client import REGISTRY

from server.domain.federation_config import FederationConfig
from server.domain.models import Update
from server.services.observations import observe_round, weight_shares


def _update(modalities: set[str], samples: int, agreement: float | None = None) -> Update:
    return Update(round_id="r", device_id=f"d-{len(modalities)}-{samples}", upload_id="u", codec="fp16",
                  declared_size=1000, sha256="0" * 64, modalities=frozenset(modalities), public_samples=samples,
                  private_samples=0, anchor_agreement=agreement)


def test_mma_weighs_a_two_modality_update_twice_a_one_modality_update_of_the_same_samples():
    updates = [_update({"image"}, 50), _update({"audio", "image"}, 50)]
    assert weight_shares(FederationConfig(aggregation="mma"), updates, [0, 0]) == pytest.approx(
        {"image": 1 / 3, "audio,image": 2 / 3})
    assert weight_shares(FederationConfig(aggregation="fedavg"), updates, [0, 0]) == pytest.approx(
        {"image": 0.5, "audio,image": 0.5})


def test_agreement_scales_only_within_a_modality_set_so_each_sets_best_update_keeps_its_full_weight():
    config = FederationConfig(aggregation="mma", agreement_temperature=0.1)
    updates = [_update({"image"}, 50, 0.9), _update({"image"}, 50, 0.8), _update({"audio"}, 100, 0.2)]
    shares = weight_shares(config, updates, [0, 0, 0])
    image = 50 + 50 * math.exp((0.8 - 0.9) / 0.1)
    assert shares == pytest.approx({"image": image / (image + 100), "audio": 100 / (image + 100)})


def test_a_round_sets_coverage_and_shares_and_zeroes_modality_sets_it_no_longer_has():
    config = FederationConfig(aggregation="mma")
    observe_round("one", config, [_update({"audio"}, 10), _update({"audio", "image"}, 10)], [0, 0])
    sample = REGISTRY.get_sample_value
    assert sample("mlecs_round_modality_coverage", {"federation": "one", "modality": "audio"}) == 1.0
    assert sample("mlecs_round_modality_coverage", {"federation": "one", "modality": "image"}) == 0.5
    assert sample("mlecs_round_upload_bytes", {"federation": "one"}) == 2000
    observe_round("one", config, [_update({"image"}, 10)], [0])
    assert sample("mlecs_round_aggregation_weight_share", {"federation": "one", "modalities": "image"}) == 1.0
    assert sample("mlecs_round_aggregation_weight_share", {"federation": "one", "modalities": "audio"}) == 0.0
    assert sample("mlecs_round_modality_coverage", {"federation": "one", "modality": "audio"}) == 0.0


def test_two_federations_keep_their_own_round_gauges():
    config = FederationConfig(aggregation="mma")
    observe_round("cameras", config, [_update({"image"}, 10)], [0])
    observe_round("microphones", config, [_update({"audio"}, 10), _update({"audio"}, 20)], [0, 0])
    sample = REGISTRY.get_sample_value
    assert sample("mlecs_round_modality_coverage", {"federation": "cameras", "modality": "image"}) == 1.0
    assert sample("mlecs_round_modality_coverage", {"federation": "cameras", "modality": "audio"}) == 0.0
    assert sample("mlecs_round_modality_coverage", {"federation": "microphones", "modality": "audio"}) == 1.0
    assert sample("mlecs_round_upload_bytes", {"federation": "cameras"}) == 1000
    assert sample("mlecs_round_upload_bytes", {"federation": "microphones"}) == 2000
