"""Robust aggregation: the per-coordinate rules against numpy references and hand-worked cases, the
on-disk blockwise evaluation against the in-memory one, and the robust pipeline against attackers."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from mlecs.aggregation.base import AggregationError
from mlecs.aggregation.blockwise import ROBUST_RULES, SpilledUpdates, robust_aggregate
from mlecs.aggregation.robust import (
    anomaly_scores,
    centre_cosines,
    check_cosine_threshold,
    clip_update,
    size_weighted_means,
    update_norm,
    weighted_median,
    weighted_trimmed_mean,
)

# ---------------------------------------------------------------------------------------------------
# weighted_median


@pytest.mark.parametrize("clients", [1, 2, 5, 8, 11])
def test_weighted_median_with_equal_weights_is_numpys_median(clients: int) -> None:
    values = np.random.default_rng(clients).normal(size=(clients, 40))
    # Weights like 0.1 do not sum exactly: "exactly half" must still be recognised for even K.
    for weight in (1.0, 0.1, 1 / 3):
        np.testing.assert_allclose(
            weighted_median(values, np.full(clients, weight)), np.median(values, axis=0), rtol=1e-12, atol=1e-12
        )


def test_weighted_median_of_hand_worked_cases() -> None:
    values = np.array([[1.0], [2.0], [3.0]])
    # Cumulative 1, 2, 4 of 4: exactly half at 2, so halfway to the next value.
    np.testing.assert_allclose(weighted_median(values, np.array([1.0, 1.0, 2.0])), [2.5])
    # Cumulative 1, 3, 4: half is first passed at 2.
    np.testing.assert_allclose(weighted_median(values, np.array([1.0, 2.0, 1.0])), [2.0])
    # One heavy client is the median on its own.
    np.testing.assert_allclose(weighted_median(values, np.array([1.0, 1.0, 5.0])), [3.0])


def test_a_zero_weight_client_does_not_move_the_weighted_median() -> None:
    rng = np.random.default_rng(7)
    honest = rng.normal(size=(4, 30))
    ordered = np.sort(honest, axis=0)
    # Placed between the two middle values: if it were taken as "the next one", the median would move.
    between = 0.25 * ordered[1] + 0.75 * ordered[2]
    far_away = np.full(30, 1e6)
    values = np.vstack([honest[:2], between, honest[2:], far_away])
    weights = np.array([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(weighted_median(values, weights), np.median(honest, axis=0), rtol=1e-12)


def test_integer_weights_act_like_duplicated_rows() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(size=(6, 50))
    counts = np.array([1, 3, 2, 1, 4, 2])
    duplicated = np.repeat(values, counts, axis=0)
    ones = np.ones(len(duplicated))
    weights = counts.astype(float)
    np.testing.assert_allclose(weighted_median(values, weights), weighted_median(duplicated, ones), rtol=1e-12)
    np.testing.assert_allclose(weighted_median(values, weights), np.median(duplicated, axis=0), rtol=1e-12)
    for trim in (0.0, 0.1, 0.15, 0.3):
        np.testing.assert_allclose(
            weighted_trimmed_mean(values, weights, trim), weighted_trimmed_mean(duplicated, ones, trim), rtol=1e-10
        )


def test_weighted_median_is_computed_per_column() -> None:
    values = np.array([[1.0, 30.0], [2.0, 10.0], [3.0, 20.0]])
    np.testing.assert_allclose(weighted_median(values, np.array([5.0, 1.0, 1.0])), [1.0, 30.0])


# ---------------------------------------------------------------------------------------------------
# weighted_trimmed_mean


def test_trimmed_mean_with_no_trim_is_the_weighted_mean() -> None:
    rng = np.random.default_rng(11)
    values = rng.normal(size=(7, 25))
    weights = rng.uniform(0.0, 3.0, size=7)
    np.testing.assert_allclose(
        weighted_trimmed_mean(values, weights, 0.0), np.average(values, axis=0, weights=weights), rtol=1e-12
    )


@pytest.mark.parametrize(("clients", "trim"), [(10, 0.2), (8, 0.25), (5, 0.2), (12, 0.25), (6, 0.0)])
def test_trimmed_mean_with_equal_weights_drops_whole_clients_at_each_end(clients: int, trim: float) -> None:
    values = np.random.default_rng(clients).normal(size=(clients, 30))
    dropped = round(trim * clients)
    expected = np.sort(values, axis=0)[dropped : clients - dropped].mean(axis=0)
    np.testing.assert_allclose(weighted_trimmed_mean(values, np.ones(clients), trim), expected, rtol=1e-10)


def test_trimmed_mean_counts_boundary_elements_with_the_weight_inside() -> None:
    # Equal thirds, trim 1/6: half of the lowest and half of the highest element is cut.
    values = np.array([[10.0], [1.0], [2.0]])
    np.testing.assert_allclose(weighted_trimmed_mean(values, np.ones(3), 1 / 6), [(0.5 * 1 + 2 + 0.5 * 10) / 2])
    # Weights 2, 1, 1 on 0, 6, 9 with trim 1/4: mass 1 goes from each end: keep 1 of the 0s and all of 6.
    values = np.array([[0.0], [6.0], [9.0]])
    np.testing.assert_allclose(weighted_trimmed_mean(values, np.array([2.0, 1.0, 1.0]), 0.25), [3.0])


def test_trimmed_mean_ignores_a_zero_weight_outlier() -> None:
    values = np.array([[1.0], [2.0], [3.0], [1e9]])
    np.testing.assert_allclose(weighted_trimmed_mean(values, np.array([1.0, 1.0, 1.0, 0.0]), 0.0), [2.0])


# ---------------------------------------------------------------------------------------------------
# validation shared by both rules

RULES = {"median": weighted_median, "trimmed_mean": partial(weighted_trimmed_mean, trim=0.1)}


@pytest.mark.parametrize("rule", RULES.values(), ids=list(RULES))
@pytest.mark.parametrize(
    ("values", "weights", "message"),
    [
        (np.ones(3), np.ones(3), r"values must be 2-D .*shape \(3,\)"),
        (np.ones((2, 2, 2)), np.ones(2), "values must be 2-D"),
        (np.ones((0, 3)), np.ones(0), r"no clients"),
        (np.ones((3, 2)), np.ones(2), r"weights have shape \(2,\), expected \(3,\)"),
        (np.ones((3, 2)), np.ones((3, 1)), r"weights have shape \(3, 1\)"),
        (np.ones((3, 2)), np.array([1.0, -1.0, 1.0]), "finite and non-negative"),
        (np.ones((3, 2)), np.array([1.0, np.nan, 1.0]), "finite and non-negative"),
        (np.ones((3, 2)), np.array([1.0, np.inf, 1.0]), "finite and non-negative"),
        (np.ones((3, 2)), np.zeros(3), "sum to zero"),
        (np.array([[1.0, 2.0], [3.0, np.nan]]), np.ones(2), r"not finite: client row 1, coordinate 1 is nan"),
        (np.array([[1.0, -np.inf], [3.0, 4.0]]), np.ones(2), r"not finite: client row 0, coordinate 1"),
        (np.array([["a"], ["b"]]), np.ones(2), "dtype"),
    ],
)
def test_bad_inputs_are_refused_naming_the_problem(rule, values, weights, message: str) -> None:
    with pytest.raises(AggregationError, match=message):
        rule(values, weights)


@pytest.mark.parametrize("trim", [0.5, 0.7, -0.1, float("nan")])
def test_a_trim_outside_zero_to_a_half_is_refused(trim: float) -> None:
    with pytest.raises(AggregationError, match=r"trim must be in \[0, 0.5\)"):
        weighted_trimmed_mean(np.ones((4, 2)), np.ones(4), trim)


# ---------------------------------------------------------------------------------------------------
# norms and clipping


def _update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=7).astype(np.float32)}


def test_update_norm_is_the_norm_of_all_tensors_concatenated() -> None:
    update = _update(1)
    flat = np.concatenate([t.ravel() for t in update.values()]).astype(np.float64)
    assert update_norm(update) == pytest.approx(float(np.linalg.norm(flat)), rel=1e-12)
    assert update_norm({}) == 0.0


def test_update_norm_refuses_non_finite_values_naming_the_tensor() -> None:
    with pytest.raises(AggregationError, match="tensor 'b' has non-finite"):
        update_norm({"a": np.ones(2), "b": np.array([1.0, np.inf])})


def test_clipping_a_long_update_brings_its_norm_to_max_norm_keeping_its_direction() -> None:
    update = _update(2)
    norm = update_norm(update)
    clipped, factor = clip_update(update, norm / 3)
    assert factor == pytest.approx(1 / 3, rel=1e-12)
    assert update_norm(clipped) == pytest.approx(norm / 3, rel=1e-6)
    for name, tensor in update.items():
        assert clipped[name].dtype == np.float32
        np.testing.assert_allclose(clipped[name], tensor * factor, rtol=1e-6)


def test_clipping_a_short_update_changes_nothing() -> None:
    update = {name: t.astype(np.float64) for name, t in _update(3).items()}
    clipped, factor = clip_update(update, update_norm(update) * 2)
    assert factor == 1.0
    for name, tensor in update.items():
        assert clipped[name].dtype == np.float32
        np.testing.assert_array_equal(clipped[name], tensor.astype(np.float32))


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan"), float("inf")])
def test_clipping_refuses_a_max_norm_that_is_not_finite_and_positive(max_norm: float) -> None:
    with pytest.raises(AggregationError, match="max_norm must be finite and positive"):
        clip_update(_update(4), max_norm)


# ---------------------------------------------------------------------------------------------------
# anomaly scores


def test_anomaly_scores_put_a_typical_client_near_one_and_an_outlier_far_above() -> None:
    scores = anomaly_scores({"a": 2.0, "b": 1.8, "c": 2.2, "d": 2.0, "e": 20.0})
    assert scores["a"] == pytest.approx(1.0)
    assert scores["b"] == pytest.approx(0.9)
    assert scores["e"] == pytest.approx(10.0)


def test_anomaly_scores_with_a_zero_median_separate_the_centre_from_everyone_else() -> None:
    assert anomaly_scores({"a": 0.0, "b": 0.0, "c": 5.0}) == {"a": 0.0, "b": 0.0, "c": math.inf}


@pytest.mark.parametrize("distance", [-1.0, float("nan"), float("inf")])
def test_anomaly_scores_refuse_a_bad_distance_naming_the_client(distance: float) -> None:
    with pytest.raises(AggregationError, match="client 'x': distance"):
        anomaly_scores({"a": 1.0, "x": distance})


# ---------------------------------------------------------------------------------------------------
# cosines with the centre, and combining per-tensor measures


def test_centre_cosines_are_the_dot_product_over_both_norms() -> None:
    centre = np.array([3.0, 4.0])
    updates = {"along": np.array([6.0, 8.0]), "across": np.array([-4.0, 3.0]), "flipped": np.array([-3.0, -4.0]),
               "between": np.array([1.0, 0.0])}
    cosines = centre_cosines({c: float(u @ centre) for c, u in updates.items()},
                             {c: float(u @ u) for c, u in updates.items()}, float(centre @ centre))
    assert cosines == pytest.approx({"along": 1.0, "across": 0.0, "flipped": -1.0, "between": 0.6})


def test_a_sign_flipped_update_has_exactly_the_negative_cosine_of_the_update_it_came_from() -> None:
    rng = np.random.default_rng(3)
    centre, update = rng.normal(size=50), rng.normal(size=50)
    cosines = centre_cosines({"honest": float(update @ centre), "flipped": float(-update @ centre)},
                             {"honest": float(update @ update), "flipped": float(update @ update)},
                             float(centre @ centre))
    assert cosines["flipped"] == -cosines["honest"] != 0


def test_centre_cosines_where_a_norm_is_zero_agree_only_when_both_are() -> None:
    at_zero = centre_cosines({"zero": 0.0, "moved": 0.0}, {"zero": 0.0, "moved": 2.0}, 0.0)
    assert at_zero == {"zero": 1.0, "moved": 0.0}  # both zero: the client sent the centre; else no direction
    assert centre_cosines({"zero": 0.0}, {"zero": 0.0}, 5.0) == {"zero": 0.0}


def test_centre_cosines_are_clamped_to_minus_one_and_one() -> None:
    # dot² slightly above the product of the squared norms, as float rounding can leave it.
    cosines = centre_cosines({"a": 1.0 + 1e-15, "b": -1.0 - 1e-15}, {"a": 1.0, "b": 1.0}, 1.0)
    assert cosines == {"a": 1.0, "b": -1.0}


@pytest.mark.parametrize(("dots", "norms", "centre", "message"), [
    ({"x": float("nan")}, {"x": 1.0}, 1.0, "client 'x': dot product nan"),
    ({"x": 1.0}, {"x": float("inf")}, 1.0, "client 'x': dot product 1.0 and squared norm inf"),
    ({"x": 1.0}, {"x": -1.0}, 1.0, "client 'x'"),
    ({"x": 1.0}, {"x": 1.0}, float("inf"), "the centre's squared norm must be finite"),
    ({"x": 1.0}, {"x": 1.0}, -1.0, "the centre's squared norm must be finite and non-negative"),
    ({"x": 1.0}, {"y": 1.0}, 1.0, r"name different clients: \['x', 'y'\]"),
])
def test_centre_cosines_refuse_sums_that_are_not_finite_naming_what(dots, norms, centre, message) -> None:
    with pytest.raises(AggregationError, match=message):
        centre_cosines(dots, norms, centre)


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.999])
def test_a_cosine_threshold_in_minus_one_to_one_is_accepted(threshold: float) -> None:
    assert check_cosine_threshold(threshold) == threshold


@pytest.mark.parametrize("threshold", [1.0, -1.01, 2.0, float("nan"), float("-inf")])
def test_a_cosine_threshold_outside_minus_one_to_one_is_refused(threshold: float) -> None:
    with pytest.raises(AggregationError, match=r"a cosine threshold must be in \[-1, 1\)"):
        check_cosine_threshold(threshold)


def test_size_weighted_means_weigh_each_tensor_by_its_size_over_the_tensors_a_client_holds() -> None:
    per_tensor = {"big": {"a": 1.0, "b": 0.0}, "small": {"a": -1.0, "c": 0.5}, "empty": {"a": 7.0, "d": 3.0}}
    means = size_weighted_means(per_tensor, {"big": 30, "small": 10, "empty": 0})
    assert means == pytest.approx({"a": (30 * 1.0 - 10 * 1.0) / 40, "b": 0.0, "c": 0.5, "d": 3.0})


def test_size_weighted_means_keep_an_infinite_score_and_refuse_nan_or_a_missing_size() -> None:
    assert size_weighted_means({"t": {"a": math.inf}, "e": {"a": math.inf}}, {"t": 4, "e": 0}) == {"a": math.inf}
    with pytest.raises(AggregationError, match="tensor 't', client 'a': the value is nan"):
        size_weighted_means({"t": {"a": math.nan}}, {"t": 4})
    with pytest.raises(AggregationError, match="no size for tensor 'u'"):
        size_weighted_means({"u": {"a": 1.0}}, {"t": 4})
    with pytest.raises(AggregationError, match="tensor 't': size must be a non-negative integer"):
        size_weighted_means({"t": {"a": 1.0}}, {"t": -1})


# ---------------------------------------------------------------------------------------------------
# SpilledUpdates: blockwise equals in memory

SHAPES = {"enc.w": (5, 6), "enc.b": (6,), "head": (2, 3, 4), "scale": ()}


def _fleet(seed: int, clients: int = 9) -> tuple[list[tuple[str, dict[str, np.ndarray], float]], set[str]]:
    """Clients holding random subsets of SHAPES ("enc.w" always), with varied weights, one of them 0."""
    rng = np.random.default_rng(seed)
    fleet = []
    for index in range(clients):
        names = ["enc.w"] + [name for name in SHAPES if name != "enc.w" and rng.random() < 0.6]
        tensors = {name: rng.normal(size=SHAPES[name]).astype(np.float32) for name in names}
        fleet.append((f"c{index}", tensors, 0.0 if index == 4 else float(rng.uniform(0.5, 3.0))))
    held = {name for _, tensors, _ in fleet for name in tensors}
    return fleet, held


def _spill(fleet, **kwargs) -> SpilledUpdates:
    spilled = SpilledUpdates(**kwargs)
    for client_id, tensors, weight in fleet:
        spilled.add(client_id, tensors, weight)
    return spilled


def _in_memory(fleet, rule, exclude: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """The reference: stack every holder's row and apply the rule to the whole matrix at once."""
    names = sorted({name for _, tensors, _ in fleet for name in tensors})
    out = {}
    for name in names:
        rows = [(t[name], w) for c, t, w in fleet if name in t and c not in exclude]
        matrix = np.stack([np.asarray(t, np.float64).ravel() for t, _ in rows])
        out[name] = rule(matrix, np.array([w for _, w in rows])).reshape(SHAPES[name]).astype(np.float32)
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("rule", [weighted_median, partial(weighted_trimmed_mean, trim=0.2)], ids=["median", "trim"])
def test_blockwise_reduce_equals_the_in_memory_rule(seed: int, rule) -> None:
    fleet, held = _fleet(seed)
    exclude = frozenset({"c1", "c6"})
    with _spill(fleet, block_bytes=256) as spilled:
        assert spilled.names == sorted(held)
        for excluded in (frozenset(), exclude):
            result = spilled.reduce(rule, exclude=excluded)
            expected = _in_memory(fleet, rule, excluded)
            assert list(result) == list(expected)
            for name in expected:
                assert result[name].dtype == np.float32
                assert result[name].shape == SHAPES[name]
                np.testing.assert_allclose(result[name], expected[name], rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("block_bytes", [4, 64, 256, 1000, 1 << 20])
def test_every_block_respects_the_budget_and_together_they_cover_the_tensor(block_bytes: int) -> None:
    fleet, _ = _fleet(5)
    with _spill(fleet, block_bytes=block_bytes) as spilled:
        for name in spilled.names:
            for exclude in ((), ("c0", "c2")):
                holders = [c for c in spilled.holders(name) if c not in exclude]
                expected = np.stack([t[name].ravel() for c, t, _ in fleet if c in holders])
                seen = np.full(expected.shape, np.nan)
                stop = 0
                blocks = list(spilled.iter_blocks(name, exclude))
                for columns, values, weights in blocks:
                    assert columns.start == stop  # contiguous, in order
                    stop = columns.stop
                    assert values.shape == (len(holders), columns.stop - columns.start)
                    assert type(values) is np.ndarray and values.dtype == np.float64
                    if block_bytes >= 8 * len(holders):  # at least one column fits
                        assert values.nbytes <= block_bytes
                    else:
                        assert values.shape[1] == 1
                    np.testing.assert_array_equal(weights, [w for c, _, w in fleet if c in holders])
                    seen[:, columns] = values
                assert stop == expected.shape[1]
                if block_bytes <= 64 and expected.shape[1] > 1:
                    assert len(blocks) > 1
                np.testing.assert_array_equal(seen, expected)


def test_distances_are_each_clients_norm_to_the_centre_over_the_tensors_it_holds() -> None:
    fleet, held = _fleet(8)
    rng = np.random.default_rng(80)
    centre = {name: rng.normal(size=SHAPES[name]) for name in held}
    with _spill(fleet, block_bytes=128) as spilled:
        distances = spilled.distances(centre)
    assert list(distances) == [c for c, _, _ in fleet]
    for client_id, tensors, _ in fleet:
        squares = sum(float(np.sum((t.astype(np.float64) - centre[n]) ** 2)) for n, t in tensors.items())
        assert distances[client_id] == pytest.approx(math.sqrt(squares), rel=1e-12)


@pytest.mark.parametrize("block_bytes", [8, 128, 1 << 20])
def test_blockwise_cosines_and_distances_are_the_in_memory_ones_per_tensor(block_bytes: int) -> None:
    fleet, held = _fleet(8)
    rng = np.random.default_rng(81)
    centre = {name: rng.normal(size=SHAPES[name]) for name in held}
    with _spill(fleet, block_bytes=block_bytes) as spilled:
        measures = spilled.measure(centre)
        assert spilled.tensor_cosines(centre) == measures.cosines
        assert spilled.tensor_distances(centre) == measures.distances
    assert set(measures.cosines) == held
    for client_id, tensors, _ in fleet:
        for name, tensor in tensors.items():
            u, c = tensor.astype(np.float64).ravel(), np.asarray(centre[name], np.float64).ravel()
            expected = float(u @ c / (np.linalg.norm(u) * np.linalg.norm(c)))
            assert measures.cosines[name][client_id] == pytest.approx(expected, rel=1e-9, abs=1e-12)
            assert measures.distances[name][client_id] == pytest.approx(float(np.linalg.norm(u - c)), rel=1e-12)
        assert set(measures.cosines) - set(tensors) == {n for n in held if client_id not in spilled.holders(n)}


def test_the_holders_and_shapes_are_recorded_in_add_order() -> None:
    with SpilledUpdates() as spilled:
        spilled.add("b", {"x": np.ones((2, 3)), "y": np.ones(4)}, 1.0)
        spilled.add("a", {"x": np.zeros((2, 3))}, 2.0)
        assert spilled.clients == ["b", "a"]
        assert spilled.names == ["x", "y"]
        assert spilled.holders("x") == ["b", "a"]
        assert spilled.holders("y") == ["b"]
        assert spilled.shape("x") == (2, 3)
        with pytest.raises(AggregationError, match="no client sent a tensor 'z'"):
            spilled.holders("z")


# ---------------------------------------------------------------------------------------------------
# SpilledUpdates: refusals and clean-up


def test_a_shape_mismatch_is_refused_and_nothing_of_that_update_is_written() -> None:
    with SpilledUpdates() as spilled:
        spilled.add("a", {"w": np.ones((2, 3)), "v": np.ones(2)}, 1.0)
        sizes = {p.name: p.stat().st_size for p in spilled.directory.iterdir()}
        with pytest.raises(AggregationError, match=r"tensor 'w': client 'bad' sent shape \(3, 2\)"):
            spilled.add("bad", {"v": np.full(2, 9.0), "new": np.ones(3), "w": np.ones((3, 2))}, 1.0)
        assert spilled.clients == ["a"]
        assert spilled.names == ["v", "w"]
        assert {p.name: p.stat().st_size for p in spilled.directory.iterdir()} == sizes
        np.testing.assert_array_equal(spilled.reduce(weighted_median)["v"], np.ones(2))


@pytest.mark.parametrize(
    ("client_id", "tensors", "weight", "message"),
    [
        ("a", {"w": np.ones(2)}, 1.0, "client 'a' was already added"),
        ("b", {"w": np.array([1.0, np.nan])}, 1.0, "tensor 'w' from client 'b' has non-finite values"),
        ("b", {"w": np.array([1.0, 1e300])}, 1.0, "tensor 'w' from client 'b' has non-finite values"),
        ("b", {"w": np.array(["x", "y"])}, 1.0, "dtype"),
        ("b", {"w": np.ones(2)}, -1.0, "client 'b': weight must be finite and non-negative"),
        ("b", {"w": np.ones(2)}, float("nan"), "client 'b': weight must be finite"),
        ("b", {"w": np.ones(2)}, float("inf"), "client 'b': weight must be finite"),
        ("b", {}, 1.0, "client 'b' sent no tensors"),
        ("", {"w": np.ones(2)}, 1.0, "non-empty client_id"),
    ],
)
def test_bad_updates_are_refused_naming_the_client(client_id: str, tensors, weight: float, message: str) -> None:
    with SpilledUpdates() as spilled:
        spilled.add("a", {"w": np.ones(2)}, 1.0)
        with pytest.raises(AggregationError, match=message):
            spilled.add(client_id, tensors, weight)
        assert spilled.clients == ["a"]


def test_a_block_budget_below_four_bytes_is_refused() -> None:
    with pytest.raises(AggregationError, match="block_bytes must be an integer >= 4"):
        SpilledUpdates(block_bytes=3)


def test_reduce_names_a_tensor_left_without_holders_by_the_exclusion() -> None:
    with SpilledUpdates() as spilled:
        spilled.add("a", {"w": np.ones(2), "only_b": np.ones(1)}, 1.0)
        spilled.add("b", {"w": np.ones(2)}, 1.0)
        spilled.add("c", {"w": np.ones(2), "only_c": np.ones(1)}, 1.0)
        with pytest.raises(AggregationError, match="tensor 'only_c': no holder left"):
            spilled.reduce(weighted_median, exclude={"c"})
        with pytest.raises(AggregationError, match=r"cannot exclude unknown clients \['zz'\]"):
            spilled.reduce(weighted_median, exclude={"zz"})


def test_reduce_names_a_tensor_whose_remaining_holders_have_zero_weight() -> None:
    with SpilledUpdates() as spilled:
        spilled.add("a", {"w": np.ones(2)}, 1.0)
        spilled.add("z", {"orphan": np.ones(2)}, 0.0)
        with pytest.raises(AggregationError, match=r"tensor 'orphan': its holders \(z\) have zero total weight"):
            spilled.reduce(weighted_median)


def test_close_removes_the_spill_directory_and_refuses_further_use(tmp_path: Path) -> None:
    spilled = SpilledUpdates()
    spilled.add("a", {"w": np.ones(3)}, 1.0)
    directory = spilled.directory
    assert any(directory.iterdir())
    spilled.close()
    assert not directory.exists()
    spilled.close()  # twice is fine
    with pytest.raises(AggregationError, match="closed"):
        spilled.add("b", {"w": np.ones(3)}, 1.0)

    with SpilledUpdates(directory=tmp_path) as inside:
        inside.add("a", {"w": np.ones(3)}, 1.0)
        assert inside.directory.parent == tmp_path
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# robust_aggregate against attackers

CLEAN, ATTACKERS = 8, 2  # 20% attackers
NOISE = 0.05


def _attacked(seed: int, attack) -> tuple[SpilledUpdates, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """8 clean clients (a common mean plus small noise) and 2 attackers sending ``attack(clean update)``."""
    rng = np.random.default_rng(seed)
    mean = {"enc": rng.normal(size=(20, 10)), "head": rng.normal(size=30)}
    spilled = SpilledUpdates(block_bytes=512)
    for index in range(CLEAN + ATTACKERS):
        update = {name: m + rng.normal(scale=NOISE, size=m.shape) for name, m in mean.items()}
        if index >= CLEAN:
            update = {name: attack(t) for name, t in update.items()}
        spilled.add(f"attacker{index - CLEAN}" if index >= CLEAN else f"clean{index}", update, 1.0)
    plain = spilled.reduce(lambda values, weights: np.average(values, axis=0, weights=weights))
    return spilled, mean, plain


def _max_error(result: dict[str, np.ndarray], mean: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(result[name] - mean[name]))) for name in mean)


