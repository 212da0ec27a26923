"""The AV-MNIST loader: shapes, splits, normalisation and the hard setting's corruptions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlecs.data.avmnist import (
    AVMnist,
    AVMnistSplit,
    default_data_dir,
    load_avmnist,
    load_avmnist_tiny,
)


@pytest.fixture(scope="module")
def canonical() -> AVMnist:
    return load_avmnist()


@pytest.fixture(scope="module")
def tiny_canonical() -> AVMnist:
    return load_avmnist_tiny()


@pytest.fixture(scope="module")
def tiny_hard() -> AVMnist:
    return load_avmnist_tiny(setting="hard")


def _check_split(split: AVMnistSplit, size: int) -> None:
    assert len(split) == size
    assert split.images.shape == (size, 1, 28, 28) and split.images.dtype == np.float32
    assert split.audio.shape == (size, 1, 40, 64) and split.audio.dtype == np.float32
    for name in ("labels", "speaker", "sample_ids"):
        assert getattr(split, name).shape == (size,) and getattr(split, name).dtype == np.int64
    assert split.images.min() >= 0.0 and split.images.max() <= 1.0


def test_canonical_setting_has_the_official_2700_300_split_with_documented_shapes(canonical: AVMnist) -> None:
    _check_split(canonical.train, 2700)
    _check_split(canonical.test, 300)

    assert canonical.setting == "canonical"
    assert np.bincount(canonical.train.labels).tolist() == [270] * 10
    assert np.bincount(canonical.test.labels).tolist() == [30] * 10
    assert not set(canonical.train.sample_ids) & set(canonical.test.sample_ids)


def test_canonical_audio_is_standardised_on_the_training_split(canonical: AVMnist) -> None:
    assert abs(float(canonical.train.audio.mean())) < 1e-3
    assert abs(float(canonical.train.audio.std()) - 1.0) < 1e-3


def test_sample_ids_are_rows_of_pairs_npz_so_images_match_their_source(canonical: AVMnist) -> None:
    root = default_data_dir()
    with np.load(root / "pairs.npz") as pairs, np.load(root / "mnist_t10k.npz") as mnist:
        row = int(canonical.test.sample_ids[7])
        source = mnist["images"][pairs["image_idx"][row]].astype(np.float32) / 255.0
        assert pairs["labels"][row] == canonical.test.labels[7]

    np.testing.assert_array_equal(canonical.test.images[7, 0], source)


def test_tiny_fixture_loads_with_the_same_layout_and_matching_sample_ids(
    tiny_canonical: AVMnist, canonical: AVMnist
) -> None:
    _check_split(tiny_canonical.train, 160)
    _check_split(tiny_canonical.test, 40)
    position = {int(s): i for i, s in enumerate(canonical.train.sample_ids)}
    rows = [position[int(s)] for s in tiny_canonical.train.sample_ids[:5]]

    np.testing.assert_array_equal(tiny_canonical.train.images[:5], canonical.train.images[rows])
    np.testing.assert_allclose(tiny_canonical.train.audio[:5], canonical.train.audio[rows], atol=1e-6)


def test_hard_setting_erases_half_the_pixels_and_adds_noise(tiny_canonical: AVMnist, tiny_hard: AVMnist) -> None:
    images = tiny_hard.train.images

    erased = (images == 0.0).reshape(len(images), -1).mean(axis=1)
    assert (erased >= 0.5).all()
    assert not np.array_equal(images, tiny_canonical.train.images)
    # Noise lights up background pixels that are exactly zero in the clean digits.
    background = tiny_canonical.train.images == 0.0
    assert (images[background] > 0).mean() > 0.2
    np.testing.assert_array_equal(tiny_hard.train.labels, tiny_canonical.train.labels)


def test_hard_setting_audio_features_are_recomputed_from_noisy_clips(
    tiny_canonical: AVMnist, tiny_hard: AVMnist
) -> None:
    difference = np.abs(tiny_hard.train.audio - tiny_canonical.train.audio).mean()

    assert difference > 0.1
    assert np.isfinite(tiny_hard.train.audio).all()


def test_hard_setting_noise_is_reproducible(tiny_hard: AVMnist) -> None:
    again = load_avmnist_tiny(setting="hard")

    np.testing.assert_array_equal(again.train.images, tiny_hard.train.images)
    np.testing.assert_array_equal(again.test.audio, tiny_hard.test.audio)


def test_hard_image_noise_depends_only_on_the_sample_id(tiny_hard: AVMnist) -> None:
    full = load_avmnist(setting="hard")
    _check_split(full.train, 2700)
    position = {int(s): i for i, s in enumerate(full.test.sample_ids)}
    rows = [position[int(s)] for s in tiny_hard.test.sample_ids]

    np.testing.assert_array_equal(full.test.images[rows], tiny_hard.test.images)


def test_subset_keeps_rows_aligned_across_arrays(canonical: AVMnist) -> None:
    index = np.array([5, 0, 42])

    part = canonical.train.subset(index)

    assert len(part) == 3
    np.testing.assert_array_equal(part.sample_ids, canonical.train.sample_ids[index])
    np.testing.assert_array_equal(part.audio, canonical.train.audio[index])


def test_unknown_setting_is_rejected() -> None:
    with pytest.raises(ValueError, match="setting"):
        load_avmnist(setting="noisy")  # type: ignore[arg-type]


def test_data_dir_comes_from_the_environment_when_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLECS_DATA_DIR", str(tmp_path))

    assert default_data_dir() == tmp_path


def test_missing_data_dir_error_says_to_set_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLECS_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mlecs.data.avmnist.__file__", str(tmp_path / "a" / "b" / "c.py"))

    with pytest.raises(FileNotFoundError, match="MLECS_DATA_DIR"):
        default_data_dir()


def test_more_test_images_per_clip_add_pairs_of_the_same_digit_with_unused_images(canonical: AVMnist) -> None:
    from mlecs.data.avmnist import concatenate_splits

    larger = load_avmnist(test_images_per_clip=3)

    assert len(larger.test) == 3 * len(canonical.test) and len(larger.train) == len(canonical.train)
    np.testing.assert_array_equal(larger.test.images[:300], canonical.test.images)
    extra = larger.test.subset(np.arange(300, 900))
    np.testing.assert_array_equal(extra.labels, np.tile(canonical.test.labels, 2))
    np.testing.assert_array_equal(extra.audio[:300], canonical.test.audio)  # the same clips, other images
    assert len(np.unique(larger.test.sample_ids)) == 900 and extra.sample_ids.min() >= 3000
    # No extra image is one a training or original test pair uses.
    flat = {img.tobytes() for img in concatenate_splits([canonical.train, canonical.test]).images}
    assert not any(img.tobytes() in flat for img in extra.images)
    with pytest.raises(ValueError, match="test_images_per_clip"):
        load_avmnist(test_images_per_clip=0)
