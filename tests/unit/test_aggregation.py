"""Aggregation rules: weights checked by hand, per-tensor averaging over holders, and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from mlecs.aggregation import (
    AGGREGATORS,
    AggregationError,
    ClientUpdate,
    fedavg,
    fedavg_weights,
    get_aggregator,
    mma,
    mma_weights,
    weighted_average_per_tensor,
)


def _update(
    client_id: str,
    tensors: dict[str, np.ndarray] | None = None,
    *,
    samples: int = 100,
    modalities: tuple[str, ...] = ("image",),
) -> ClientUpdate:
    return ClientUpdate(client_id, tensors or {"w": np.zeros(2, np.float32)}, samples, frozenset(modalities))


def _fleet(samples: tuple[int, int, int] = (100, 100, 100)) -> list[ClientUpdate]:
    """Three clients with 2, 1 and 1 modalities; the audio extractor is held by only two of them."""
    return [
        _update(
            "both",
            {"adapter": np.full(3, 1.0, np.float32), "audio.enc": np.full((2, 2), 10.0, np.float32)},
            samples=samples[0],
            modalities=("image", "audio"),
        ),
        _update("image", {"adapter": np.full(3, 2.0, np.float32)}, samples=samples[1], modalities=("image",)),
        _update(
            "audio",
            {"adapter": np.full(3, 4.0, np.float32), "audio.enc": np.full((2, 2), 40.0, np.float32)},
            samples=samples[2],
            modalities=("audio",),
        ),
    ]


# ---------------------------------------------------------------------------------------------------
# Weights


def test_mma_weights_follow_modality_counts_with_equal_samples() -> None:
    assert mma_weights(_fleet()) == pytest.approx([0.5, 0.25, 0.25])
    assert mma_weights(_fleet(), use_sample_counts=False) == pytest.approx([0.5, 0.25, 0.25])


def test_mma_weights_multiply_modalities_by_samples() -> None:
    # |M| * n = (2*100, 1*300, 1*100) = (200, 300, 100)
    assert mma_weights(_fleet((100, 300, 100))) == pytest.approx([200 / 600, 300 / 600, 100 / 600])
    # The paper's rule ignores sample counts.
    assert mma_weights(_fleet((100, 300, 100)), use_sample_counts=False) == pytest.approx([0.5, 0.25, 0.25])


def test_fedavg_weights_follow_sample_counts() -> None:
    assert fedavg_weights(_fleet((100, 300, 100))) == pytest.approx([0.2, 0.6, 0.2])


def test_weights_sum_to_one() -> None:
    fleet = _fleet((7, 11, 13))
    assert sum(fedavg_weights(fleet)) == pytest.approx(1.0)
    assert sum(mma_weights(fleet)) == pytest.approx(1.0)


@pytest.mark.parametrize("rule", [fedavg_weights, mma_weights, fedavg, mma])
def test_zero_samples_everywhere_is_refused(rule: object) -> None:
    with pytest.raises(AggregationError, match="zero"):
        rule(_fleet((0, 0, 0)))  # type: ignore[operator]


def test_mma_without_sample_counts_tolerates_zero_samples() -> None:
    assert mma_weights(_fleet((0, 0, 0)), use_sample_counts=False) == pytest.approx([0.5, 0.25, 0.25])


@pytest.mark.parametrize("rule", [fedavg_weights, mma_weights, fedavg, mma])
def test_no_updates_is_refused(rule: object) -> None:
    with pytest.raises(AggregationError, match="no client updates"):
        rule([])  # type: ignore[operator]


# ---------------------------------------------------------------------------------------------------
# Per-tensor averaging


def test_mma_averages_shared_tensor_over_all_and_partial_tensor_over_its_holders() -> None:
    result = mma(_fleet())
    # adapter: 0.5*1 + 0.25*2 + 0.25*4 = 2.0
    np.testing.assert_allclose(result["adapter"], np.full(3, 2.0))
    # audio.enc is held by "both" (0.5) and "audio" (0.25): renormalised to 2/3 and 1/3.
    np.testing.assert_allclose(result["audio.enc"], np.full((2, 2), 2 / 3 * 10 + 1 / 3 * 40), rtol=1e-6)
    assert all(value.dtype == np.float32 for value in result.values())
    assert list(result) == ["adapter", "audio.enc"]


def test_fedavg_uses_sample_weights_per_tensor() -> None:
    result = fedavg(_fleet((100, 300, 100)))
    np.testing.assert_allclose(result["adapter"], np.full(3, 0.2 * 1 + 0.6 * 2 + 0.2 * 4), rtol=1e-6)
    # Holders of audio.enc have equal samples: plain mean of 10 and 40.
    np.testing.assert_allclose(result["audio.enc"], np.full((2, 2), 25.0))


def test_fedavg_of_identical_updates_returns_them_exactly() -> None:
    values = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    updates = [_update(f"c{i}", {"w": values.copy()}, samples=n) for i, n in enumerate((3, 5, 7, 11))]
    np.testing.assert_array_equal(fedavg(updates)["w"], values)
    np.testing.assert_array_equal(mma(updates)["w"], values)


def test_average_is_a_convex_combination() -> None:
    rng = np.random.default_rng(1)
    stacked = rng.normal(size=(5, 4, 6)).astype(np.float32)
    updates = [
        _update(f"c{i}", {"w": stacked[i]}, samples=int(n)) for i, n in enumerate(rng.integers(1, 50, 5))
    ]
    averaged = fedavg(updates)["w"]
    assert np.all(averaged >= stacked.min(axis=0) - 1e-6)
    assert np.all(averaged <= stacked.max(axis=0) + 1e-6)


def test_weighted_average_accumulates_in_float64() -> None:
    # In float32, 1e8/3 swallows 1/3 and the cancellation leaves 0; float64 keeps it.
    updates = [
        _update("big", {"w": np.array([1e8], np.float32)}),
        _update("one", {"w": np.ones(1, np.float32)}),
        _update("minus_big", {"w": np.array([-1e8], np.float32)}),
    ]
    result = weighted_average_per_tensor(updates, [1.0, 1.0, 1.0])
    assert result["w"][0] == np.float32(1 / 3)


def test_zero_weight_clients_take_no_part() -> None:
    updates = [
        _update("a", {"w": np.full(2, 3.0, np.float32)}),
        _update("b", {"w": np.full(2, 9.0, np.float32)}),
    ]
    np.testing.assert_array_equal(weighted_average_per_tensor(updates, [1.0, 0.0])["w"], [3.0, 3.0])


def test_inputs_are_not_modified() -> None:
    fleet = _fleet()
    before = {u.client_id: {k: v.copy() for k, v in u.tensors.items()} for u in fleet}
    mma(fleet)
    for update in fleet:
        for name, value in update.tensors.items():
            np.testing.assert_array_equal(value, before[update.client_id][name])


def test_integer_tensors_average_to_float32() -> None:
    updates = [_update("a", {"w": np.array([1, 2])}), _update("b", {"w": np.array([2, 3])})]
    result = fedavg(updates)["w"]
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, [1.5, 2.5])


# ---------------------------------------------------------------------------------------------------
# Refusals


def test_shape_mismatch_is_refused_naming_the_tensor_and_clients() -> None:
    updates = [_update("a", {"w": np.zeros((2, 3))}), _update("b", {"w": np.zeros((3, 2))})]
    with pytest.raises(AggregationError, match=r"'w'.*a=\(2, 3\).*b=\(3, 2\)"):
        fedavg(updates)


def test_tensor_whose_holders_all_weigh_zero_is_refused() -> None:
    updates = [
        _update("a", {"shared": np.ones(2)}, samples=10),
        _update("b", {"shared": np.ones(2), "only_b": np.ones(2)}, samples=0),
    ]
    with pytest.raises(AggregationError, match=r"'only_b'.*zero total weight"):
        fedavg(updates)


def test_non_finite_values_are_refused_naming_the_client() -> None:
    updates = [_update("good", {"w": np.ones(2)}), _update("bad", {"w": np.array([1.0, np.nan])})]
    with pytest.raises(AggregationError, match=r"'w'.*\['bad'\]"):
        mma(updates)


@pytest.mark.parametrize(
    ("weights", "message"),
    [([1.0], "1 weights given for 2"), ([1.0, -0.5], "non-negative"), ([1.0, float("nan")], "finite")],
)
def test_bad_weights_are_refused(weights: list[float], message: str) -> None:
    updates = [_update("a"), _update("b")]
    with pytest.raises(AggregationError, match=message):
        weighted_average_per_tensor(updates, weights)


def test_non_numeric_tensor_is_refused() -> None:
    with pytest.raises(AggregationError, match="dtype"):
        fedavg([_update("a", {"w": np.array(["x", "y"])})])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"client_id": ""}, "client_id"),
        ({"num_samples": -1}, "negative"),
        ({"num_samples": 2.5}, "integer"),
        ({"num_samples": True}, "integer"),
        ({"modalities": frozenset()}, "at least one modality"),
    ],
)
def test_malformed_client_update_is_refused(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "client_id": "c",
        "tensors": {},
        "num_samples": 1,
        "modalities": frozenset({"image"}),
    }
    fields.update(kwargs)
    with pytest.raises(AggregationError, match=message):
        ClientUpdate(**fields)  # type: ignore[arg-type]


def test_client_update_accepts_any_iterable_of_modalities() -> None:
    update = ClientUpdate("c", {}, 1, {"image", "audio"})  # type: ignore[arg-type]
    assert update.modalities == frozenset({"image", "audio"})


def test_aggregation_error_is_a_value_error() -> None:
    assert issubclass(AggregationError, ValueError)


# ---------------------------------------------------------------------------------------------------
# Registry


def test_registry_names_the_rules() -> None:
    assert dict(AGGREGATORS) == {"fedavg": fedavg, "mma": mma}
    assert get_aggregator("mma") is mma
    assert get_aggregator(" FedAvg ") is fedavg


def test_unknown_aggregator_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown aggregator 'krum'; known aggregators: fedavg, mma"):
        get_aggregator("krum")
