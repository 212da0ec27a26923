"""The streamed, pre-aggregated round sums equal the reference rules of mlecs.aggregation exactly."""

from __future__ import annotations

import numpy as np
import pytest

from mlecs.aggregation import ClientUpdate, fedavg_weights, mma_weights, weighted_average_per_tensor
from mlecs.aggregation.claims import capped_sample_counts
from mlecs.aggregation.lora_exact import average_lora_products
from mlecs.aggregation.quality import agreement_weights
from mlecs.codec import encode_tensors
from server.domain.federation_config import FederationConfig
from server.domain.models import Update
from server.domain.scheduling import staleness_weight
from server.learning.global_model import apply_delta
from server.services.aggregation import RoundAccumulator, aggregate, capped_samples, version_staleness

SHAPES = {"lora.layer0.query.A": (2, 6), "lora.layer0.query.B": (5, 2), "head.weight": (3, 4),
          "extractors.image.w": (4,), "extractors.audio.w": (4,)}
GROUPS = [frozenset({"image", "audio"}), frozenset({"image"}), frozenset({"audio"})]


def _fleet(seed: int, count: int = 7) -> tuple[list[Update], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    updates, tensors = [], []
    for k in range(count):
        modalities = GROUPS[k % 3]
        names = [n for n in SHAPES if not n.startswith("extractors.") or n.split(".")[1] in modalities]
        tensors.append({n: rng.normal(0, 0.1, SHAPES[n]).astype(np.float32) for n in names})
        agreement = None if k % 4 == 3 else float(rng.uniform(-0.5, 1.0))
        updates.append(Update(round_id="r", device_id=f"d{k}", upload_id=f"u{k:08d}", codec="fp32",
                              declared_size=1, sha256="0" * 64, modalities=modalities,
                              public_samples=int(rng.integers(1, 50)), private_samples=0,
                              anchor_agreement=agreement))
    return updates, tensors


def _reference(config: FederationConfig, base, updates, tensors, staleness) -> dict[str, np.ndarray]:
    metas = [ClientUpdate(u.device_id, t, max(u.public_samples, 1), frozenset(u.modalities))
             for u, t in zip(updates, tensors, strict=True)]
    agreements = [u.anchor_agreement for u in updates]
    if config.aggregation == "mma":
        quality = agreement_weights(agreements, config.agreement_temperature,
                                    groups=[frozenset(u.modalities) for u in updates])
        weights = mma_weights(metas, quality=quality)
    else:
        weights = fedavg_weights(metas)
    weights = [w * staleness_weight(s, config.staleness_exponent) for w, s in zip(weights, staleness, strict=True)]
    out = apply_delta(base, weighted_average_per_tensor(metas, weights))
    if config.lora_mode == "exact":
        full = [ClientUpdate(m.client_id, {n: base[n] + t for n, t in m.tensors.items()}, m.num_samples, m.modalities)
                for m in metas]
        out.update(average_lora_products(full, weights))
    return out


@pytest.fixture
def base() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(99)
    return {n: rng.normal(0, 1, s).astype(np.float32) for n, s in SHAPES.items()}


@pytest.mark.parametrize("aggregation", ["mma", "fedavg"])
@pytest.mark.parametrize("lora_mode", ["separate", "exact"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_accumulator_matches_the_reference_rule(base, aggregation, lora_mode, seed):
    config = FederationConfig(aggregation=aggregation, lora_mode=lora_mode, agreement_temperature=0.2)
    updates, tensors = _fleet(seed)
    staleness = [k % 3 for k in range(len(updates))]
    accumulator = RoundAccumulator(config, base)
    for u, t, s in zip(updates, tensors, staleness, strict=True):
        accumulator.add(u, t, s)
    got = accumulator.result(base).tensors
    want = _reference(config, base, updates, tensors, staleness)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_noise_factors_are_those_of_agreement_weights(base):
    config = FederationConfig(agreement_temperature=0.1)
    updates, tensors = _fleet(5)
    accumulator = RoundAccumulator(config, base)
    for u, t in zip(updates, tensors, strict=True):
        accumulator.add(u, t, 0)
    expected = agreement_weights([u.anchor_agreement for u in updates], 0.1,
                                 groups=[frozenset(u.modalities) for u in updates])
    assert sorted(accumulator.result(base).quality) == pytest.approx(sorted(expected))


def test_an_update_added_twice_counts_once(base):
    config = FederationConfig()
    updates, tensors = _fleet(3, count=3)
    once, twice = RoundAccumulator(config, base), RoundAccumulator(config, base)
    for u, t in zip(updates, tensors, strict=True):
        once.add(u, t, 0)
        twice.add(u, t, 0)
        twice.add(u, t, 0)
    for name, value in once.result(base).tensors.items():
        np.testing.assert_array_equal(twice.result(base).tensors[name], value)


def test_commit_adds_from_blobs_the_updates_the_accumulator_did_not_see(base):
    config = FederationConfig(lora_mode="exact")
    updates, tensors = _fleet(4)
    blobs = {u.id: encode_tensors(t, "fp32") for u, t in zip(updates, tensors, strict=True)}
    partial = RoundAccumulator(config, base)
    for u, t in list(zip(updates, tensors, strict=True))[:3]:  # this replica accepted only some of them
        partial.add(u, t, 0)
    staleness = [0] * len(updates)
    mixed = aggregate(config, base, updates, staleness, lambda u: blobs[u.id], accumulator=partial).tensors
    cold = aggregate(config, base, updates, staleness, lambda u: blobs[u.id]).tensors
    want = _reference(config, base, updates, tensors, staleness)
    for name in want:
        np.testing.assert_allclose(mixed[name], want[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cold[name], want[name], rtol=1e-5, atol=1e-6)


def test_an_accumulator_holding_an_update_outside_the_round_is_not_trusted(base):
    config = FederationConfig()
    updates, tensors = _fleet(6, count=4)
    blobs = {u.id: encode_tensors(t, "fp32") for u, t in zip(updates, tensors, strict=True)}
    stray = RoundAccumulator(config, base)
    for u, t in zip(updates, tensors, strict=True):
        stray.add(u, t, 0)
    kept = updates[:3]  # the round's accepted list does not contain the fourth
    got = aggregate(config, base, kept, [0] * 3, lambda u: blobs[u.id], accumulator=stray).tensors
    want = _reference(config, base, kept, tensors[:3], [0] * 3)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_version_staleness_counts_versions_since_the_update_base():
    versions = ["v0", "v1", "v2", "v3"]
    assert version_staleness(versions, "v3", "v1") == 2
    assert version_staleness(versions, "v3", "v3") == 0
    assert version_staleness(versions, "v2", "v3") == 0  # never negative
    assert version_staleness(versions, None, "v0") == 3  # no round base: the newest version


def _claiming(public: int, private: int = 0) -> Update:
    return Update(round_id="r", device_id=f"d{public}-{private}", upload_id="u" * 8, codec="fp32",
                  declared_size=1, sha256="0" * 64, modalities=frozenset({"image"}), public_samples=public,
                  private_samples=private)


@pytest.mark.parametrize(("counts", "ratio", "capped"), [
    ([2**31 - 1, 100], 4.0, {0: 400}),            # two updates: the lower median is the honest one
    ([100, 120, 90, 10_000], 4.0, {3: 400}),       # lower median 100
    ([100, 390, 90], 4.0, {}),                     # within 4 x the median: as claimed
    ([2**31 - 1, 2**31 - 1, 5], 2.0, {}),           # a majority sets the median: no bound against it
    ([50, 1, 1], 1.5, {0: 1}),
    ([2**31 - 1, 100], 0.0, {}),                   # 0: off
    ([2**31 - 1], 4.0, {}),                        # one update has no peers to compare with
])
def test_claimed_sample_counts_are_capped_at_the_ratio_times_the_lower_median(
        counts: list[int], ratio: float, capped: dict[int, int]) -> None:
    config = FederationConfig(max_weight_ratio=ratio, upload_stage="public")
    updates = [_claiming(n) for n in counts]

    caps = capped_samples(config, updates)

    assert caps == {updates[i].id: value for i, value in capped.items()}


def test_the_cap_counts_private_samples_when_the_upload_is_learned_on_them() -> None:
    updates = [_claiming(10, 90), _claiming(10, 10_000)]

    assert capped_samples(FederationConfig(max_weight_ratio=2.0), updates) == {updates[1].id: 200}
    assert capped_samples(FederationConfig(max_weight_ratio=2.0, upload_stage="public"), updates) == {}


def test_the_default_ratio_keeps_a_fifth_of_inflating_clients_under_a_third_of_the_weight() -> None:
    counts = [2**31 - 1, 2**31 - 1] + [200] * 8
    capped = capped_sample_counts(counts, FederationConfig().max_weight_ratio)

    assert capped[:2] == [400, 400]
    assert sum(capped[:2]) / sum(capped) == pytest.approx(1 / 3)


@pytest.mark.parametrize("ratio", [-1.0, float("nan"), float("inf")])
def test_a_ratio_that_is_not_a_finite_non_negative_number_is_refused(ratio: float) -> None:
    with pytest.raises(ValueError, match="ratio must be a finite number >= 0"):
        capped_sample_counts([1, 2], ratio)