@pytest.mark.parametrize(("rule", "trim"), [("median", 0.1), ("trimmed_mean", 0.2)])
def test_scaled_attackers_move_the_mean_but_not_the_robust_rules(rule: str, trim: float) -> None:
    spilled, mean, plain = _attacked(21, lambda t: 10 * t)
    with spilled:
        assert _max_error(plain, mean) > 20 * NOISE
        result = robust_aggregate(spilled, rule, trim=trim)
        assert result.excluded == frozenset()
        assert _max_error(result.tensors, mean) < 4 * NOISE
        assert min(result.scores[f"attacker{i}"] for i in range(ATTACKERS)) > 10
        assert max(result.scores[f"clean{i}"] for i in range(CLEAN)) < 2

        screened = robust_aggregate(spilled, rule, trim=trim, exclude_above=3)
        assert screened.excluded == {"attacker0", "attacker1"}
        assert _max_error(screened.tensors, mean) < 4 * NOISE
        # The screened result is the rule over the clean clients only.
        rule_fn = weighted_median if rule == "median" else partial(weighted_trimmed_mean, trim=trim)
        clean_only = spilled.reduce(rule_fn, exclude=screened.excluded)
        for name, tensor in clean_only.items():
            np.testing.assert_array_equal(screened.tensors[name], tensor)


