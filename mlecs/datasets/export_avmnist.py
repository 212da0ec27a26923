"""Writes AV-MNIST as dataset directories, so the example runs through the same path as a user's own data.

``DIR/public/`` is the public set (every training pair the partition calls public), ``DIR/test/`` the test
split, and ``DIR/device-K/`` device K's private shard with its held-out share marked ``heldout``; each is a
manifest plus PNG images and WAV clips. ``DIR/task.toml`` is the matching built-in task. Devices get their
share of the public set from the coordinator, which reads ``DIR/public``.

Canonical: the stored 8-bit images and the untouched 16-bit clips, so the features computed on a device
equal the loader's. Hard: the corrupted images are stored as 8-bit PNG (the noise is quantised to 1/255)
and the noisy clips as 32-bit float WAV (exact).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from mlecs.data.avmnist import TEST_SPLIT, TRAIN_SPLIT, AVMnistSplit, Setting, default_data_dir
from mlecs.data.corruption import add_white_noise, corrupt_images
from mlecs.data.logmel import SAMPLE_RATE, pcm16_to_float
from mlecs.data.partition import PartitionSpec, Scheme, plan_shards
from mlecs.datasets.dataset import MANIFEST
from mlecs.modality import Modality

TASK_OF_SETTING = {"canonical": "avmnist", "hard": "avmnist-hard"}
_COLUMNS = ("id", "label", "split", "image", "audio")


@dataclass(frozen=True)
class _Source:
    """Raw AV-MNIST: the pairs' 8-bit images, their clips, labels and stable ids (rows of ``pairs.npz``)."""

    images: np.ndarray
    clips: list[np.ndarray]
    labels: np.ndarray
    speaker: np.ndarray
    split: np.ndarray
    ids: np.ndarray


def _read_source(data_dir: Path) -> _Source:
    with np.load(data_dir / "pairs.npz") as pairs:
        audio_idx, image_idx = pairs["audio_idx"], pairs["image_idx"]
        labels, speaker, split = pairs["labels"], pairs["speaker"], pairs["split"]
    with np.load(data_dir / "mnist_t10k.npz") as mnist:
        images = mnist["images"][image_idx]
    with np.load(data_dir / "fsdd_audio.npz") as raw:
        samples, offsets = raw["audio"], raw["offsets"]
        clips = [samples[offsets[i]: offsets[i + 1]] for i in audio_idx]
    return _Source(images, clips, labels.astype(np.int64), speaker.astype(np.int64), split,
                   np.arange(labels.shape[0], dtype=np.int64))


def _labels_only(source: _Source, rows: np.ndarray) -> AVMnistSplit:
    """The rows as a split with empty inputs: all the partition looks at is labels and speakers."""
    empty = np.zeros((len(rows), 0), dtype=np.float32)
    return AVMnistSplit(images=empty, audio=empty, labels=source.labels[rows], speaker=source.speaker[rows],
                        sample_ids=source.ids[rows])


@dataclass(frozen=True)
class ExportSummary:
    task: str
    directories: dict[str, int]
    """Directory name -> samples written."""
    device_modalities: dict[str, list[str]]
    """Device directory name -> the modalities its samples have."""


