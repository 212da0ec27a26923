"""Robust rounds: clipping, coordinate-wise median / trimmed mean with the rule's weights, outliers left out."""

from __future__ import annotations

import numpy as np
import pytest

from mlecs.aggregation.robust import weighted_median
from mlecs.codec import encode_tensors
from mlecs.tensor_names import FUSED_TENSOR
from server.domain.federation_config import FederationConfig
from server.domain.models import Update
from server.services.aggregation import aggregate, own_weight, update_samples

SHAPES = {"head.weight": (3, 4), "lora.layer0.query.A": (2, 6), "extractors.image.w": (5,)}


def _round(count: int = 10, attackers: int = 2, scale: float = 10.0,
           seed: int = 0) -> tuple[list[Update], dict[str, bytes], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Updates around a common clean delta; the first ``attackers`` send it scaled by ``scale``."""
    rng = np.random.default_rng(seed)
    clean = {n: rng.normal(0, 1, s).astype(np.float32) for n, s in SHAPES.items()}
    updates, blobs = [], {}
    for k in range(count):
        delta = {n: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for n, v in clean.items()}
        if k < attackers:
            delta = {n: (v * scale).astype(np.float32) for n, v in delta.items()}
        delta[FUSED_TENSOR] = rng.normal(0, 1, (2, 3)).astype(np.float32)
        update = Update(round_id="r", device_id=f"d{k}", upload_id=f"u{k:08d}", codec="fp32", declared_size=1,
                        sha256="0" * 64, modalities=frozenset({"image", "audio"}), public_samples=20 + k,
                        private_samples=0, fused_sample_ids=[k, k + 1])
        updates.append(update)
        blobs[update.id] = encode_tensors(delta, "fp32")
    base = {n: np.zeros(s, dtype=np.float32) for n, s in SHAPES.items()}
    return updates, blobs, clean, base


def _run(config: FederationConfig, updates, blobs, base, tmp_path):
    return aggregate(config, base, updates, [0] * len(updates), lambda u: blobs[u.id], spill_dir=tmp_path,
                     block_bytes=64)


def _distance(result: dict[str, np.ndarray], clean: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((result[n] - clean[n]) ** 2) for n in clean)))


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_a_robust_rule_stays_near_the_clean_update_where_the_mean_does_not(rule: str, tmp_path) -> None:
    updates, blobs, clean, base = _round()
    plain = _run(FederationConfig(server_learning=False), updates, blobs, base, tmp_path)
    robust = _run(FederationConfig(server_learning=False, robust_rule=rule, trim_fraction=0.2),
                  updates, blobs, base, tmp_path)
    assert _distance(plain.tensors, clean) > 5 * _distance(robust.tensors, clean)
    assert _distance(robust.tensors, clean) < 0.2
    assert list(tmp_path.iterdir()) == []  # the spilled updates are gone after the commit


def test_the_median_is_weighted_by_the_rules_weights(tmp_path) -> None:
    updates, blobs, _clean, base = _round(count=5, attackers=0)
    config = FederationConfig(server_learning=False, robust_rule="median")
    result = _run(config, updates, blobs, base, tmp_path)
    from mlecs.codec import decode_tensors

    weights = np.array([own_weight(config, u, 0)[0] for u in updates])
    stack = np.stack([decode_tensors(blobs[u.id])["head.weight"].ravel() for u in updates])
    expected = weighted_median(stack, weights).reshape(SHAPES["head.weight"]).astype(np.float32)
    np.testing.assert_allclose(result.tensors["head.weight"], expected, rtol=1e-6)


def test_outliers_above_the_threshold_are_left_out_with_their_fused_features(tmp_path) -> None:
    updates, blobs, clean, base = _round(count=10, attackers=2)
    config = FederationConfig(server_learning=False, robust_rule="trimmed_mean", trim_fraction=0.1, exclude_above=3)
    result = _run(config, updates, blobs, base, tmp_path)
    assert result.excluded_devices == ["d0", "d1"]
    assert min(result.anomaly_scores[d] for d in ("d0", "d1")) > 3 > max(
        score for device, score in result.anomaly_scores.items() if device not in ("d0", "d1"))
    assert len(result.fused) == 8
    assert _distance(result.tensors, clean) < 0.2  # the clean noise alone puts ~0.1 between them


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_sign_flipped_updates_are_left_out_by_their_cosine_with_their_fused_features(rule: str, tmp_path) -> None:
    updates, blobs, clean, base = _round(count=10, attackers=2, scale=-1.0)
    config = FederationConfig(server_learning=False, robust_rule=rule, trim_fraction=0.1, exclude_cosine_below=0.0)
    result = _run(config, updates, blobs, base, tmp_path)
    assert result.excluded_devices == ["d0", "d1"]
    assert max(result.centre_cosines[d] for d in ("d0", "d1")) < -0.9
    assert min(cosine for device, cosine in result.centre_cosines.items() if device not in ("d0", "d1")) > 0.9
    assert len(result.fused) == 8
    assert _distance(result.tensors, clean) < 0.2


def test_cosines_are_recorded_without_excluding_anyone_when_the_check_is_off(tmp_path) -> None:
    updates, blobs, _clean, base = _round(count=10, attackers=2, scale=-1.0)
    result = _run(FederationConfig(server_learning=False, robust_rule="median"), updates, blobs, base, tmp_path)
    assert result.excluded_devices == [] and len(result.fused) == 10
    assert sorted(result.centre_cosines) == sorted(u.device_id for u in updates)
    assert min(result.centre_cosines.values()) < -0.9


def test_clipping_bounds_every_update_before_the_mean(tmp_path) -> None:
    updates, blobs, _clean, base = _round(count=4, attackers=1, scale=100.0)
    clipped = _run(FederationConfig(server_learning=False, clip_norm=1.0), updates, blobs, base, tmp_path)
    norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in clipped.tensors.values())))
    assert norm <= 1.0 + 1e-5  # a weighted mean of vectors of norm <= 1 has norm <= 1
    plain = _run(FederationConfig(server_learning=False), updates, blobs, base, tmp_path)
    assert float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in plain.tensors.values()))) > 10


@pytest.mark.parametrize(("fields", "problem"), [
    ({"robust_rule": "mode"}, "robust_rule must be"),
    ({"trim_fraction": 0.5}, "trim_fraction"),
    ({"clip_norm": -1.0}, "clip_norm"),
    ({"exclude_above": 0.5, "robust_rule": "median"}, "exclude_above must be 0"),
    ({"exclude_above": 3.0}, "exclude_above needs a robust_rule"),
    ({"robust_rule": "median", "lora_mode": "exact"}, "lora_mode 'separate'"),
    ({"exclude_cosine_below": 1.0, "robust_rule": "median"}, r"exclude_cosine_below must be null \(off\) or a cosine"),
    ({"exclude_cosine_below": -1.5, "robust_rule": "median"}, r"in \[-1, 1\), not -1\.5"),
    ({"exclude_cosine_below": float("nan"), "robust_rule": "median"}, "exclude_cosine_below must be null"),
    ({"exclude_cosine_below": True, "robust_rule": "median"}, "exclude_cosine_below must be null"),
    ({"exclude_cosine_below": 0.0}, "exclude_cosine_below needs a robust_rule"),
])
def test_robust_settings_that_cannot_work_are_refused_with_the_reason(fields, problem) -> None:
    with pytest.raises(ValueError, match=problem):
        FederationConfig(**fields)


@pytest.mark.parametrize(("stage", "samples"), [("private", 20 + 200), ("public", 20)])
def test_an_update_weighs_by_the_samples_its_change_was_learned_on(stage: str, samples: int) -> None:
    update = Update(round_id="r", device_id="d", upload_id="u0000000", codec="fp32", declared_size=1,
                    sha256="0" * 64, modalities=frozenset({"image", "audio"}), public_samples=20,
                    private_samples=200, fused_sample_ids=[])
    config = FederationConfig(server_learning=False, upload_stage=stage)  # type: ignore[arg-type]

    assert update_samples(config, update) == samples
    assert own_weight(config, update, 0)[0] == 2 * samples  # MMA: modality count x samples
    assert own_weight(FederationConfig(server_learning=False, upload_stage=stage,  # type: ignore[arg-type]
                                       aggregation="fedavg"), update, 0)[0] == samples
