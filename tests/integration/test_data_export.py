"""``mlecs data export-avmnist`` writes dataset directories that read back as the AV-MNIST loader's arrays."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlecs.cli import app
from mlecs.data.avmnist import LOGMEL_MEAN_STD, AVMnistSplit, load_avmnist
from mlecs.datasets import load_dataset
from mlecs.tasks import load_task


def _by_id(split: AVMnistSplit, ids: np.ndarray) -> AVMnistSplit:
    position = {int(i): k for k, i in enumerate(split.sample_ids)}
    return split.subset(np.asarray([position[int(i)] for i in ids]))


@pytest.mark.parametrize("setting", ["canonical", "hard"])
def test_exported_test_split_reads_back_as_the_loaders(tmp_path: Path, setting: str) -> None:
    result = CliRunner().invoke(app, ["data", "export-avmnist", "--out", str(tmp_path), "--devices", "3",
                                      "--setting", setting])
    assert result.exit_code == 0, result.output
    task = load_task(tmp_path / "task.toml")
    assert task.name == ("avmnist" if setting == "canonical" else "avmnist-hard")
    data, report = load_dataset(tmp_path / "test", task)
    assert report.usable == report.rows == 300 and report.problems == []
    expected = _by_id(load_avmnist(setting=setting).test, data.ids)  # type: ignore[arg-type]
    np.testing.assert_array_equal(data.labels, expected.labels)
    # Canonical images are the stored bytes; hard ones are quantised to 8 bits when written as PNG.
    np.testing.assert_allclose(data.inputs["image"], expected.images, atol=0 if setting == "canonical" else 0.5 / 255)
    mean, std = LOGMEL_MEAN_STD[setting]
    assert (task.modalities["audio"].mean, task.modalities["audio"].std) == (mean, std)
    # Features computed on the device from the WAV equal the loader's (canonical: stored as float16).
    np.testing.assert_allclose((data.inputs["audio"] - mean) / std, expected.audio,
                               atol=2e-3 if setting == "canonical" else 1e-4)


def test_devices_hold_disjoint_private_shards_and_missing_modalities(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", "export-avmnist", "--out", str(tmp_path), "--devices", "4",
                                      "--missing-fraction", "0.5", "--seed", "3"])
    assert result.exit_code == 0, result.output
    task = load_task("avmnist")
    seen: set[str] = set()
    held = []
    public, _ = load_dataset(tmp_path / "public", task)
    for k in range(4):
        data, report = load_dataset(tmp_path / f"device-{k}", task)
        assert report.usable == report.rows > 0
        assert report.per_split["heldout"] == round(report.rows * 0.15)
        ids = set(data.ids)
        assert not ids & seen and not ids & set(public.ids)
        seen |= ids
        held.append(frozenset(m for m in ("image", "audio") if data.present[m].all()))
        assert all(not data.present[m].any() for m in ("image", "audio") if m not in held[-1])
    assert len(seen) + len(public) == 2700
    assert sorted(len(h) for h in held) == [1, 1, 2, 2]  # half the devices miss one modality
    with (tmp_path / "device-0" / "manifest.csv").open() as handle:
        assert next(csv.reader(handle)) == ["id", "label", "split", "image", "audio"]
