"""Task files: the built-ins parse, and every kind of mistake comes back naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlecs.tasks import TaskError, builtin_task_names, load_task, parse_task

VALID = """
name = "vibration"
labels = ["ok", "worn", "broken"]
label_text = "a {label} bearing"
[modalities.accel]
kind = "series"
channels = 3
length = 128
[modalities.spectrum]
kind = "vector"
dim = 64
[modalities.photo]
kind = "image"
size = [32, 48]
channels = 3
[modalities.mic]
kind = "audio"
sample_rate = 16000
clip_samples = 16000
n_fft = 512
hop = 256
n_mels = 32
fmax_hz = 8000
[model]
backbone = "tiny"
fused_dim = 128
"""


def test_builtin_avmnist_tasks_parse_with_avmnist_shapes() -> None:
    assert builtin_task_names() == ["avmnist", "avmnist-hard"]
    task = load_task("avmnist")
    assert task.modalities["image"].shape == (1, 28, 28)
    assert task.modalities["audio"].shape == (1, 40, 64)
    assert task.edge_model_config().num_classes == 10
    assert task.label_descriptions()[3] == "the digit three"
    assert load_task("avmnist-hard").modalities["audio"].mean == pytest.approx(-10.0720)


def test_a_task_file_declares_all_four_kinds(tmp_path: Path) -> None:
    path = tmp_path / "vibration.toml"
    path.write_text(VALID)
    task = load_task(path)
    assert {name: spec.shape for name, spec in task.modalities.items()} == {
        "accel": (3, 128), "spectrum": (64,), "photo": (3, 32, 48), "mic": (1, 32, 62)}
    assert task.edge_model_config().num_classes == 3
    assert task.edge_model_config().fused_dim == 128
    assert task.label_index() == {"ok": 0, "worn": 1, "broken": 2}


@pytest.mark.parametrize(("change", "named"), [
    (("labels = [\"ok\", \"worn\", \"broken\"]", "labels = [\"ok\"]"), "labels"),
    (("labels = [\"ok\", \"worn\", \"broken\"]", "labels = [\"ok\", \"ok\"]"), "listed twice"),
    (("label_text = \"a {label} bearing\"", "label_text = \"a bearing\""), "label_text"),
    (("kind = \"series\"", "kind = \"lidar\""), "modalities.accel"),
    (("[modalities.accel]", "[modalities.Accel]"), "modality name 'Accel'"),
    (("[modalities.accel]", "[modalities.label]"), "modality name 'label'"),
    (("channels = 3\nlength", "channels = 0\nlength"), "modalities.accel.series.channels"),
    (("fmax_hz = 8000", "fmax_hz = 9000"), "half the sample_rate"),
    (("dim = 64", "dim = 64\nwidth = 2"), "modalities.spectrum.vector.width"),
    (("fused_dim = 128", "fused_dim = 127"), "divisible"),
    (("fused_dim = 128", "num_classes = 4"), "num_classes"),
    (("dim = 64", "dim = 64\nextractor = \"fancy\""), "no extractor 'fancy'"),
    (("channels = 3\nlength = 128", "channels = 8\nlength = 1048576"), "input values per sample"),
])
def test_a_bad_task_is_refused_naming_what_is_wrong(tmp_path: Path, change: tuple[str, str], named: str) -> None:
    text = VALID.replace(*change)
    assert text != VALID
    with pytest.raises(TaskError, match=r"vibration\.toml") as info:
        path = tmp_path / "vibration.toml"
        path.write_text(text)
        load_task(path)
    assert named in str(info.value)


def test_not_toml_and_not_a_task_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="not valid TOML"):
        parse_task("name = ", "broken.toml")
    with pytest.raises(TaskError, match=r"not a built-in task .*avmnist"):
        load_task(tmp_path / "absent.toml")
