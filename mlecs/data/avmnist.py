"""Loads AV-MNIST (MNIST digits paired with FSDD spoken digits) as ready-to-train numpy arrays.

Two settings (see the data README): ``canonical`` uses the stored images and log-mel features;
``hard`` corrupts both modalities (see :mod:`mlecs.data.corruption`) and recomputes the log-mel from
the noisy raw audio. Nothing is cached on disk.

Audio features are standardised with fixed constants, one pair per setting, computed once over all
values of the setting's training split (2700 clips x 40 mels x 64 frames) and frozen here so that
every device normalises identically without seeing anyone else's data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from mlecs.data.corruption import add_white_noise, corrupt_images
from mlecs.data.logmel import logmel_of_clips, pcm16_to_float

Setting = Literal["canonical", "hard"]
SETTINGS: tuple[str, ...] = get_args(Setting)

DATA_DIR_ENV = "MLECS_DATA_DIR"
_DATA_SUBDIR = Path("shared") / "data" / "avmnist_fsdd"

# (mean, std) of the log-mel values of the training split, per setting (see the module docstring).
LOGMEL_MEAN_STD: dict[str, tuple[float, float]] = {
    "canonical": (-11.8505, 3.2282),
    "hard": (-10.0720, 4.4201),
}

TRAIN_SPLIT, TEST_SPLIT = 0, 1


@dataclass(frozen=True, eq=False)
class AVMnistSplit:
    """One split of paired samples; row ``i`` of every array describes the same sample."""

    images: np.ndarray
    """float32 [N, 1, 28, 28], pixels scaled to [0, 1]."""
    audio: np.ndarray
    """float32 [N, 1, 40, 64], log-mel standardised with :data:`LOGMEL_MEAN_STD`."""
    labels: np.ndarray
    """int64 [N], the digit 0-9."""
    speaker: np.ndarray
    """int64 [N], the FSDD speaker (0-5: george, jackson, lucas, nicolas, theo, yweweler)."""
    sample_ids: np.ndarray
    """int64 [N], the row of the sample in ``pairs.npz``: a stable id across settings and subsets."""

    def __post_init__(self) -> None:
        size = self.labels.shape[0]
        for name in ("images", "audio", "speaker", "sample_ids"):
            if getattr(self, name).shape[0] != size:
                raise ValueError(f"{name} has {getattr(self, name).shape[0]} rows, labels has {size}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> AVMnistSplit:
        """Returns the samples at ``index`` (positions in this split), in that order."""
        index = np.asarray(index, dtype=np.int64)
        return AVMnistSplit(
            images=self.images[index],
            audio=self.audio[index],
            labels=self.labels[index],
            speaker=self.speaker[index],
            sample_ids=self.sample_ids[index],
        )

    def input_arrays(self) -> dict[str, np.ndarray]:
        return {"image": self.images, "audio": self.audio}

    def presence(self) -> dict[str, np.ndarray]:
        return {}  # every pair has both modalities

    @classmethod
    def concatenate(cls, parts: Sequence[AVMnistSplit]) -> AVMnistSplit:
        return concatenate_splits(parts)


def concatenate_splits(parts: Sequence[AVMnistSplit]) -> AVMnistSplit:
    """Joins splits row-wise, in order (e.g. a device's private data and its public shard)."""
    if not parts:
        raise ValueError("concatenate_splits needs at least one split")
    return AVMnistSplit(**{name: np.concatenate([getattr(part, name) for part in parts])
                           for name in ("images", "audio", "labels", "speaker", "sample_ids")})


@dataclass(frozen=True, eq=False)
class AVMnist:
    """The train and test splits of one setting."""

    train: AVMnistSplit
    test: AVMnistSplit
    setting: str


def default_data_dir() -> Path:
    """Finds the AV-MNIST directory: ``$MLECS_DATA_DIR``, else ``shared/data/avmnist_fsdd`` near cwd/repo."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured)
    repo_root = Path(__file__).resolve().parents[2]
    candidates = [
        Path.cwd() / _DATA_SUBDIR,
        Path.cwd().parent / _DATA_SUBDIR,
        repo_root / _DATA_SUBDIR,
        repo_root.parent / _DATA_SUBDIR,
    ]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"AV-MNIST data not found (tried {tried}); set {DATA_DIR_ENV} to its directory")


def _check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}")


def _standardise(logmel: np.ndarray, setting: str) -> np.ndarray:
    mean, std = LOGMEL_MEAN_STD[setting]
    return ((logmel.astype(np.float32) - np.float32(mean)) / np.float32(std))[:, None]


def _pixels(images_u8: np.ndarray) -> np.ndarray:
    return images_u8.astype(np.float32) / np.float32(255.0)


def _split(
    images: np.ndarray,
    logmel: np.ndarray,
    labels: np.ndarray,
    speaker: np.ndarray,
    ids: np.ndarray,
    setting: str,
) -> AVMnistSplit:
    return AVMnistSplit(
        images=images.astype(np.float32, copy=False)[:, None],
        audio=_standardise(logmel, setting),
        labels=labels.astype(np.int64),
        speaker=speaker.astype(np.int64),
        sample_ids=ids.astype(np.int64),
    )


def _assemble(
    images: np.ndarray,
    logmel: np.ndarray,
    labels: np.ndarray,
    speaker: np.ndarray,
    ids: np.ndarray,
    split: np.ndarray,
    setting: str,
) -> AVMnist:
    parts = [
        _split(images[m], logmel[m], labels[m], speaker[m], ids[m], setting)
        for m in (split == TRAIN_SPLIT, split == TEST_SPLIT)
    ]
    return AVMnist(train=parts[0], test=parts[1], setting=setting)


def load_avmnist(data_dir: Path | None = None, setting: Setting = "canonical",
                 test_images_per_clip: int = 1) -> AVMnist:
    """Loads the 2700/300 train/test pairs of ``pairs.npz`` in the given setting.

    ``test_images_per_clip`` > 1 pairs every test clip with that many distinct MNIST images of its digit
    (its own and, after it, unused "spare" images) for a larger test split: 300 pairs give an accuracy
    with a standard error near 2.5 points, which hides the differences a benchmark looks for. The extra
    pairs get ids from ``3000 * k + row`` (k = 1, 2, ...), so in the hard setting each draws noise of its own.
    """
    _check_setting(setting)
    if not 1 <= test_images_per_clip <= _MAX_TEST_IMAGES_PER_CLIP:
        raise ValueError(f"test_images_per_clip must be from 1 to {_MAX_TEST_IMAGES_PER_CLIP}, "
                         f"got {test_images_per_clip!r}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    with np.load(root / "pairs.npz") as pairs:
        audio_idx, image_idx = pairs["audio_idx"], pairs["image_idx"]
        labels, speaker, split = pairs["labels"], pairs["speaker"], pairs["split"]
        spare = pairs["spare_image_idx"]
    ids = np.arange(labels.shape[0], dtype=np.int64)
    with np.load(root / "mnist_t10k.npz") as mnist:
        all_images, mnist_labels = mnist["images"], mnist["labels"]
    if test_images_per_clip > 1:
        audio_idx, image_idx, labels, speaker, split, ids = _extra_test_pairs(
            audio_idx, image_idx, labels, speaker, split, spare, mnist_labels, test_images_per_clip)
    images = _pixels(all_images[image_idx])
    if setting == "canonical":
        with np.load(root / "fsdd_logmel.npz") as stored:
            logmel = stored["logmel"][audio_idx]
    else:
        with np.load(root / "fsdd_audio.npz") as raw:
            samples, offsets = raw["audio"], raw["offsets"]
        clips = [pcm16_to_float(samples[offsets[i] : offsets[i + 1]]) for i in audio_idx]
        logmel = logmel_of_clips(add_white_noise(clips, ids))
        images = corrupt_images(images, ids)
    return _assemble(images, logmel, labels, speaker, ids, split, setting)


_MAX_TEST_IMAGES_PER_CLIP = 10


def _extra_test_pairs(audio_idx: np.ndarray, image_idx: np.ndarray, labels: np.ndarray, speaker: np.ndarray,
                      split: np.ndarray, spare: np.ndarray, mnist_labels: np.ndarray,
                      per_clip: int) -> tuple[np.ndarray, ...]:
    """Appends ``per_clip - 1`` more pairs per test clip, each with a spare image of the clip's digit."""
    rows = np.nonzero(split == TEST_SPLIT)[0]
    extra_images = np.empty((per_clip - 1, len(rows)), dtype=np.int64)
    for digit in np.unique(labels[rows]):
        clips = np.nonzero(labels[rows] == digit)[0]
        pool = spare[mnist_labels[spare] == digit]  # in stored order: the same pairs every time
        needed = (per_clip - 1) * len(clips)
        if len(pool) < needed:
            raise ValueError(f"only {len(pool)} spare images of digit {digit}, {needed} needed")
        extra_images[:, clips] = pool[:needed].reshape(per_clip - 1, len(clips))
    total = len(labels)
    extra_ids = (total * np.arange(1, per_clip)[:, None] + rows[None, :]).ravel()
    repeat = np.tile(rows, per_clip - 1)
    return (np.concatenate([audio_idx, audio_idx[repeat]]), np.concatenate([image_idx, extra_images.ravel()]),
            np.concatenate([labels, labels[repeat]]), np.concatenate([speaker, speaker[repeat]]),
            np.concatenate([split, split[repeat]]), np.concatenate([np.arange(total, dtype=np.int64), extra_ids]))


def load_avmnist_tiny(data_dir: Path | None = None, setting: Setting = "canonical") -> AVMnist:
    """Loads the 200-pair ``tiny.npz`` fixture (160 train / 40 test) with the same layout, for fast tests.

    Sample ids are the matching ``pairs.npz`` rows. In the hard setting the audio noise is mixed into
    the fixture's stored 1 s centre of each clip, so its features differ slightly from the full set's.
    """
    _check_setting(setting)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    with np.load(root / "pairs.npz") as pairs:
        row_of_audio = np.empty_like(pairs["audio_idx"])
        row_of_audio[pairs["audio_idx"]] = np.arange(pairs["audio_idx"].shape[0])
    with np.load(root / "tiny.npz") as tiny:
        images = _pixels(tiny["images"])
        labels, speaker, split = tiny["labels"], tiny["speaker"], tiny["split"]
        ids = row_of_audio[tiny["source_audio_idx"]].astype(np.int64)
        if setting == "canonical":
            logmel = tiny["logmel"]
        else:
            clips = list(pcm16_to_float(tiny["audio"]))
            logmel = logmel_of_clips(add_white_noise(clips, ids))
            images = corrupt_images(images, ids)
    return _assemble(images, logmel, labels, speaker, ids, split, setting)
