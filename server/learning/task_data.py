"""The coordinator's own data for a federation: the public set it tunes the cloud model on and makes sample
anchors from, and the test split it evaluates every version on.

A federation without a task uses the bundled AV-MNIST (the public set is the share of its training pairs
the devices' partitions also call public). A federation with a task uses the dataset directories
``MLECS_TASK_DATA`` names for that task (``DIR/public``, ``DIR/test``, as ``mlecs data export-avmnist`` writes
them); without them the coordinator aggregates only: no evaluation, no cloud tuning, text anchors alone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FederationData:
    public: Any
    """A ``LabelledSplit``, or None when the coordinator holds no public set for this federation."""
    test: Any
    """A ``LabelledSplit``, or None when it holds no test split."""


@dataclass(frozen=True)
class PublicReference:
    """The coordinator's public set of a task as devices get it: its directory, usable ids and fingerprints."""

    directory: Path
    task: Any
    """The ``TaskSpec`` it is read with."""
    ids: tuple[str, ...]
    fingerprints: Mapping[str, Any]
    """id -> ``mlecs.datasets.public_shard.SampleFingerprint``."""


@dataclass
class TaskData:
    avmnist_dir: Path | None = None
    avmnist_setting: str = "canonical"
    task_dirs: Mapping[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._avmnist: Any = None
        self._loaded: dict[tuple[str, str], FederationData] = {}
        self._references: dict[tuple[str, str], PublicReference | None] = {}

    def for_config(self, config: Any) -> FederationData:
        """The public set and test split of a federation (its ``FederationConfig``); loaded once, then cached."""
        task = config.task_spec()
        with self._lock:
            if task is None:
                return self._bundled(config.public_fraction, config.seed)
            key = (task.name, config.task)
            if key not in self._loaded:
                self._loaded[key] = self._from_directories(task)
            return self._loaded[key]

    def public_reference(self, config: Any) -> PublicReference | None:
        """The public set devices of this federation get their shards from and have their copies checked
        against; None when the federation has no task (devices use partitions of the bundled AV-MNIST) or the
        coordinator holds no public set for its task. Fingerprinted once, then cached."""
        task = config.task_spec()
        if task is None:
            return None
        public = self.for_config(config).public
        key = (task.name, config.task)
        with self._lock:
            if key not in self._references:
                self._references[key] = None if public is None else self._fingerprint(task, public)
            return self._references[key]

    def _fingerprint(self, task: Any, public: Any) -> PublicReference:
        from mlecs.datasets.public_shard import fingerprints

        directory = Path(self.task_dirs[task.name]) / "public"
        ids = tuple(str(i) for i in public.ids)
        reference = PublicReference(directory, task, ids, fingerprints(directory, task, ids))
        log.info("task %s: public set %s fingerprinted (%d samples) for devices' shards", task.name, directory,
                 len(ids))
        return reference

    def _bundled(self, public_fraction: float, seed: int) -> FederationData:
        from mlecs.data.avmnist import load_avmnist
        from mlecs.data.partition import split_public

        if self._avmnist is None:
            self._avmnist = load_avmnist(self.avmnist_dir, setting=self.avmnist_setting)  # type: ignore[arg-type]
        public_index, _ = split_public(len(self._avmnist.train), public_fraction, seed)
        return FederationData(public=self._avmnist.train.subset(public_index), test=self._avmnist.test)

    def _from_directories(self, task: Any) -> FederationData:
        from mlecs.datasets import DatasetError, load_dataset

        root = self.task_dirs.get(task.name)
        if root is None:
            log.warning("no data for task %r (MLECS_TASK_DATA names %s): its federations aggregate without "
                        "evaluation or cloud tuning", task.name, ", ".join(sorted(self.task_dirs)) or "no task")
            return FederationData(public=None, test=None)
        parts: dict[str, Any] = {}
        for part in ("public", "test"):
            try:
                data, report = load_dataset(Path(root) / part, task)
                parts[part] = data
                log.info("task %s: %s set %s: %d of %d rows usable", task.name, part, Path(root) / part,
                         report.usable, report.rows)
                for problem in report.problems:
                    log.warning("task %s %s set: %s", task.name, part, problem.describe())
            except DatasetError as exc:
                log.error("task %s: %s", task.name, exc)
                parts[part] = None
        return FederationData(public=parts["public"], test=parts["test"])
