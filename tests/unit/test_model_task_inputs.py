"""A model built from a task: any modality names and kinds, samples missing modalities one by one, custom
extractors registered through the ``mlecs.extractors`` entry points."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlecs.datasets.dataset import MultimodalData
from mlecs.learning import evaluate, train_supervised
from mlecs.model import ModelConfig, build_edge_model, shared_schema
from mlecs.tasks import TaskError, parse_task

TASK = """
name = "bearing"
labels = ["ok", "worn", "broken"]
[modalities.accel]
kind = "series"
channels = 3
length = 32
[modalities.spectrum]
kind = "vector"
dim = 8
mean = 1.0
std = 2.0
[modalities.photo]
kind = "image"
size = [12, 16]
channels = 3
[model]
backbone = "tiny"
fused_dim = 64
"""


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return parse_task(TASK).edge_model_config()


def _inputs(size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"accel": torch.randn(size, 3, 32, generator=g), "spectrum": torch.randn(size, 8, generator=g),
            "photo": torch.rand(size, 3, 12, 16, generator=g)}


def test_the_task_decides_the_inputs_and_the_tensor_names(config: ModelConfig) -> None:
    assert config.modality_names == ("accel", "photo", "spectrum")
    assert config.num_classes == 3
    schema = shared_schema(config)
    assert schema["extractors.accel.conv1.weight"] == (32, 3, 5)
    assert schema["extractors.spectrum.net.0.weight"] == (16 * 8, 8)
    assert schema["extractors.photo.conv1.weight"] == (16, 3, 3, 3)
    assert schema["connector.core.fuse.weight"] == (64, 3 * (64 + 1))
    assert schema["head.weight"][0] == 3
    assert ModelConfig.from_dict(config.to_dict()) == config  # stored with a federation and read back


def test_samples_missing_a_modality_are_fused_as_if_it_were_not_fed(config: ModelConfig) -> None:
    model = build_edge_model(config, config.modality_names, seed=0).eval()
    inputs = _inputs(4)
    has_photo = torch.tensor([True, False, True, False])
    with torch.no_grad():
        mixed = model(inputs, {"photo": has_photo}).fused
        without = model({m: x for m, x in inputs.items() if m != "photo"}).fused
        full = model(inputs).fused
    torch.testing.assert_close(mixed[~has_photo], without[~has_photo])
    torch.testing.assert_close(mixed[has_photo], full[has_photo])
    assert not torch.allclose(full[~has_photo], without[~has_photo])


def test_a_device_with_some_modalities_shares_the_federations_names(config: ModelConfig) -> None:
    device = build_edge_model(config, ["accel"], seed=0)
    full = build_edge_model(config, config.modality_names, seed=0)
    device.load_shared_state(full.shared_state())  # photo's and spectrum's tensors: skipped, not refused
    foreign = {**full.shared_state(), "extractors.lidar.proj.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unknown shared tensor 'extractors\.lidar"):
        device.load_shared_state(foreign)
    with pytest.raises(ValueError, match="no input 'lidar'"):
        build_edge_model(config, ["lidar"], seed=0)


def test_standardisation_comes_from_the_task(config: ModelConfig) -> None:
    model = build_edge_model(config, ["spectrum"], seed=0).eval()
    extractor = model.extractors["spectrum"]
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(extractor(x), extractor.net((x - 1.0) / 2.0))


def _learnable(size: int, seed: int) -> MultimodalData:
    """Three classes told apart by the accel mean and by the spectrum's first value; each sample misses a
    modality at random (never both)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size)
    accel = (rng.normal(size=(size, 3, 32)) + labels[:, None, None]).astype(np.float32)
    spectrum = rng.normal(size=(size, 8)).astype(np.float32)
    spectrum[:, 0] += 2 * labels
    lacks = rng.integers(0, 3, size)  # 0: has both, 1: no accel, 2: no spectrum
    present = {"accel": lacks != 1, "spectrum": lacks != 2, "photo": np.zeros(size, dtype=bool)}
    inputs = {"accel": accel * present["accel"][:, None, None], "spectrum": spectrum * present["spectrum"][:, None],
              "photo": np.zeros((size, 3, 12, 16), dtype=np.float32)}
    return MultimodalData(ids=np.asarray([f"s{seed}-{i}" for i in range(size)], dtype=object),
                          labels=labels.astype(np.int64), splits=np.asarray(["train"] * size, dtype=object),
                          inputs=inputs, present=present)


def test_training_on_samples_with_mixed_modalities_learns(config: ModelConfig) -> None:
    train, test = _learnable(300, 0), _learnable(150, 1)
    model = build_edge_model(config, ["accel", "spectrum"], seed=0)
    held = frozenset({"accel", "spectrum"})
    before = evaluate(model, test, held)
    train_supervised(model, train, held, epochs=8, batch_size=32, learning_rate=3e-3, seed=0, ccl_weight=0.1)
    after = evaluate(model, test, held)
    assert after > 0.8 and after > before + 0.3, (before, after)
    assert train.sample_ids.dtype == np.int64 and len(set(train.sample_ids)) == 300


def test_a_registered_extractor_is_used_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A package on the path that registers one extractor, as `pip install` would leave it.
    (tmp_path / "bearing_extractors.py").write_text(
        "import torch\n"
        "class Mean(torch.nn.Module):\n"
        "    def __init__(self, spec, feature_dim):\n"
        "        super().__init__()\n"
        "        self.proj = torch.nn.Linear(spec.shape[0], feature_dim)\n"
        "    def forward(self, x):\n"
        "        return self.proj(x.mean(dim=-1))\n"
        "def mean_over_time(spec, feature_dim):\n"
        "    return Mean(spec, feature_dim)\n")
    info = tmp_path / "bearing_extractors-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bearing-extractors\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mlecs.extractors]\nmean-over-time = bearing_extractors:mean_over_time\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = parse_task(TASK.replace("length = 32", "length = 32\nextractor = \"mean-over-time\""))
    model = build_edge_model(task.edge_model_config(), ["accel"], seed=0)
    assert type(model.extractors["accel"]).__name__ == "Mean"
    assert model({"accel": torch.randn(5, 3, 32)}).logits.shape == (5, 3)
    assert "extractors.accel.proj.weight" in model.shared_state()
    monkeypatch.delitem(sys.modules, "bearing_extractors", raising=False)


def test_an_extractor_nobody_registered_is_refused_at_the_task() -> None:
    with pytest.raises(TaskError, match="no extractor 'absent'"):
        parse_task(TASK.replace("length = 32", "length = 32\nextractor = \"absent\""))
