"""Supervised training and evaluation of edge models on the tiny AV-MNIST fixture."""

from __future__ import annotations

import pytest
import torch

from mlecs.data.avmnist import AVMnist, load_avmnist_tiny
from mlecs.learning import evaluate, to_inputs, train_supervised
from mlecs.modality import Modality
from mlecs.model import ModelConfig, build_edge_model

TINY = ModelConfig(backbone="tiny")
BOTH = frozenset(Modality)
IMAGE = frozenset({Modality.IMAGE})


@pytest.fixture(scope="module")
def data() -> AVMnist:
    return load_avmnist_tiny()


def test_a_few_epochs_reduce_the_training_loss(data: AVMnist) -> None:
    model = build_edge_model(TINY, BOTH, seed=0)

    first = train_supervised(model, data.train, BOTH, epochs=1, batch_size=32, learning_rate=2e-3, seed=0)
    later = train_supervised(model, data.train, BOTH, epochs=3, batch_size=32, learning_rate=2e-3, seed=1)

    assert later.loss < first.loss
    assert later.samples == len(data.train) and later.seconds > 0


def test_training_is_deterministic_given_the_seed(data: AVMnist) -> None:
    states = []
    for _ in range(2):
        model = build_edge_model(TINY, BOTH, seed=0)
        train_supervised(model, data.train, BOTH, epochs=1, batch_size=32, learning_rate=1e-3, seed=9)
        states.append(model.shared_state())

    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])


def test_training_with_one_modality_leaves_the_other_extractor_unchanged(data: AVMnist) -> None:
    model = build_edge_model(TINY, BOTH, seed=0)
    before = model.shared_state()

    train_supervised(model, data.train, IMAGE, epochs=1, batch_size=64, learning_rate=1e-3, seed=0, parameters="shared")

    after = model.shared_state()
    assert not torch.equal(after["extractors.image.conv1.weight"], before["extractors.image.conv1.weight"])
    assert torch.equal(after["extractors.audio.conv1.weight"], before["extractors.audio.conv1.weight"])


def test_progress_is_reported_for_every_step(data: AVMnist) -> None:
    model = build_edge_model(TINY, IMAGE, seed=0)
    calls: list[tuple[int, int, float]] = []

    train_supervised(
        model,
        data.train,
        IMAGE,
        epochs=2,
        batch_size=64,
        learning_rate=1e-3,
        seed=0,
        progress=lambda step, total, loss: calls.append((step, total, loss)),
    )

    assert [c[0] for c in calls] == list(range(1, 7)) and all(c[1] == 6 for c in calls)


def test_evaluate_returns_an_accuracy_and_restores_the_training_mode(data: AVMnist) -> None:
    model = build_edge_model(TINY, BOTH, seed=0).train()

    accuracy = evaluate(model, data.test, IMAGE, batch_size=16)

    assert 0.0 <= accuracy <= 1.0
    assert model.training


def test_training_rejects_modalities_the_model_lacks(data: AVMnist) -> None:
    model = build_edge_model(TINY, IMAGE, seed=0)

    with pytest.raises(ValueError, match="no extractor for"):
        train_supervised(model, data.train, BOTH, epochs=1, batch_size=32, learning_rate=1e-3, seed=0)


def test_to_inputs_returns_only_the_requested_modalities(data: AVMnist) -> None:
    inputs = to_inputs(data.test, IMAGE)

    assert list(inputs) == [Modality.IMAGE]
    assert inputs[Modality.IMAGE].shape == (len(data.test), 1, 28, 28)


def _paired_volume(model, data: AVMnist) -> float:
    from mlecs.learning.ccl import pairwise_volumes

    with torch.no_grad():
        features = model(to_inputs(data.test, BOTH)).features
    vols = pairwise_volumes(features[Modality.IMAGE], [features[Modality.AUDIO]])
    off = ~torch.eye(len(vols), dtype=torch.bool)
    return float(vols.diagonal().mean() - vols[off].mean())