class _Writer:
    """Writes samples of the source under one directory, in the chosen setting."""

    def __init__(self, source: _Source, setting: Setting, labels: list[str]) -> None:
        self.source, self.setting, self.labels = source, setting, labels

    def _image(self, rows: np.ndarray) -> np.ndarray:
        images = self.source.images[rows]
        if self.setting == "hard":
            noisy = corrupt_images(images.astype(np.float32) / np.float32(255.0), self.source.ids[rows])
            images = np.rint(noisy * 255.0).astype(np.uint8)
        return images

    def _clips(self, rows: np.ndarray) -> list[np.ndarray]:
        clips = [self.source.clips[r] for r in rows]
        if self.setting == "hard":
            return add_white_noise([pcm16_to_float(c) for c in clips], self.source.ids[rows])
        return clips

    def write(self, directory: Path, rows: np.ndarray, splits: np.ndarray,
              modalities: frozenset[Modality] = frozenset(Modality)) -> int:
        from PIL import Image
        from scipy.io import wavfile

        for modality in modalities:
            (directory / str(modality)).mkdir(parents=True, exist_ok=True)
        images, clips = self._image(rows), self._clips(rows)
        with (directory / MANIFEST).open("w", newline="", encoding="utf-8") as handle:
            manifest = csv.writer(handle)
            manifest.writerow(_COLUMNS)
            for i, row in enumerate(rows):
                sample_id = int(self.source.ids[row])
                files = {}
                if Modality.IMAGE in modalities:
                    files["image"] = f"image/{sample_id:05d}.png"
                    Image.fromarray(images[i], mode="L").save(directory / files["image"])
                if Modality.AUDIO in modalities:
                    files["audio"] = f"audio/{sample_id:05d}.wav"
                    wavfile.write(directory / files["audio"], SAMPLE_RATE, clips[i])
                manifest.writerow([sample_id, self.labels[int(self.source.labels[row])], splits[i],
                                   files.get("image", ""), files.get("audio", "")])
        return len(rows)


def export_avmnist(out: Path, devices: int, *, setting: Setting = "canonical", missing_fraction: float | None = None,
                   seed: int = 0, scheme: Scheme = "dirichlet", alpha: float = 0.5, public_fraction: float = 0.2,
                   heldout_fraction: float = 0.15, data_dir: Path | None = None,
                   progress: Callable[[str, int], None] | None = None) -> ExportSummary:
    """Writes ``out/task.toml``, ``out/public``, ``out/test`` and ``out/device-0`` ... ``out/device-{devices-1}``.

    The partition is the learning benchmark's (:func:`mlecs.data.partition.plan_shards`): ``missing_fraction``
    of the devices hold one modality only; their manifests leave that column empty.
    """
    from mlecs.tasks import load_task

    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    task_name = TASK_OF_SETTING[setting]
    labels = load_task(task_name).labels
    source = _read_source(Path(data_dir) if data_dir is not None else default_data_dir())
    train_rows = np.nonzero(source.split == TRAIN_SPLIT)[0]
    test_rows = np.nonzero(source.split == TEST_SPLIT)[0]
    spec = PartitionSpec(num_clients=devices, scheme=scheme, alpha=alpha, public_fraction=public_fraction,
                         seed=seed, missing_fraction=missing_fraction)
    shards = plan_shards(_labels_only(source, train_rows), spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "task.toml").write_text(resources.files("mlecs.tasks.builtin").joinpath(f"{task_name}.toml").read_text())
    writer = _Writer(source, setting, labels)
    written: dict[str, int] = {}

    def emit(name: str, rows: np.ndarray, splits: np.ndarray, modalities: frozenset[Modality] = frozenset(Modality)
             ) -> None:
        written[name] = writer.write(out / name, rows, splits, modalities)
        if progress:
            progress(name, written[name])

    public = np.sort(np.concatenate([shard.public_index for shard in shards]))
    emit("public", train_rows[public], np.full(len(public), "train"))
    emit("test", test_rows, np.full(len(test_rows), "heldout"))
    held: dict[str, list[str]] = {}
    for shard in shards:
        name = f"device-{shard.client_index}"
        private = np.random.default_rng([seed, shard.client_index]).permutation(shard.private_index)
        n_heldout = max(1, round(len(private) * heldout_fraction))
        order = np.concatenate([np.sort(private[n_heldout:]), np.sort(private[:n_heldout])])
        splits = np.array(["train"] * (len(private) - n_heldout) + ["heldout"] * n_heldout)
        emit(name, train_rows[order], splits, shard.modalities)
        held[name] = sorted(str(m) for m in shard.modalities)
    return ExportSummary(task=task_name, directories=written, device_modalities=held)