def test_sign_flipped_attackers_are_outvoted_by_the_median_and_excluded_by_score() -> None:
    spilled, mean, plain = _attacked(22, lambda t: -t)
    with spilled:
        assert _max_error(plain, mean) > 10 * NOISE  # the mean shrinks to 0.6 × the clean mean
        result = robust_aggregate(spilled, "median")
        assert _max_error(result.tensors, mean) < 4 * NOISE
        screened = robust_aggregate(spilled, "median", exclude_above=3)
        assert screened.excluded == {"attacker0", "attacker1"}
        assert _max_error(screened.tensors, mean) < 3 * NOISE


def test_median_without_exclusion_is_the_blockwise_weighted_median() -> None:
    fleet, _ = _fleet(9)
    with _spill(fleet, block_bytes=200) as spilled:
        result = robust_aggregate(spilled, "median")
        expected = _in_memory(fleet, weighted_median)
        for name in expected:
            np.testing.assert_array_equal(result.tensors[name], expected[name])
        assert set(result.scores) == set(spilled.clients)


def test_an_unknown_rule_is_refused_listing_the_valid_ones() -> None:
    assert ROBUST_RULES == ("median", "trimmed_mean")
    with SpilledUpdates() as spilled:
        spilled.add("a", {"w": np.ones(2)}, 1.0)
        with pytest.raises(AggregationError, match="unknown robust rule 'krum'; valid rules: median, trimmed_mean"):
            robust_aggregate(spilled, "krum")
        with pytest.raises(AggregationError, match="trim must be in"):
            robust_aggregate(spilled, "trimmed_mean", trim=0.5)
        with pytest.raises(AggregationError, match="exclude_above must be positive"):
            robust_aggregate(spilled, "median", exclude_above=float("nan"))


