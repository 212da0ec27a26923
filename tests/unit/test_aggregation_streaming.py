"""Streaming aggregation: one update at a time gives what the all-at-once rules give, and refuses the same inputs."""

from __future__ import annotations

import numpy as np
import pytest

from mlecs.aggregation import AggregationError, ClientUpdate, weighted_average_per_tensor
from mlecs.aggregation.lora_exact import StreamingLoraProducts, average_lora_products
from mlecs.aggregation.streaming import StreamingAverage

SHAPES = {"adapter.w": (4, 3), "audio.enc": (5,), "image.enc": (2, 2, 2), "head.b": (3,)}
A_NAME, B_NAME = "lora.layer0.query.A", "lora.layer0.query.B"
RANK, OUT, IN = 2, 6, 5


def _random_fleet(seed: int, clients: int = 6) -> tuple[list[ClientUpdate], list[float]]:
    """Clients holding random, non-empty subsets of SHAPES, with varied (some zero) weights."""
    rng = np.random.default_rng(seed)
    updates = []
    for index in range(clients):
        names = [name for name in SHAPES if rng.random() < 0.6] or ["adapter.w"]
        tensors = {name: rng.normal(size=SHAPES[name]).astype(np.float32) for name in names}
        updates.append(ClientUpdate(f"c{index}", tensors, 10, frozenset({"image"})))
    weights = [float(w) for w in rng.uniform(0.1, 5.0, size=clients)]
    return updates, weights


def _stream(updates: list[ClientUpdate], weights: list[float]) -> dict[str, np.ndarray]:
    average = StreamingAverage()
    for update, weight in zip(updates, weights, strict=True):
        average.add(update.client_id, update.tensors, weight)
    return average.result()


# ---------------------------------------------------------------------------------------------------
# StreamingAverage


@pytest.mark.parametrize("seed", range(5))
def test_streaming_average_equals_the_all_at_once_per_tensor_average(seed: int) -> None:
    updates, weights = _random_fleet(seed)
    streamed = _stream(updates, weights)
    expected = weighted_average_per_tensor(updates, weights)
    assert list(streamed) == list(expected)
    for name in expected:
        np.testing.assert_allclose(streamed[name], expected[name], rtol=1e-6, err_msg=name)


def test_streaming_average_matches_a_hand_computed_weighted_mean() -> None:
    average = StreamingAverage()
    average.add("a", {"w": np.array([1.0, 2.0], np.float32)}, 1.0)
    average.add("b", {"w": np.array([4.0, 8.0], np.float32)}, 3.0)
    np.testing.assert_allclose(average.result()["w"], [13 / 4, 26 / 4], rtol=1e-6)


def test_a_tensor_held_by_one_client_is_that_clients_tensor() -> None:
    own = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    average = StreamingAverage()
    average.add("a", {"shared": np.ones(2, np.float32), "only_a": own}, 0.3)
    average.add("b", {"shared": np.zeros(2, np.float32)}, 2.0)
    result = average.result()
    np.testing.assert_array_equal(result["only_a"], own)
    np.testing.assert_allclose(result["shared"], [0.3 / 2.3] * 2, rtol=1e-6)


def test_a_zero_weight_client_takes_no_part() -> None:
    average = StreamingAverage()
    average.add("a", {"w": np.full(3, 2.0, np.float32)}, 1.0)
    average.add("zero", {"w": np.full(3, 1000.0, np.float32)}, 0.0)
    average.add("b", {"w": np.full(3, 4.0, np.float32)}, 1.0)
    np.testing.assert_allclose(average.result()["w"], np.full(3, 3.0), rtol=1e-6)


def test_a_tensor_whose_holders_all_have_zero_weight_is_refused_by_name() -> None:
    average = StreamingAverage()
    average.add("a", {"w": np.ones(2, np.float32)}, 1.0)
    average.add("z1", {"orphan": np.ones(2, np.float32)}, 0.0)
    average.add("z2", {"orphan": np.ones(2, np.float32)}, 0.0)
    with pytest.raises(AggregationError, match=r"tensor 'orphan'.*z1, z2.*zero total weight"):
        average.result()


