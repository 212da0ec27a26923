"""MMA's noise term: anchor agreement, the quality factors made from it, and how they scale MMA's weights."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlecs.aggregation import AggregationError, ClientUpdate, mma, mma_weights
from mlecs.aggregation.quality import agreement_weights, anchor_agreement

# --- anchor_agreement --------------------------------------------------------------------------------------


def test_identical_opposite_and_orthogonal_rows_agree_1_minus_1_and_0() -> None:
    anchors = np.array([[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]])

    assert anchor_agreement(anchors, anchors) == pytest.approx(1.0)
    assert anchor_agreement(-anchors, anchors) == pytest.approx(-1.0)
    assert anchor_agreement(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[0.0, 5.0], [3.0, 0.0]])) == 0.0


def test_agreement_is_the_mean_row_cosine_and_ignores_scale() -> None:
    fused = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    anchors = np.array([[7.0, 0.0], [1.0, 0.0], [0.0, 0.5]])

    # Cosines 1, 0 and 1/sqrt(2).
    assert anchor_agreement(fused, anchors) == pytest.approx((1.0 + 0.0 + 1 / math.sqrt(2)) / 3)


def test_a_zero_row_counts_as_no_agreement() -> None:
    assert anchor_agreement(np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([[1.0, 0.0], [1.0, 0.0]])) == 0.5


@pytest.mark.parametrize(
    ("fused", "anchors"),
    [
        (np.ones((2, 3)), np.ones((2, 4))),
        (np.ones((2, 3)), np.ones((3, 3))),
        (np.zeros((0, 3)), np.zeros((0, 3))),
        (np.ones(3), np.ones(3)),
    ],
)
def test_agreement_rejects_mismatched_or_empty_arrays(fused: np.ndarray, anchors: np.ndarray) -> None:
    with pytest.raises(AggregationError, match="agreement needs"):
        anchor_agreement(fused, anchors)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_agreement_rejects_non_finite_representations(bad: float) -> None:
    fused = np.array([[1.0, bad], [1.0, 0.0]])

    with pytest.raises(AggregationError, match="non-finite"):
        anchor_agreement(fused, np.ones((2, 2)))


# --- agreement_weights -------------------------------------------------------------------------------------


def test_the_best_client_gets_1_and_one_temperature_below_gets_1_over_e() -> None:
    weights = agreement_weights([0.9, 0.7, 0.5], temperature=0.2)

    assert weights == pytest.approx([1.0, math.exp(-1), math.exp(-2)])


def test_equal_agreements_give_equal_weights_even_when_negative() -> None:
    assert agreement_weights([-0.3, -0.3], temperature=0.5) == [1.0, 1.0]


def test_a_client_without_evidence_gets_the_mean_factor_of_the_others() -> None:
    weights = agreement_weights([0.5, None, 0.3], temperature=0.1)

    assert weights == pytest.approx([1.0, (1.0 + math.exp(-2)) / 2, math.exp(-2)])


def test_without_any_evidence_every_client_weighs_1() -> None:
    assert agreement_weights([None, None, None]) == [1.0, 1.0, 1.0]
    assert agreement_weights([]) == []


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan")])
def test_agreement_weights_reject_a_non_positive_temperature(temperature: float) -> None:
    with pytest.raises(AggregationError, match="temperature"):
        agreement_weights([0.1, 0.2], temperature=temperature)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_agreement_weights_reject_non_finite_agreements(bad: float) -> None:
    with pytest.raises(AggregationError, match="finite"):
        agreement_weights([0.1, bad, None])


# --- mma_weights with quality ------------------------------------------------------------------------------


def _update(client_id: str, modalities: tuple[str, ...], samples: int, value: float = 0.0) -> ClientUpdate:
    return ClientUpdate(client_id, {"w": np.full(2, value, np.float32)}, samples, frozenset(modalities))


def test_quality_multiplies_the_modality_and_sample_weights() -> None:
    updates = [_update("a", ("image", "audio"), 10), _update("b", ("image",), 10)]

    assert mma_weights(updates) == pytest.approx([2 / 3, 1 / 3])
    # raw 2*10*1 = 20 and 1*10*0.5 = 5
    assert mma_weights(updates, quality=[1.0, 0.5]) == pytest.approx([0.8, 0.2])


def test_quality_also_applies_without_sample_counts() -> None:
    updates = [_update("a", ("image", "audio"), 10), _update("b", ("image",), 30)]

    # raw 2*1 = 2 and 1*2 = 2; with sample counts: 2*10*1 = 20 and 1*30*2 = 60
    assert mma_weights(updates, use_sample_counts=False, quality=[1.0, 2.0]) == pytest.approx([0.5, 0.5])
    assert mma_weights(updates, quality=[1.0, 2.0]) == pytest.approx([0.25, 0.75])


def test_a_zero_quality_removes_a_client_and_mma_averages_with_the_scaled_weights() -> None:
    updates = [_update("a", ("image", "audio"), 10, value=1.0), _update("b", ("image",), 10, value=0.0)]

    assert mma_weights(updates, quality=[0.0, 1.0]) == [0.0, 1.0]
    np.testing.assert_allclose(mma(updates, quality=[1.0, 0.5])["w"], [0.8, 0.8], rtol=1e-6)
    np.testing.assert_allclose(mma(updates)["w"], [2 / 3, 2 / 3], rtol=1e-6)


@pytest.mark.parametrize(
    ("quality", "match"),
    [
        ([1.0], "2 client updates"),
        ([1.0, 1.0, 1.0], "2 client updates"),
        ([1.0, -0.1], "non-negative"),
        ([1.0, float("nan")], "non-negative"),
        ([float("inf"), 1.0], "non-negative"),
        ([0.0, 0.0], "sum to zero"),
    ],
)
def test_mma_weights_reject_quality_that_does_not_fit(quality: list[float], match: str) -> None:
    updates = [_update("a", ("image", "audio"), 10), _update("b", ("image",), 10)]

    with pytest.raises(AggregationError, match=match):
        mma_weights(updates, quality=quality)


def test_agreement_is_judged_among_clients_with_the_same_modality_set() -> None:
    both, image = frozenset({"image", "audio"}), frozenset({"image"})
    # The image-only client agrees less with the all-modality anchors, as any would, but is the best
    # of its group; the second image-only client is one temperature below it.
    weights = agreement_weights([0.9, 0.5, 0.3], temperature=0.2, groups=[both, image, image])

    assert weights == pytest.approx([1.0, 1.0, np.exp(-1.0)])
    assert agreement_weights([0.9, 0.5, 0.3], temperature=0.2) == pytest.approx(
        [1.0, np.exp(-2.0), np.exp(-3.0)])


def test_grouped_agreement_gives_silent_clients_the_mean_factor_and_checks_lengths() -> None:
    weights = agreement_weights([0.8, 0.6, None], temperature=0.2, groups=["a", "a", "b"])

    assert weights == pytest.approx([1.0, np.exp(-1.0), (1.0 + np.exp(-1.0)) / 2])
    with pytest.raises(AggregationError, match="groups"):
        agreement_weights([0.8, 0.6], groups=["a"])