def test_excluding_every_client_is_refused() -> None:
    with SpilledUpdates() as spilled:
        spilled.add("a", {"w": np.zeros(2)}, 1.0)
        spilled.add("b", {"w": np.ones(2)}, 1.0)  # both sit at the same distance from their median: score 1
        with pytest.raises(AggregationError, match=r"every client scores above exclude_above=0\.5"):
            robust_aggregate(spilled, "median", exclude_above=0.5)


def test_holding_more_tensors_does_not_make_an_honest_client_an_outlier() -> None:
    from mlecs.aggregation.blockwise import SpilledUpdates, robust_aggregate

    rng = np.random.default_rng(7)
    shared, extra = rng.normal(0, 1, 40), rng.normal(0, 1, 400)
    with SpilledUpdates(block_bytes=1024) as spilled:
        for k in range(10):
            tensors = {"shared": shared + rng.normal(0, 0.1, 40)}
            if k % 3 == 1:  # three devices have a second, much larger modality-specific tensor
                tensors["extra"] = extra + rng.normal(0, 0.1, 400)
            if k == 0:  # one attacker, holding only the small tensor
                tensors = {"shared": 10 * tensors["shared"]}
            spilled.add(f"c{k}", tensors, 1.0)
        result = robust_aggregate(spilled, "median", exclude_above=3)
    assert result.excluded == frozenset({"c0"})
    assert max(score for client, score in result.scores.items() if client != "c0") < 2