def test_ccl_in_training_aligns_the_modalities_of_the_same_sample(data: AVMnist) -> None:
    gaps = {}
    for weight in (0.0, 1.0):
        model = build_edge_model(TINY, BOTH, seed=0)
        train_supervised(model, data.train, BOTH, epochs=3, batch_size=32, learning_rate=2e-3, seed=0,
                         ccl_weight=weight)
        model.eval()
        gaps[weight] = _paired_volume(model, data)
    # Same-sample volumes shrink relative to other pairs when the CCL term is on (held-out samples).
    assert gaps[1.0] < gaps[0.0]


def test_ccl_has_no_effect_when_only_one_modality_is_fed(data: AVMnist) -> None:
    states = []
    for weight in (0.0, 1.0):
        model = build_edge_model(TINY, IMAGE, seed=0)
        train_supervised(model, data.train, IMAGE, epochs=1, batch_size=32, learning_rate=1e-3, seed=3,
                         ccl_weight=weight)
        states.append(model.shared_state())
    assert all(torch.equal(states[0][n], states[1][n]) for n in states[0])


def test_a_negative_ccl_weight_is_refused(data: AVMnist) -> None:
    with pytest.raises(ValueError, match="ccl_weight"):
        train_supervised(build_edge_model(TINY, IMAGE, seed=0), data.train, IMAGE, epochs=1, batch_size=8,
                         learning_rate=1e-3, seed=0, ccl_weight=-1)


# --- several groups, each fed its own modalities ---------------------------------------------------------


def test_groups_train_on_every_sample_each_with_its_own_modalities(data: AVMnist) -> None:
    import numpy as np

    from mlecs.learning.supervised import train_groups

    model = build_edge_model(TINY, BOTH, seed=0)
    image_only = data.train.subset(np.arange(0, 60))
    both = data.train.subset(np.arange(60, 160))
    seen: list[frozenset[Modality]] = []
    forward = model.forward

    def recording(inputs, present=None):  # type: ignore[no-untyped-def]
        seen.append(frozenset(inputs))
        return forward(inputs, present)

    model.forward = recording  # type: ignore[method-assign]
    stats = train_groups(model, [(image_only, IMAGE), (both, BOTH)], epochs=1, batch_size=20, learning_rate=1e-3,
                         seed=0)

    assert stats.samples == 160
    assert seen.count(IMAGE) == 3 and seen.count(BOTH) == 5
    assert seen != [IMAGE] * 3 + [BOTH] * 5  # the groups' batches are interleaved, not one group after the other


def test_after_epoch_sees_each_epoch_and_can_stop_training_early(data: AVMnist) -> None:
    from mlecs.learning.supervised import train_groups

    model = build_edge_model(TINY, BOTH, seed=0)
    epochs: list[int] = []

    def after(epoch: int) -> bool:
        epochs.append(epoch)
        return epoch == 2

    train_groups(model, [(data.train, BOTH)], epochs=5, batch_size=64, learning_rate=1e-3, seed=0, after_epoch=after)

    assert epochs == [1, 2]


def test_training_a_chosen_list_of_parameters_leaves_the_others_untouched(data: AVMnist) -> None:
    model = build_edge_model(TINY, BOTH, seed=0)
    before = model.shared_state()

    train_supervised(model, data.train, BOTH, epochs=1, batch_size=32, learning_rate=1e-2, seed=0,
                     parameters=model.shared_parameters(("head.",)))

    after = model.shared_state()
    assert not torch.equal(after["head.weight"], before["head.weight"])
    assert all(torch.equal(after[n], before[n]) for n in before if not n.startswith("head."))
    assert all(p.requires_grad for p in model.shared_parameters())
    with pytest.raises(ValueError, match="no parameters to train"):
        train_supervised(model, data.train, BOTH, epochs=1, batch_size=32, learning_rate=1e-3, seed=0, parameters=[])
