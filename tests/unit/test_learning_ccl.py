import math

import pytest
import torch

from mlecs.learning.ccl import ccl_loss, pairwise_volumes, volume


def test_identical_unit_embeddings_span_zero_volume():
    v = torch.tensor([[0.6, 0.8, 0.0], [0.6, 0.8, 0.0]])
    assert volume(v).item() == pytest.approx(0.0, abs=1e-3)


def test_orthonormal_embeddings_span_volume_one():
    assert volume(torch.eye(3)).item() == pytest.approx(1.0, abs=1e-6)
    assert volume(torch.eye(4)[:2]).item() == pytest.approx(1.0, abs=1e-6)


def test_two_unit_vectors_at_angle_theta_span_sin_theta():
    theta = 0.3
    v = torch.tensor([[1.0, 0.0], [math.cos(theta), math.sin(theta)]])
    assert volume(v).item() == pytest.approx(math.sin(theta), abs=1e-5)


def test_pairwise_volumes_are_small_on_the_diagonal_for_aligned_pairs():
    torch.manual_seed(0)
    a = torch.randn(5, 8)
    vols = pairwise_volumes(a, [a + 0.01 * torch.randn(5, 8)])
    assert vols.shape == (5, 5)
    assert (vols.diagonal() < vols.masked_fill(torch.eye(5, dtype=torch.bool), 9).min(dim=1).values).all()


def test_a_gradient_step_lowers_positive_volumes_relative_to_negatives():
    torch.manual_seed(0)
    image = torch.randn(8, 16, requires_grad=True)
    audio = torch.randn(8, 16, requires_grad=True)
    both = torch.ones(8, dtype=torch.bool)

    def gap() -> float:
        vols = pairwise_volumes(image.detach(), [audio.detach()])
        negatives = vols[~torch.eye(8, dtype=torch.bool)].mean()
        return float(vols.diagonal().mean() - negatives)

    before = gap()
    optimiser = torch.optim.SGD([image, audio], lr=0.5)
    for _ in range(5):
        loss = ccl_loss({"image": image, "audio": audio}, {"image": both, "audio": both}, temperature=0.1)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert gap() < before


def test_samples_with_a_single_modality_are_skipped():
    image, audio = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    present = {"image": torch.ones(4, dtype=torch.bool), "audio": torch.zeros(4, dtype=torch.bool)}
    loss = ccl_loss({"image": image, "audio": audio}, present)
    assert loss.item() == 0.0
    loss.backward()  # still differentiable, so a training step can always add it
    assert image.grad is not None and torch.count_nonzero(image.grad) == 0


def test_only_samples_with_both_modalities_contribute():
    torch.manual_seed(1)
    image, audio = torch.randn(6, 8), torch.randn(6, 8)
    both = torch.tensor([True, True, True, True, False, False])
    mixed = ccl_loss({"image": image, "audio": audio}, {"image": torch.ones(6, dtype=torch.bool), "audio": both})
    alone = ccl_loss({"image": image[:4], "audio": audio[:4]},
                     {"image": torch.ones(4, dtype=torch.bool), "audio": torch.ones(4, dtype=torch.bool)})
    assert mixed.item() == pytest.approx(alone.item(), rel=1e-5)


def test_a_non_positive_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        ccl_loss({"image": torch.randn(2, 3)}, {"image": torch.ones(2, dtype=torch.bool)}, temperature=0)


def test_three_modalities_span_the_volume_of_three_vectors() -> None:
    e = torch.eye(4)
    assert volume(e[:3][None]).item() == pytest.approx(1.0, abs=1e-4)  # orthonormal: a unit cube
    assert volume(torch.stack([e[0], e[0], e[1]])[None]).item() == pytest.approx(0.0, abs=1e-3)  # two coincide
    tilted = torch.stack([e[0], e[1], torch.tensor([0.6, 0.0, 0.8, 0.0])])
    assert volume(tilted[None]).item() == pytest.approx(0.8, abs=1e-4)  # height of the third above the plane


def test_a_gradient_step_aligns_three_modalities() -> None:
    torch.manual_seed(0)
    embeddings = {m: torch.randn(8, 6, requires_grad=True) for m in ("accel", "audio", "image")}
    present = {m: torch.ones(8, dtype=torch.bool) for m in embeddings}
    before = ccl_loss(embeddings, present, temperature=0.1)
    before.backward()
    with torch.no_grad():
        stepped = {m: e - 0.5 * e.grad for m, e in embeddings.items()}  # type: ignore[operator]
    assert ccl_loss(stepped, present, temperature=0.1) < before



def test_anti_parallel_embeddings_span_zero_volume_so_ccl_cannot_tell_a_flipped_modality() -> None:
    """The volume measures the span, not the direction, as in GRAM: u and -u span a line, like u and u. So
    CCL scores a batch whose audio features are the image features negated exactly as a batch whose
    features coincide; telling a flipped modality apart is left to the task loss and SE-CCL's anchors
    (docs/method.md). A sign-aware volume would change this test on purpose."""
    torch.manual_seed(0)
    image = torch.randn(6, 8)
    assert volume(torch.stack([image[0], -image[0]])).item() == pytest.approx(0.0, abs=1e-3)
    present = {"image": torch.ones(6, dtype=torch.bool), "audio": torch.ones(6, dtype=torch.bool)}
    aligned = ccl_loss({"image": image, "audio": image.clone()}, present)
    flipped = ccl_loss({"image": image, "audio": -image}, present)
    unrelated = ccl_loss({"image": image, "audio": torch.randn(6, 8)}, present)
    assert flipped.item() == pytest.approx(aligned.item(), rel=1e-4)
    assert unrelated.item() > aligned.item() + 0.5  # the loss itself does separate aligned from unrelated
