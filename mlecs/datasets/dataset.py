"""A dataset directory: ``manifest.csv`` plus the files it names, read into arrays with a report of every problem.

The manifest has one row per sample: ``id``, ``label`` (one of the task's label names), ``split``
(``train`` or ``heldout``) and one column per modality naming a file relative to the directory (empty
when that sample lacks the modality). A row with any problem is skipped and reported; the rest load.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from mlecs.data.split import numeric_sample_id, numeric_sample_ids
from mlecs.datasets.readers import InputError, read_input
from mlecs.tasks.spec import RESERVED_COLUMNS, TaskSpec

MANIFEST = "manifest.csv"
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: where (manifest line, column, file) and what."""

    message: str
    line: int | None = None
    """Line of ``manifest.csv`` (the header is line 1); None for a problem of the whole dataset."""
    column: str | None = None
    file: str | None = None
    skipped: bool = True
    """Whether the row was left out (False: a note that changes nothing, such as an ignored column)."""

    def describe(self) -> str:
        where = [f"line {self.line}" if self.line else MANIFEST]
        if self.column:
            where.append(f"column {self.column}")
        if self.file:
            where.append(self.file)
        return f"{', '.join(where)}: {self.message}"


@dataclass(frozen=True, eq=False)
class MultimodalData:
    """Samples of a dataset directory; row ``i`` of every array is the same sample."""

    ids: np.ndarray
    """str [N], the manifest's ids."""
    labels: np.ndarray
    """int64 [N], positions in the task's ``labels``."""
    splits: np.ndarray
    """str [N], ``train`` or ``heldout``."""
    inputs: Mapping[str, np.ndarray]
    """modality -> float32 [N, *shape]; zeros where the sample lacks the modality."""
    present: Mapping[str, np.ndarray]
    """modality -> bool [N]: whether the sample has it."""
    sample_ids: np.ndarray = field(init=False)
    """int64 [N]: the ids as the wire carries them (:func:`mlecs.data.split.numeric_sample_id`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_ids", numeric_sample_ids(self.ids))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> MultimodalData:
        index = np.asarray(index, dtype=np.int64)
        return MultimodalData(ids=self.ids[index], labels=self.labels[index], splits=self.splits[index],
                              inputs={m: a[index] for m, a in self.inputs.items()},
                              present={m: a[index] for m, a in self.present.items()})

    def split(self, name: str) -> MultimodalData:
        return self.subset(np.nonzero(self.splits == name)[0])

    def input_arrays(self) -> Mapping[str, np.ndarray]:
        return self.inputs

    def presence(self) -> Mapping[str, np.ndarray]:
        return self.present

    def holds(self) -> frozenset[str]:
        """The modalities at least one sample has."""
        return frozenset(m for m, mask in self.present.items() if mask.any())

    @classmethod
    def concatenate(cls, parts: Sequence[MultimodalData]) -> MultimodalData:
        if not parts:
            raise ValueError("concatenate needs at least one part")
        names = set(parts[0].inputs)
        if any(set(part.inputs) != names for part in parts):
            raise ValueError("parts of different tasks cannot be concatenated")
        return cls(ids=np.concatenate([p.ids for p in parts]), labels=np.concatenate([p.labels for p in parts]),
                   splits=np.concatenate([p.splits for p in parts]),
                   inputs={m: np.concatenate([p.inputs[m] for p in parts]) for m in names},
                   present={m: np.concatenate([p.present[m] for p in parts]) for m in names})

    def modality_groups(self) -> list[tuple[frozenset[str], np.ndarray]]:
        """Samples grouped by the exact set of modalities they have (training feeds each group its own)."""
        names = sorted(self.present)
        keys = [frozenset(m for m in names if self.present[m][i]) for i in range(len(self))]
        groups: dict[frozenset[str], list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        ordered = sorted(groups.items(), key=lambda group: sorted(group[0]))
        return [(key, np.asarray(rows, dtype=np.int64)) for key, rows in ordered]


@dataclass
class DatasetReport:
    """What ``mlecs data check`` prints: usable samples per split and modality, and every problem."""

    directory: str
    task: str
    rows: int = 0
    usable: int = 0
    per_split: dict[str, int] = field(default_factory=dict)
    per_modality: dict[str, dict[str, int]] = field(default_factory=dict)
    """split -> modality -> usable samples of that split holding it."""
    problems: list[Problem] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.rows - self.usable

    def to_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, "task": self.task, "rows": self.rows, "usable": self.usable,
                "skipped": self.skipped, "per_split": self.per_split, "per_modality": self.per_modality,
                "problems": [{"line": p.line, "column": p.column, "file": p.file, "message": p.message,
                              "skipped": p.skipped} for p in self.problems]}


class DatasetError(Exception):
    """No usable sample remains; ``report`` says why."""

    def __init__(self, report: DatasetReport) -> None:
        first = report.problems[0].describe() if report.problems else "no rows"
        super().__init__(f"dataset {report.directory} has no usable sample for task {report.task!r} ({first})")
        self.report = report


def _relative_file(value: str) -> PurePosixPath | None:
    """The manifest's path if it stays inside the dataset directory, else None."""
    path = PurePosixPath(value.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path


class _Loader:
    def __init__(self, directory: Path, task: TaskSpec, report: DatasetReport) -> None:
        self.directory, self.task, self.report = directory, task, report
        self.label_index = task.label_index()
        self.seen_ids: set[str] = set()
        self.wire_ids: dict[int, str] = {}

    def problem(self, message: str, line: int | None = None, column: str | None = None, file: str | None = None,
                skipped: bool = True) -> None:
        self.report.problems.append(Problem(message, line, column, file, skipped))

    def header(self, columns: list[str]) -> list[str] | None:
        """The task's modalities that have a column, or None when the header makes the manifest unusable."""
        duplicated = sorted(name for name, count in Counter(columns).items() if count > 1)
        if duplicated:
            self.problem(f"column(s) {', '.join(duplicated)} appear more than once in the header")
            return None
        absent = sorted(RESERVED_COLUMNS - set(columns))
        if absent:
            self.problem(f"the header lacks the column(s) {', '.join(absent)} (it needs id, label, split and one "
                         "column per modality)")
            return None
        for name in columns:
            if name not in RESERVED_COLUMNS and name not in self.task.modalities:
                self.problem(f"not a modality of task {self.task.name!r}; ignored", column=name, skipped=False)
        for name in self.task.modalities:
            if name not in columns:
                self.problem(f"no column for modality {name!r}: no sample has it", column=name, skipped=False)
        return [name for name in self.task.modalities if name in columns]

    def row(self, line: int, row: dict[str | None, Any], modalities: list[str]) -> tuple[Any, ...] | None:
        """(id, label, split, {modality: array}) of a usable row, else None after reporting why."""
        if None in row or any(value is None for value in row.values()):
            self.problem("the row has a different number of fields than the header", line)
            return None
        sample_id, label, split = (str(row[name]).strip() for name in ("id", "label", "split"))
        if not sample_id:
            self.problem("empty id", line, "id")
            return None
        if sample_id in self.seen_ids:
            self.problem(f"duplicate id {sample_id!r} (an earlier row has it)", line, "id")
            return None
        self.seen_ids.add(sample_id)
        wire = numeric_sample_id(sample_id)
        if wire in self.wire_ids:
            self.problem(f"id {sample_id!r} travels as the same number as {self.wire_ids[wire]!r} (a hash "
                         "collision, or an integer id that another id spells differently): rename one", line, "id")
            return None
        self.wire_ids[wire] = sample_id
        if label not in self.label_index:
            self.problem(f"label {label!r} is not one of the task's labels", line, "label")
            return None
        if split not in SPLITS:
            self.problem(f"split {split!r} must be train or heldout", line, "split")
            return None
        arrays = {}
        for name in modalities:
            value = str(row[name]).strip()
            if not value:
                continue
            relative = _relative_file(value)
            if relative is None:
                self.problem("the path must be relative and stay inside the dataset directory", line, name, value)
                return None
            try:
                arrays[name] = read_input(self.directory / relative, self.task.modalities[name])
            except InputError as exc:
                self.problem(str(exc), line, name, value)
                return None
        if not arrays:
            self.problem("the sample names no file for any of the task's modalities", line)
            return None
        return sample_id, self.label_index[label], split, arrays


def load_dataset(directory: Path, task: TaskSpec,
                 progress: Callable[[int], None] | None = None) -> tuple[MultimodalData, DatasetReport]:
    """Reads every usable sample of ``directory``; raises :class:`DatasetError` when none is usable.

    ``progress(rows_read)`` is called every 100 rows (reading thousands of images takes a while).
    """
    directory = Path(directory)
    report = DatasetReport(directory=str(directory), task=task.name)
    loader = _Loader(directory, task, report)
    manifest = directory / MANIFEST
    samples: list[tuple[Any, ...]] = []
    read_rows = False
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [name.strip() for name in (reader.fieldnames or [])]
            reader.fieldnames = columns
            modalities = loader.header(columns) if columns else None
            if not columns:
                loader.problem("the manifest is empty (no header)")
            if modalities is not None:
                read_rows = True
                for row in reader:
                    report.rows += 1
                    sample = loader.row(reader.line_num, row, modalities)
                    if sample is not None:
                        samples.append(sample)
                    if progress and report.rows % 100 == 0:
                        progress(report.rows)
    except FileNotFoundError:
        loader.problem(f"no {MANIFEST} in {directory}")
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        loader.problem(f"unreadable manifest: {exc}")
    if read_rows and report.rows == 0:
        loader.problem("the manifest has a header but no rows")
    report.usable = len(samples)
    if not samples:
        raise DatasetError(report)
    data = _assemble(samples, task)
    _count(data, report)
    return data, report


def _assemble(samples: list[tuple[Any, ...]], task: TaskSpec) -> MultimodalData:
    count = len(samples)
    inputs = {name: np.zeros((count, *spec.shape), dtype=np.float32) for name, spec in task.modalities.items()}
    present = {name: np.zeros(count, dtype=bool) for name in task.modalities}
    for i, (_, _, _, arrays) in enumerate(samples):
        for name, array in arrays.items():
            inputs[name][i] = array
            present[name][i] = True
    return MultimodalData(ids=np.asarray([s[0] for s in samples], dtype=object),
                          labels=np.asarray([s[1] for s in samples], dtype=np.int64),
                          splits=np.asarray([s[2] for s in samples], dtype=object), inputs=inputs, present=present)


def _count(data: MultimodalData, report: DatasetReport) -> None:
    for split in SPLITS:
        in_split = data.splits == split
        report.per_split[split] = int(in_split.sum())
        report.per_modality[split] = {name: int((mask & in_split).sum()) for name, mask in data.present.items()}


def check_dataset(directory: Path, task: TaskSpec) -> DatasetReport:
    """The report of :func:`load_dataset` without keeping the arrays (``usable == 0`` when nothing loads)."""
    try:
        return load_dataset(directory, task)[1]
    except DatasetError as exc:
        return exc.report
