"""The cloud's side of SE-CCL: averaging the edges' uploads, tuning toward them, and generating the anchors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlecs.data.avmnist import AVMnistSplit, load_avmnist_tiny
from mlecs.learning.cloud import CloudRecipe, generate_anchors, mean_edge_fused, tune_cloud
from mlecs.learning.supervised import fused_representations
from mlecs.modality import Modality
from mlecs.model import EdgeModel, ModelConfig, build_edge_model

TINY = ModelConfig(backbone="tiny")
BOTH = frozenset(Modality)

# --- mean_edge_fused ---------------------------------------------------------------------------------------


def test_mean_edge_fused_averages_unit_vectors_per_id() -> None:
    first = (np.array([2, 1]), np.array([[1.0, 0.0], [3.0, 4.0]]))
    second = (np.array([2, 5]), np.array([[0.0, 2.0], [0.0, -7.0]]))

    ids, z = mean_edge_fused([first, second])

    assert ids.dtype == np.int64 and z.dtype == np.float32
    np.testing.assert_array_equal(ids, [1, 2, 5])
    # id 1: (3, 4)/5; id 2: mean of (1, 0) and (0, 1); id 5: (0, -1)
    np.testing.assert_allclose(z, [[0.6, 0.8], [0.5, 0.5], [0.0, -1.0]], atol=1e-6)


def test_mean_edge_fused_skips_empty_uploads_and_handles_none_at_all() -> None:
    only = (np.array([4]), np.array([[0.0, 0.0, 2.0]]))
    empty = (np.zeros(0, np.int64), np.zeros((0, 3), np.float32))

    ids, z = mean_edge_fused([empty, only, empty])
    np.testing.assert_array_equal(ids, [4])
    np.testing.assert_allclose(z, [[0.0, 0.0, 1.0]])

    ids, z = mean_edge_fused([empty])
    assert ids.shape == (0,) and z.shape == (0, 0)
    ids, z = mean_edge_fused([])
    assert ids.shape == (0,) and z.shape == (0, 0)


def test_mean_edge_fused_of_a_zero_vector_stays_zero() -> None:
    ids, z = mean_edge_fused([(np.array([3, 3]), np.array([[0.0, 0.0], [0.0, 4.0]]))])

    np.testing.assert_array_equal(ids, [3])
    np.testing.assert_allclose(z, [[0.0, 0.5]])


# --- tune_cloud / generate_anchors -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def public() -> AVMnistSplit:
    return load_avmnist_tiny().train.subset(np.arange(0, 160, 2))


@pytest.fixture(scope="module")
def global_tensors() -> dict[str, np.ndarray]:
    return {name: value.numpy() for name, value in build_edge_model(TINY, BOTH, seed=0).shared_state().items()}


@pytest.fixture(scope="module")
def cloud() -> EdgeModel:
    return build_edge_model(TINY, BOTH, seed=0)


def _mean_cosine(model: EdgeModel, split: AVMnistSplit, targets: np.ndarray) -> float:
    z = fused_representations(model, split, BOTH).numpy()
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    return float(np.mean(np.sum(z * targets, axis=1)))


def test_tuning_toward_edge_uploads_pulls_the_cloud_z_toward_them(
    cloud: EdgeModel, public: AVMnistSplit, global_tensors: dict[str, np.ndarray]
) -> None:
    positions = np.arange(0, len(public), 2)  # half of the public ids were uploaded
    uploaded = public.subset(positions)
    # The edges' z: what a differently initialised model makes of those samples (structured, reachable).
    edge_z = fused_representations(build_edge_model(TINY, BOTH, seed=1), uploaded, BOTH).numpy()
    targets = edge_z / np.linalg.norm(edge_z, axis=1, keepdims=True)
    # The task loss shapes z directly through the head's skip path, so the pull gets a heavier weight
    # here than in training, where it is one term among several.
    recipe = CloudRecipe(epochs=3, learning_rate=3e-3, seccl_weight=3.0)

    cloud.load_shared_state({k: torch.from_numpy(v) for k, v in global_tensors.items()})
    before = _mean_cosine(cloud, uploaded, targets)
    stats = tune_cloud(cloud, global_tensors, public, recipe=recipe, seed=0,
                       edge_fused=(uploaded.sample_ids, edge_z))
    pulled = _mean_cosine(cloud, uploaded, targets)
    tune_cloud(cloud, global_tensors, public, recipe=recipe, seed=0)  # same run without the uploads
    unpulled = _mean_cosine(cloud, uploaded, targets)

    assert stats.samples == len(public)
    assert pulled > before + 0.1
    assert pulled > unpulled + 0.1


def test_tune_cloud_starts_from_the_global_tensors_and_is_deterministic(
    cloud: EdgeModel, public: AVMnistSplit, global_tensors: dict[str, np.ndarray]
) -> None:
    recipe = CloudRecipe(epochs=1, batch_size=40)
    text = np.random.default_rng(0).standard_normal((10, 384)).astype(np.float32)

    tune_cloud(cloud, global_tensors, public, recipe=recipe, seed=5, text_anchors=text)
    first = cloud.shared_state()
    tune_cloud(cloud, global_tensors, public, recipe=recipe, seed=5, text_anchors=text)  # from the tuned state
    second = cloud.shared_state()
    tune_cloud(cloud, global_tensors, public, recipe=recipe, seed=5)
    without_text = cloud.shared_state()

    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["connector.core.fuse.weight"], without_text["connector.core.fuse.weight"])
    assert not np.array_equal(first["head.weight"].numpy(), global_tensors["head.weight"])


def test_generate_anchors_covers_every_public_sample(cloud: EdgeModel, public: AVMnistSplit) -> None:
    text = np.random.default_rng(1).standard_normal((10, 384)).astype(np.float32)

    anchors = generate_anchors(cloud, public, text)

    np.testing.assert_array_equal(anchors.sample_ids, public.sample_ids)
    assert anchors.sample_ids.dtype == np.int64
    assert anchors.fused.shape == (len(public), TINY.fused_dim) and anchors.fused.dtype == np.float32
    np.testing.assert_allclose(anchors.fused, fused_representations(cloud, public, BOTH).numpy(), atol=1e-6)
    assert anchors.text is text
    positions, found = anchors.lookup(public.sample_ids[[5, 0]])
    np.testing.assert_array_equal(positions, [0, 1])
    np.testing.assert_array_equal(found, anchors.fused[[5, 0]])
    assert generate_anchors(cloud, public, None).text is None