def test_a_shape_mismatch_is_refused_naming_the_tensor_and_the_client() -> None:
    average = StreamingAverage()
    average.add("a", {"w": np.ones((2, 3), np.float32)}, 1.0)
    with pytest.raises(AggregationError, match=r"tensor 'w': client 'bad' sent shape \(3, 2\)"):
        average.add("bad", {"w": np.ones((3, 2), np.float32)}, 1.0)


def test_a_shape_mismatch_is_refused_even_from_a_zero_weight_client() -> None:
    average = StreamingAverage()
    average.add("a", {"w": np.ones(2, np.float32)}, 1.0)
    with pytest.raises(AggregationError, match=r"'w'.*'silent'"):
        average.add("silent", {"w": np.ones(3, np.float32)}, 0.0)


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_a_negative_or_non_finite_weight_is_refused_naming_the_client(weight: float) -> None:
    with pytest.raises(AggregationError, match="client 'a': weight must be finite and non-negative"):
        StreamingAverage().add("a", {"w": np.ones(2, np.float32)}, weight)


def test_averaging_nothing_is_refused() -> None:
    with pytest.raises(AggregationError, match="no client updates"):
        StreamingAverage().result()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_values_are_refused_naming_the_tensor(bad: float) -> None:
    average = StreamingAverage()
    average.add("a", {"w": np.array([1.0, bad], np.float32), "ok": np.ones(1, np.float32)}, 1.0)
    average.add("b", {"w": np.array([1.0, 2.0], np.float32)}, 1.0)
    with pytest.raises(AggregationError, match="tensor 'w': non-finite"):
        average.result()


def test_a_non_numeric_tensor_is_refused() -> None:
    with pytest.raises(AggregationError, match="dtype"):
        StreamingAverage().add("a", {"w": np.array(["x", "y"])}, 1.0)


def test_results_are_float32_whatever_the_input_dtype() -> None:
    average = StreamingAverage()
    average.add("a", {"f64": np.ones(2, np.float64), "i": np.arange(3, dtype=np.int64),
                      "f16": np.ones(2, np.float16)}, 1.0)
    average.add("b", {"f64": np.zeros(2, np.float64), "i": np.arange(3, dtype=np.int64)}, 2.0)
    result = average.result()
    assert {name: array.dtype for name, array in result.items()} == {
        "f16": np.float32, "f64": np.float32, "i": np.float32}
    np.testing.assert_allclose(result["i"], [0.0, 1.0, 2.0], rtol=1e-6)


def test_float32_inputs_are_accumulated_in_double_precision() -> None:
    # In float32, 2**24 + 1 + 1 stays 2**24 (mean 5592405.5); summed in float64 the mean is exactly 5592406.
    average = StreamingAverage()
    for client_id, value in (("big", 2.0**24), ("one", 1.0), ("two", 1.0)):
        average.add(client_id, {"w": np.array([value], np.float32)}, 1.0)
    assert average.result()["w"][0] == np.float32(5592406.0)


# ---------------------------------------------------------------------------------------------------
# StreamingLoraProducts


def _lora_client(name: str, rng: np.random.Generator, rank: int = RANK) -> ClientUpdate:
    return ClientUpdate(name, {A_NAME: rng.normal(size=(rank, IN)).astype(np.float32),
                               B_NAME: rng.normal(size=(OUT, rank)).astype(np.float32),
                               "head.weight": rng.normal(size=(3,)).astype(np.float32)}, 10, frozenset({"image"}))


def _product(tensors: dict | ClientUpdate) -> np.ndarray:
    values = tensors.tensors if isinstance(tensors, ClientUpdate) else tensors
    return np.asarray(values[B_NAME], dtype=np.float64) @ np.asarray(values[A_NAME], dtype=np.float64)


