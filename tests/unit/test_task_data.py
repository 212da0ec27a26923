"""The coordinator's own data per federation: the bundled AV-MNIST without a task, a task's dataset
directories from MLECS_TASK_DATA, or nothing (the federation is then aggregated only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.domain.federation_config import FederationConfig
from server.learning.task_data import TaskData

TASK = 'name = "pair"\nlabels = ["a", "b"]\n[modalities.v]\nkind = "vector"\ndim = 2\n[model]\nbackbone = "tiny"\n'


def _dataset(directory: Path, rows: int) -> None:
    directory.mkdir(parents=True)
    lines = ["id,label,split,v"]
    for i in range(rows):
        np.save(directory / f"{i}.npy", np.array([i, -i], dtype=np.float32))
        lines.append(f"{i},{'ab'[i % 2]},train,{i}.npy")
    (directory / "manifest.csv").write_text("\n".join(lines) + "\n")


def test_a_task_without_data_is_aggregated_only(tmp_path: Path) -> None:
    data = TaskData(task_dirs={"other": tmp_path}).for_config(FederationConfig(task=TASK))
    assert data.public is None and data.test is None


def test_a_tasks_public_set_and_test_split_come_from_its_directories(tmp_path: Path) -> None:
    _dataset(tmp_path / "pair" / "public", 4)
    _dataset(tmp_path / "pair" / "test", 6)
    source = TaskData(task_dirs={"pair": tmp_path / "pair"})
    data = source.for_config(FederationConfig(task=TASK))
    assert (len(data.public), len(data.test)) == (4, 6)
    assert data.test.inputs["v"].shape == (6, 2) and list(data.test.labels) == [0, 1, 0, 1, 0, 1]
    assert source.for_config(FederationConfig(task=TASK)) is data  # loaded once


def test_a_task_whose_test_directory_is_unusable_keeps_its_public_set(tmp_path: Path) -> None:
    _dataset(tmp_path / "pair" / "public", 3)
    (tmp_path / "pair" / "test").mkdir()
    data = TaskData(task_dirs={"pair": tmp_path / "pair"}).for_config(FederationConfig(task=TASK))
    assert len(data.public) == 3 and data.test is None