# ---------------------------------------------------------------------------------------------------
# exclusion by direction


def _flipped_round(seed: int, spread: float = 1.5) -> tuple[SpilledUpdates, dict[str, np.ndarray]]:
    """8 honest clients around a common mean with noise ``spread`` times its scale, 2 sending a sign-flipped
    honest update: at this spread the flipped ones are only about 1.4 times as far from the median as
    the honest ones (the benchmark's case), while pointing the other way."""
    rng = np.random.default_rng(seed)
    mean = {"enc": rng.normal(size=(40, 10)), "head": rng.normal(size=100)}
    spilled = SpilledUpdates(block_bytes=1024)
    for index in range(CLEAN + ATTACKERS):
        update = {name: m + rng.normal(scale=spread, size=m.shape) for name, m in mean.items()}
        if index >= CLEAN:
            update = {name: -t for name, t in update.items()}
        spilled.add(f"attacker{index - CLEAN}" if index >= CLEAN else f"clean{index}", update, 1.0 + index % 3)
    return spilled, mean


@pytest.mark.parametrize("rule", ROBUST_RULES)
def test_a_sign_flip_the_distance_score_lets_through_is_left_out_by_its_cosine(rule: str) -> None:
    spilled, _ = _flipped_round(31)
    attackers, honest = {"attacker0", "attacker1"}, {f"clean{i}" for i in range(CLEAN)}
    with spilled:
        by_score = robust_aggregate(spilled, rule, trim=0.2, exclude_above=2.0)
        assert by_score.excluded == frozenset()  # the distance alone does not separate them
        assert max(by_score.scores[c] for c in attackers) < 2.0
        assert list(by_score.cosines) == spilled.clients
        assert max(by_score.cosines[c] for c in attackers) < 0 < min(by_score.cosines[c] for c in honest)

        by_direction = robust_aggregate(spilled, rule, trim=0.2, exclude_above=2.0, exclude_cosine_below=0.0)
        assert by_direction.excluded == attackers
        assert by_direction.cosines == by_score.cosines and by_direction.scores == by_score.scores
        rule_fn = weighted_median if rule == "median" else partial(weighted_trimmed_mean, trim=0.2)
        honest_only = spilled.reduce(rule_fn, exclude=attackers)
        for name, tensor in honest_only.items():
            np.testing.assert_array_equal(by_direction.tensors[name], tensor)


