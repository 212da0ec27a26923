import numpy as np
import pytest

from mlecs.aggregation import ClientUpdate, weighted_average_per_tensor
from mlecs.aggregation.base import AggregationError
from mlecs.aggregation.lora_exact import average_lora_products, lora_pairs

RANK, OUT, IN = 2, 6, 5


def _client(name: str, rng: np.random.Generator, a: np.ndarray | None = None) -> ClientUpdate:
    a = rng.normal(size=(RANK, IN)) if a is None else a
    return ClientUpdate(name, {"lora.l0.q.A": a.astype(np.float32),
                               "lora.l0.q.B": rng.normal(size=(OUT, RANK)).astype(np.float32),
                               "head.weight": rng.normal(size=(3,)).astype(np.float32)}, 10, frozenset({"image"}))


def _product(tensors: dict) -> np.ndarray:
    return np.asarray(tensors["lora.l0.q.B"], dtype=np.float64) @ np.asarray(tensors["lora.l0.q.A"], dtype=np.float64)


def test_pairs_are_found_by_name_and_unpaired_factors_ignored():
    assert lora_pairs({"lora.x.A", "lora.x.B", "lora.y.A", "head.A"}) == [("lora.x.A", "lora.x.B")]


def test_with_a_shared_a_the_result_reproduces_the_average_product_exactly():
    rng = np.random.default_rng(0)
    shared_a = rng.normal(size=(RANK, IN))
    clients = [_client(f"c{i}", rng, shared_a) for i in range(3)]
    weights = [0.5, 0.25, 0.25]
    result = average_lora_products(clients, weights)
    expected = sum(w * _product(c.tensors) for c, w in zip(clients, weights, strict=True))
    np.testing.assert_allclose(_product(result), expected, atol=1e-5)
    assert set(result) == {"lora.l0.q.A", "lora.l0.q.B"}


def test_exact_mode_is_closer_to_the_average_product_than_separate_averaging():
    rng = np.random.default_rng(1)
    clients = [_client(f"c{i}", rng) for i in range(3)]
    weights = [1 / 3] * 3
    target = sum(w * _product(c.tensors) for c, w in zip(clients, weights, strict=True))
    exact = np.linalg.norm(_product(average_lora_products(clients, weights)) - target)
    separate = np.linalg.norm(_product(weighted_average_per_tensor(clients, weights)) - target)
    assert exact < separate
    # And it is the best rank-r approximation: its error equals the discarded singular values.
    s = np.linalg.svd(target, compute_uv=False)
    assert exact == pytest.approx(np.sqrt((s[RANK:] ** 2).sum()), rel=1e-4)


def test_only_clients_holding_both_factors_take_part():
    rng = np.random.default_rng(2)
    full = _client("full", rng)
    partial = ClientUpdate("partial", {"lora.l0.q.A": rng.normal(size=(RANK, IN)).astype(np.float32)}, 10,
                           frozenset({"audio"}))
    result = average_lora_products([full, partial], [0.5, 0.5])
    np.testing.assert_allclose(_product(result), _product(full.tensors), atol=1e-5)


def test_factors_of_inconsistent_rank_are_refused_naming_the_client():
    rng = np.random.default_rng(3)
    bad = _client("bad", rng)
    bad = ClientUpdate("bad", {**bad.tensors, "lora.l0.q.A": np.zeros((RANK + 1, IN), np.float32),
                               "lora.l0.q.B": np.zeros((OUT, RANK + 1), np.float32)}, 10, frozenset({"image"}))
    with pytest.raises(AggregationError, match="bad"):
        average_lora_products([_client("good", rng), bad], [0.5, 0.5])