def _best_rank_r(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def _stream_lora(updates: list[ClientUpdate], weights: list[float]) -> dict[str, np.ndarray]:
    products = StreamingLoraProducts()
    for update, weight in zip(updates, weights, strict=True):
        products.add(update.client_id, update.tensors, weight)
    return products.result()


@pytest.mark.parametrize("seed", range(3))
def test_lora_products_give_the_best_rank_r_approximation_of_the_weighted_mean_product(seed: int) -> None:
    rng = np.random.default_rng(seed)
    clients = [_lora_client(f"c{i}", rng) for i in range(4)]
    weights = [0.5, 2.0, 1.0, 3.5]
    result = _stream_lora(clients, weights)

    mean = sum(w * _product(c) for c, w in zip(clients, weights, strict=True)) / sum(weights)
    assert np.linalg.matrix_rank(mean) > RANK  # otherwise the truncation would be trivial
    np.testing.assert_allclose(_product(result), _best_rank_r(mean, RANK), atol=1e-5)
    assert result[A_NAME].shape == (RANK, IN) and result[B_NAME].shape == (OUT, RANK)
    assert result[A_NAME].dtype == np.float32 and result[B_NAME].dtype == np.float32
    assert set(result) == {A_NAME, B_NAME}  # unpaired tensors are not its business


def test_with_a_single_client_the_product_reproduces_that_clients_product() -> None:
    client = _lora_client("only", np.random.default_rng(7))
    result = _stream_lora([client], [0.7])
    np.testing.assert_allclose(_product(result), _product(client), atol=1e-5)


def test_the_all_at_once_exact_lora_rule_gives_the_same_as_streaming() -> None:
    rng = np.random.default_rng(3)
    clients = [_lora_client(f"c{i}", rng) for i in range(3)]
    weights = [1.0, 0.0, 2.5]
    streamed = _stream_lora(clients, weights)
    at_once = average_lora_products(clients, weights)
    assert set(streamed) == set(at_once)
    np.testing.assert_allclose(_product(streamed), _product(at_once), atol=1e-6)


def test_a_zero_weight_client_does_not_move_the_lora_product() -> None:
    rng = np.random.default_rng(4)
    kept, ignored = _lora_client("kept", rng), _lora_client("ignored", rng)
    result = _stream_lora([kept, ignored], [1.0, 0.0])
    np.testing.assert_allclose(_product(result), _product(kept), atol=1e-5)


def test_a_client_with_another_lora_rank_is_refused() -> None:
    rng = np.random.default_rng(5)
    products = StreamingLoraProducts()
    products.add("r2", _lora_client("r2", rng, rank=2).tensors, 1.0)
    with pytest.raises(AggregationError, match=r"r3: lora\.layer0\.query\.A/lora\.layer0\.query\.B do not have rank 2"):
        products.add("r3", _lora_client("r3", rng, rank=3).tensors, 1.0)


def test_factors_whose_inner_dimensions_disagree_are_refused() -> None:
    products = StreamingLoraProducts()
    with pytest.raises(AggregationError, match="do not have rank 2"):
        products.add("bad", {A_NAME: np.ones((2, IN), np.float32), B_NAME: np.ones((OUT, 3), np.float32)}, 1.0)


def test_lora_products_with_other_shapes_than_earlier_clients_are_refused() -> None:
    products = StreamingLoraProducts()
    products.add("a", {A_NAME: np.ones((RANK, IN), np.float32), B_NAME: np.ones((OUT, RANK), np.float32)}, 1.0)
    with pytest.raises(AggregationError, match="shapes disagree"):
        products.add("b", {A_NAME: np.ones((RANK, IN + 1), np.float32), B_NAME: np.ones((OUT, RANK), np.float32)},
                     1.0)


def test_lora_pairs_whose_holders_all_weigh_zero_are_refused() -> None:
    products = StreamingLoraProducts()
    products.add("z", _lora_client("z", np.random.default_rng(0)).tensors, 0.0)
    with pytest.raises(AggregationError, match="sum to zero"):
        products.result()


def test_lora_products_refuse_no_updates_and_bad_weights() -> None:
    with pytest.raises(AggregationError, match="no updates"):
        StreamingLoraProducts().result()
    with pytest.raises(AggregationError, match="weight must be finite"):
        StreamingLoraProducts().add("a", {}, -0.5)