def test_leaving_out_the_sign_flips_undoes_the_medians_shrinking_of_the_honest_direction() -> None:
    spilled, mean = _flipped_round(32)
    with spilled:
        kept = robust_aggregate(spilled, "median")
        screened = robust_aggregate(spilled, "median", exclude_cosine_below=0.0)
    assert screened.excluded == {"attacker0", "attacker1"}
    # Two flipped values on one side pull every coordinate's median toward zero: the aggregate keeps only
    # about 70% of the honest mean's length along it (the slower learning the benchmark measures).
    assert _along(kept.tensors, mean) < 0.8 < 0.9 < _along(screened.tensors, mean) < 1.1


def _along(result: dict[str, np.ndarray], mean: dict[str, np.ndarray]) -> float:
    """The length of ``result``'s projection on ``mean``, in units of ``mean``'s length."""
    return sum(float(np.sum(result[n] * mean[n])) for n in mean) / sum(float(np.sum(mean[n] ** 2)) for n in mean)


def test_cosines_are_size_weighted_over_the_tensors_each_client_holds() -> None:
    rng = np.random.default_rng(9)
    with SpilledUpdates(block_bytes=64) as spilled:
        for k in range(5):
            tensors = {"small": rng.normal(1.0, 0.1, 10), "large": rng.normal(1.0, 0.1, 90)}
            if k == 0:  # agrees on the small tensor, opposes on the large one
                tensors["large"] = -tensors["large"]
            if k == 1:  # holds the small tensor only
                del tensors["large"]
            spilled.add(f"c{k}", tensors, 1.0)
        result = robust_aggregate(spilled, "median", exclude_cosine_below=0.0)
        per_tensor = spilled.tensor_cosines(spilled.reduce(weighted_median))  # against everyone's median
    small, large = per_tensor["small"]["c0"], per_tensor["large"]["c0"]
    assert small > 0 > large
    assert result.cosines["c0"] == pytest.approx((10 * small + 90 * large) / 100)
    assert result.cosines["c1"] == pytest.approx(per_tensor["small"]["c1"])
    assert result.excluded == {"c0"}


