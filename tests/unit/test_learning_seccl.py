"""SE-CCL: the fixed text -> fused projection, the two InfoNCE anchor losses and the published anchor set."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mlecs.learning.seccl import (
    SAMPLE_ANCHOR_IDS,
    SAMPLE_ANCHORS,
    TEXT_ANCHORS,
    Anchors,
    class_anchor_loss,
    project_class_anchors,
    sample_anchor_loss,
)


def _cosines(rows: np.ndarray) -> np.ndarray:
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit @ unit.T


# --- project_class_anchors ---------------------------------------------------------------------------------


def test_projection_has_the_fused_shape_unit_rows_and_is_deterministic() -> None:
    text = np.random.default_rng(0).standard_normal((10, 384)).astype(np.float32)

    first = project_class_anchors(text, 256)
    second = project_class_anchors(text.copy(), 256)

    assert first.shape == (10, 256) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), np.ones(10), atol=1e-5)
    np.testing.assert_array_equal(first, second)


def test_identical_text_rows_project_identically_and_distinct_rows_stay_distinct() -> None:
    rng = np.random.default_rng(1)
    text = rng.standard_normal((6, 384)).astype(np.float32)
    text[3] = text[1]

    projected = project_class_anchors(text, 256)

    np.testing.assert_array_equal(projected[3], projected[1])
    similarity = projected @ projected.T
    off_diagonal = similarity[~np.eye(6, dtype=bool)]
    assert similarity[1, 3] == pytest.approx(1.0, abs=1e-5)
    # Every pair other than (1, 3) came from independent random vectors: nearly orthogonal in 384-d,
    # and a projection onto a 256-d subspace keeps them far from identical.
    others = off_diagonal[np.abs(off_diagonal - 1.0) > 1e-4]
    assert len(others) == 30 - 2
    assert np.max(np.abs(others)) < 0.3


def test_projection_roughly_preserves_the_cosine_structure_of_the_text_anchors() -> None:
    rng = np.random.default_rng(2)
    base = rng.standard_normal((1, 384))
    # Rows at graded similarity to a common direction: cosines spread over a wide range.
    text = (base * np.linspace(0.0, 3.0, 8)[:, None] + rng.standard_normal((8, 384))).astype(np.float32)

    before = _cosines(text)[np.triu_indices(8, 1)]
    after = (project_class_anchors(text, 256) @ project_class_anchors(text, 256).T)[np.triu_indices(8, 1)]

    assert np.corrcoef(before, after)[0, 1] > 0.98
    assert np.max(np.abs(before - after)) < 0.15


def test_projection_into_a_wider_space_preserves_cosines_exactly() -> None:
    text = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)

    projected = project_class_anchors(text, 32)

    assert projected.shape == (5, 32)
    np.testing.assert_allclose(projected @ projected.T, _cosines(text), atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 384), (384,), (2, 3, 4)])
def test_projection_rejects_fewer_than_two_classes_or_a_wrong_rank(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="text anchors"):
        project_class_anchors(np.ones(shape, dtype=np.float32), 16)


# --- sample_anchor_loss ------------------------------------------------------------------------------------


def test_sample_anchor_loss_matches_the_hand_computed_infonce() -> None:
    anchors = torch.eye(4)

    aligned = sample_anchor_loss(anchors * 5.0, anchors, temperature=0.5)  # scale does not matter
    shuffled = sample_anchor_loss(anchors[[1, 2, 3, 0]], anchors, temperature=0.5)

    # Cosine 1 with its own anchor and 0 with the three others, logits 2 and 0.
    assert aligned.item() == pytest.approx(math.log(1 + 3 * math.exp(-2)), rel=1e-5)
    assert shuffled.item() == pytest.approx(math.log(math.exp(2) + 3), rel=1e-5)


def test_sample_anchor_loss_is_lower_for_matching_rows_than_for_permuted_rows() -> None:
    anchors = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))

    matched = sample_anchor_loss(anchors.clone(), anchors, temperature=0.1)
    permuted = sample_anchor_loss(anchors[torch.arange(8).roll(1)], anchors, temperature=0.1)

    assert matched.item() < 0.5 < permuted.item()


def test_sgd_on_a_free_tensor_reduces_the_sample_anchor_loss() -> None:
    generator = torch.Generator().manual_seed(1)
    fused = torch.randn(6, 8, generator=generator, requires_grad=True)
    anchors = torch.randn(6, 8, generator=generator)
    optimiser = torch.optim.SGD([fused], lr=0.5)

    losses = []
    for _ in range(20):
        loss = sample_anchor_loss(fused, anchors, temperature=0.2)
        losses.append(loss.item())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    assert losses[-1] < 0.5 * losses[0]
    assert all(later <= earlier + 1e-6 for earlier, later in itertools.pairwise(losses))


def test_no_gradient_flows_into_the_sample_anchors() -> None:
    fused = torch.randn(4, 8, requires_grad=True)
    anchors = torch.randn(4, 8, requires_grad=True)

    sample_anchor_loss(fused, anchors, temperature=0.1).backward()

    assert anchors.grad is None
    assert fused.grad is not None and torch.count_nonzero(fused.grad) > 0


def test_a_single_row_gives_a_zero_loss_that_keeps_the_graph() -> None:
    fused = torch.randn(1, 8, requires_grad=True)

    loss = sample_anchor_loss(fused, torch.randn(1, 8), temperature=0.1)

    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert fused.grad is not None and torch.count_nonzero(fused.grad) == 0


def test_sample_anchor_loss_rejects_mismatched_shapes_and_bad_temperatures() -> None:
    with pytest.raises(ValueError, match="shape"):
        sample_anchor_loss(torch.zeros(3, 4), torch.zeros(3, 5), temperature=0.1)
    for temperature in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            sample_anchor_loss(torch.zeros(3, 4), torch.zeros(3, 4), temperature=temperature)


# --- class_anchor_loss -------------------------------------------------------------------------------------


def test_class_anchor_loss_is_low_when_each_z_equals_its_class_anchor() -> None:
    classes = torch.eye(3, 6)
    labels = torch.tensor([0, 2, 1, 1])

    right = class_anchor_loss(classes[labels] * 3.0, labels, classes, temperature=0.1)
    wrong = class_anchor_loss(classes[(labels + 1) % 3], labels, classes, temperature=0.1)

    # Orthonormal anchors: logit 10 for the matching class and 0 for the other two.
    assert right.item() == pytest.approx(math.log(1 + 2 * math.exp(-10)), rel=1e-3)
    assert wrong.item() == pytest.approx(math.log(math.exp(10) + 2), rel=1e-5)


def test_class_anchor_loss_picks_the_nearest_class_among_noisy_anchors() -> None:
    generator = torch.Generator().manual_seed(3)
    classes = torch.randn(10, 32, generator=generator)
    fused = classes[7:8] + 0.1 * torch.randn(1, 32, generator=generator)

    losses = [class_anchor_loss(fused, torch.tensor([label]), classes, temperature=0.1).item() for label in range(10)]

    assert int(np.argmin(losses)) == 7


def test_class_anchor_loss_does_not_train_the_anchors() -> None:
    classes = torch.randn(3, 4, requires_grad=True)
    fused = torch.randn(5, 4, requires_grad=True)

    class_anchor_loss(fused, torch.tensor([0, 1, 2, 0, 1]), classes, temperature=0.2).backward()

    assert classes.grad is None and fused.grad is not None


# --- Anchors -----------------------------------------------------------------------------------------------


def _anchors(ids: list[int], dim: int = 4, text: np.ndarray | None = None) -> Anchors:
    fused = np.arange(len(ids) * dim, dtype=np.float32).reshape(len(ids), dim)
    return Anchors(sample_ids=np.asarray(ids, dtype=np.int64), fused=fused, text=text)


@pytest.mark.parametrize(
    ("ids", "fused", "match"),
    [
        (np.array([1, 2, 2]), np.zeros((3, 4), np.float32), "unique"),
        (np.array([1, 2]), np.zeros((3, 4), np.float32), "ids"),
        (np.array([[1, 2]]), np.zeros((2, 4), np.float32), "ids"),
        (np.array([1, 2]), np.zeros(2, np.float32), "ids"),
    ],
)
def test_anchors_reject_duplicate_ids_and_inconsistent_shapes(ids: np.ndarray, fused: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Anchors(sample_ids=ids, fused=fused)


def test_anchors_round_trip_through_named_tensors() -> None:
    text = np.random.default_rng(0).standard_normal((10, 384)).astype(np.float32)
    anchors = _anchors([7, 3, 2999], text=text)

    tensors = anchors.to_tensors()
    restored = Anchors.from_tensors(tensors, fused_dim=4)

    assert set(tensors) == {TEXT_ANCHORS, SAMPLE_ANCHOR_IDS, SAMPLE_ANCHORS}
    assert tensors[SAMPLE_ANCHOR_IDS].dtype == np.float32
    np.testing.assert_array_equal(tensors[SAMPLE_ANCHOR_IDS], [7.0, 3.0, 2999.0])
    assert restored.sample_ids.dtype == np.int64
    np.testing.assert_array_equal(restored.sample_ids, [7, 3, 2999])
    np.testing.assert_array_equal(restored.fused, anchors.fused)
    assert restored.text is not None
    np.testing.assert_array_equal(restored.text, text)


def test_anchor_parts_may_be_absent() -> None:
    text_only = Anchors(np.zeros(0, np.int64), np.zeros((0, 8), np.float32), np.ones((2, 3), np.float32))

    tensors = text_only.to_tensors()
    restored = Anchors.from_tensors(tensors, fused_dim=8)
    empty = Anchors.from_tensors({}, fused_dim=8)

    assert set(tensors) == {TEXT_ANCHORS}
    assert restored.sample_ids.shape == (0,) and restored.fused.shape == (0, 8)
    assert empty.text is None and empty.fused.shape == (0, 8) and empty.to_tensors() == {}
    samples_only = _anchors([1, 2]).to_tensors()
    assert set(samples_only) == {SAMPLE_ANCHOR_IDS, SAMPLE_ANCHORS}


@pytest.mark.parametrize("ids", [[1.5, 2.0], [-1.0, 2.0]])
def test_from_tensors_rejects_ids_that_are_not_non_negative_integers(ids: list[float]) -> None:
    tensors = {SAMPLE_ANCHOR_IDS: np.asarray(ids, np.float32), SAMPLE_ANCHORS: np.zeros((2, 4), np.float32)}

    with pytest.raises(ValueError, match="non-negative integers"):
        Anchors.from_tensors(tensors, fused_dim=4)


def test_lookup_returns_the_positions_that_have_an_anchor_and_their_rows() -> None:
    anchors = _anchors([30, 10, 20])  # rows [0..3], [4..7], [8..11], ids deliberately unsorted

    positions, found = anchors.lookup(np.array([20, 99, 30, 5, 20]))

    np.testing.assert_array_equal(positions, [0, 2, 4])
    np.testing.assert_array_equal(found, anchors.fused[[2, 0, 2]])


def test_lookup_with_no_hits_or_no_anchors_returns_empty_results() -> None:
    positions, found = _anchors([1, 2]).lookup(np.array([100, 0, 3]))
    assert positions.shape == (0,) and found.shape == (0, 4)

    empty = Anchors(np.zeros(0, np.int64), np.zeros((0, 4), np.float32))
    positions, found = empty.lookup(np.array([1, 2]))
    assert positions.shape == (0,) and found.shape == (0, 4)

    positions, found = _anchors([1, 2]).lookup(np.zeros(0, np.int64))
    assert positions.shape == (0,) and found.shape == (0, 4)


def test_anchor_sets_of_the_wrong_width_are_refused_when_read() -> None:
    tensors = {SAMPLE_ANCHOR_IDS: np.arange(3, dtype=np.float32), SAMPLE_ANCHORS: np.ones((3, 8), np.float32)}

    assert Anchors.from_tensors(tensors, fused_dim=8).fused.shape == (3, 8)
    with pytest.raises(ValueError, match=r"expected \[N, 16\]"):
        Anchors.from_tensors(tensors, fused_dim=16)
    with pytest.raises(ValueError, match="text anchors"):
        Anchors.from_tensors({TEXT_ANCHORS: np.ones(4, np.float32)}, fused_dim=8)
