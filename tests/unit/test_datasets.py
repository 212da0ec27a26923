"""Dataset directories: usable rows load, every bad row is skipped and reported, no usable row is an error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlecs.cli import app
from mlecs.datasets import DatasetError, check_dataset, load_dataset
from mlecs.tasks import TaskSpec, parse_task

SENSOR_TASK = """
name = "bearing"
labels = ["ok", "worn", "broken"]
[modalities.accel]
kind = "series"
channels = 2
length = 16
[modalities.spectrum]
kind = "vector"
dim = 4
[model]
backbone = "tiny"
"""


@pytest.fixture
def task() -> TaskSpec:
    return parse_task(SENSOR_TASK, "bearing.toml")


def _write(directory: Path, manifest: str, files: dict[str, np.ndarray] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.csv").write_text(manifest)
    for name, array in (files or {}).items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(directory / name, array)
    return directory


def _good_files() -> dict[str, np.ndarray]:
    return {"a.npy": np.ones((16, 2)), "b.npy": np.arange(4.0), "c.npy": np.zeros((10, 2)), "d.npy": np.ones(4)}


def test_samples_may_miss_modalities_one_by_one(tmp_path: Path, task: TaskSpec) -> None:
    directory = _write(tmp_path / "d", "id,label,split,accel,spectrum\n"
                       "s1,ok,train,a.npy,b.npy\ns2,worn,train,c.npy,\ns3,broken,heldout,,d.npy\n", _good_files())
    data, report = load_dataset(directory, task)
    assert (len(data), report.usable, report.skipped, report.problems) == (3, 3, 0, [])
    assert list(data.ids) == ["s1", "s2", "s3"] and list(data.labels) == [0, 1, 2]
    assert data.inputs["accel"].shape == (3, 2, 16) and data.inputs["spectrum"].shape == (3, 4)
    assert list(data.present["accel"]) == [True, True, False]
    assert not data.inputs["accel"][2].any()  # absent: zeros, never read
    groups = {frozenset(k): list(v) for k, v in data.modality_groups()}
    assert groups == {frozenset({"accel", "spectrum"}): [0], frozenset({"accel"}): [1], frozenset({"spectrum"}): [2]}
    assert report.per_split == {"train": 2, "heldout": 1}
    assert report.per_modality == {"train": {"accel": 2, "spectrum": 1}, "heldout": {"accel": 0, "spectrum": 1}}
    assert len(data.split("train")) == 2


@pytest.mark.parametrize(("row", "column", "message"), [
    ("s9,ok,train,absent.npy,", "accel", "file not found"),
    ("s9,ok,train,bad.npy,", "accel", "unreadable .npy"),
    ("s9,ok,train,three.npy,", "accel", "3 channel(s), the task wants 2"),
    ("s9,ok,train,,a.npy", "spectrum", "has shape [16, 2], the task wants [4]"),
    ("s9,cracked,train,a.npy,", "label", "label 'cracked' is not one of the task's labels"),
    ("s1,ok,train,a.npy,", "id", "duplicate id 's1'"),
    (",ok,train,a.npy,", "id", "empty id"),
    ("s9,ok,validation,a.npy,", "split", "must be train or heldout"),
    ("s9,ok,train,/etc/passwd,", "accel", "relative and stay inside"),
    ("s9,ok,train,../a.npy,", "accel", "relative and stay inside"),
    ("s9,ok,train,,", None, "names no file"),
    ("s9,ok,train", None, "different number of fields"),
    ("s9,ok,train,a.npy,b.npy,extra", None, "different number of fields"),
])
def test_a_bad_row_is_skipped_and_reported_with_its_line(tmp_path: Path, task: TaskSpec, row: str,
                                                         column: str | None, message: str) -> None:
    files = {**_good_files(), "three.npy": np.zeros((16, 3))}
    directory = _write(tmp_path / "d", f"id,label,split,accel,spectrum\ns1,ok,train,a.npy,b.npy\n{row}\n", files)
    (directory / "bad.npy").write_bytes(b"garbage")
    data, report = load_dataset(directory, task)
    assert list(data.ids) == ["s1"]
    assert (report.rows, report.usable, report.skipped) == (2, 1, 1)
    [problem] = report.problems
    assert (problem.line, problem.column) == (3, column)
    assert message in problem.message


def test_unknown_and_absent_columns_are_notes_not_skips(tmp_path: Path, task: TaskSpec) -> None:
    directory = _write(tmp_path / "d", "id,label,split,accel,lidar\ns1,ok,train,a.npy,x.bin\n", _good_files())
    data, report = load_dataset(directory, task)
    assert len(data) == 1 and not data.present["spectrum"].any()
    assert sorted((p.column, p.skipped) for p in report.problems) == [("lidar", False), ("spectrum", False)]


@pytest.mark.parametrize(("manifest", "message"), [
    (None, "no manifest.csv"),
    ("", "empty (no header)"),
    ("id,label,split,accel,spectrum\n", "header but no rows"),
    ("id,split,accel\ns1,train,a.npy\n", "lacks the column(s) label"),
    ("id,label,split,accel,accel\ns1,ok,train,a.npy,a.npy\n", "more than once"),
    ("id,label,split,accel\ns1,cracked,train,a.npy\n", "not one of the task's labels"),
])
def test_no_usable_row_is_an_error_carrying_the_report(tmp_path: Path, task: TaskSpec, manifest: str | None,
                                                       message: str) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    _write(directory, manifest or "", _good_files())
    if manifest is None:
        (directory / "manifest.csv").unlink()
    with pytest.raises(DatasetError) as info:
        load_dataset(directory, task)
    assert info.value.report.usable == 0
    assert any(message in p.message for p in info.value.report.problems)
    assert check_dataset(directory, task).usable == 0


def test_data_check_exit_codes_and_json(tmp_path: Path) -> None:
    (tmp_path / "bearing.toml").write_text(SENSOR_TASK)
    good = _write(tmp_path / "good", "id,label,split,accel,spectrum\ns1,ok,train,a.npy,\ns2,ok,train,zzz.npy,\n",
                  _good_files())
    bad = _write(tmp_path / "bad", "id,label,split,accel,spectrum\ns1,nope,train,a.npy,\n", _good_files())
    runner = CliRunner()
    ok = runner.invoke(app, ["data", "check", str(good), "--task", str(tmp_path / "bearing.toml")])
    assert ok.exit_code == 0, ok.output
    assert "1 of 2 row(s) usable, 1 skipped" in ok.output
    assert "line 3, column accel, zzz.npy: file not found" in ok.output
    refused = runner.invoke(app, ["data", "check", str(bad), "--task", str(tmp_path / "bearing.toml"), "--json"])
    assert refused.exit_code == 2
    report = json.loads(refused.output)
    assert report["usable"] == 0 and report["problems"][0]["line"] == 2
    no_task = runner.invoke(app, ["data", "check", str(good), "--task", "no-such-task"])
    assert no_task.exit_code == 2 and "not a built-in task" in no_task.output


def test_ids_travel_as_uint32_integers_as_themselves_text_hashed_apart() -> None:
    from mlecs.data.split import numeric_sample_id, numeric_sample_ids

    assert numeric_sample_id("123") == 123 and numeric_sample_id(" 7 ") == 7
    hashed = numeric_sample_ids(["cam-0001", "cam-0002", str(2**31), "-5"])
    assert all(2**31 <= int(v) < 2**32 for v in hashed)  # never an integer id's number, always a uint32
    assert len(set(hashed.tolist())) == 4
    assert numeric_sample_id("cam-0001") == int(hashed[0])  # stable: the same on every device


def test_two_ids_that_travel_as_the_same_number_are_refused(tmp_path: Path, task: TaskSpec) -> None:
    directory = _write(tmp_path / "d", "id,label,split,accel,spectrum\n7,ok,train,a.npy,\n007,ok,train,a.npy,\n",
                       _good_files())
    data, report = load_dataset(directory, task)
    assert list(data.ids) == ["7"]
    [problem] = report.problems
    assert problem.line == 3 and "travels as the same number as '7'" in problem.message