def test_a_tensor_nobody_changed_does_not_make_anyone_point_away() -> None:
    rng = np.random.default_rng(10)
    with SpilledUpdates() as spilled:
        for k in range(4):
            spilled.add(f"c{k}", {"frozen": np.zeros(50), "trained": 1.0 + rng.normal(0, 0.1, 5)}, 1.0)
        result = robust_aggregate(spilled, "median", exclude_cosine_below=0.9)
    assert result.excluded == frozenset()
    assert min(result.cosines.values()) > 0.9  # the frozen tensor counts as agreement (both norms zero)


@pytest.mark.parametrize("threshold", [1.0, -1.5, float("nan")])
def test_a_cosine_threshold_outside_its_range_is_refused_before_any_pass(threshold: float) -> None:
    with SpilledUpdates() as spilled:
        spilled.add("a", {"w": np.ones(2)}, 1.0)
        with pytest.raises(AggregationError, match=r"exclude_cosine_below: a cosine threshold must be in \[-1, 1\)"):
            robust_aggregate(spilled, "median", exclude_cosine_below=threshold)


def test_excluding_every_client_by_direction_is_refused_naming_both_thresholds() -> None:
    with SpilledUpdates() as spilled:
        spilled.add("a", {"w": np.array([1.0, 0.0])}, 1.0)
        spilled.add("b", {"w": np.array([0.0, 1.0])}, 1.0)  # the median (0.5, 0.5) is 45° from both
        with pytest.raises(AggregationError, match=r"exclude_above=None or has a cosine below "
                                                   r"exclude_cosine_below=0\.9: nothing left"):
            robust_aggregate(spilled, "median", exclude_cosine_below=0.9)
