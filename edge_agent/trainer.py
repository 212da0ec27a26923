"""AMT on the device: the shared core's ``run_amt_round`` on this device's data, with durable personal parts.

torch and the model code are imported only in this module of the agent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge_agent.config import AgentSettings, ConfigError
from edge_agent.tasks import TrainTask
from mlecs.data.avmnist import load_avmnist
from mlecs.data.partition import PartitionSpec, client_shard
from mlecs.data.split import LabelledSplit
from mlecs.modality import parse_modalities
from mlecs.model.config import InputSpec
from mlecs.tensor_names import FUSED_TENSOR

log = logging.getLogger(__name__)



class TrainingInterrupted(Exception):
    """The agent was asked to stop while training."""


class TaskMismatch(ConfigError):
    """The federation's model reads other inputs than this device's task declares: a configuration error."""


def _describe(inputs: tuple[InputSpec, ...]) -> str:
    return ", ".join(f"{spec.name} ({spec.kind} {list(spec.shape)}, mean {spec.mean:g}, std {spec.std:g})"
                     for spec in inputs)


@dataclass(frozen=True)
class LocalData:
    modalities: frozenset[str]
    public: LabelledSplit
    private_train: LabelledSplit
    private_heldout: LabelledSplit
    skipped_rows: int = 0
    """Rows of the dataset directory left out for a problem (logged at start, reported with every update)."""
    model_inputs: tuple[InputSpec, ...] | None = None
    """With a dataset directory: the inputs its task declares (the federation's model must read the same)."""
    task_text: str | None = None
    """With a dataset directory: the task file's text (the personalised model directory carries it)."""
    task: Any = None
    """With a dataset directory: its ``TaskSpec`` (the public shard is read with it too)."""
    public_refused: int = 0
    """Samples of the device's own public-set copy the coordinator did not recognise (left out)."""


@dataclass(frozen=True)
class RoundOutcome:
    tensors: dict[str, np.ndarray]
    """What is uploaded: the adapter delta, plus ``fused.z`` when representations are sent."""
    fused_sample_ids: list[int]
    metrics: dict[str, float]
    public_samples: int
    private_samples: int


def load_local_data(settings: AgentSettings) -> LocalData:
    """This device's public data and private data (split into train and held-out): from its dataset directory,
    or in partition mode from its shard of the bundled AV-MNIST."""
    if settings.data.dataset is not None:
        return _from_dataset(settings)
    assert settings.partition is not None and settings.modalities is not None  # load_settings checked
    data = load_avmnist(settings.data.dir, setting=settings.data.setting)
    p = settings.partition
    spec = PartitionSpec(num_clients=p.num_clients, scheme=p.scheme, alpha=p.alpha,
                         public_fraction=p.public_fraction, seed=p.seed)
    shard = client_shard(data.train, spec, p.client_index)
    private = np.random.default_rng(p.seed * 7919 + p.client_index).permutation(shard.private_index)
    n_heldout = max(1, round(len(private) * settings.data.heldout_fraction))
    return LocalData(
        modalities=parse_modalities(settings.modalities),
        public=data.train.subset(shard.public_index),
        private_train=data.train.subset(np.sort(private[n_heldout:])),
        private_heldout=data.train.subset(np.sort(private[:n_heldout])),
    )


def _from_dataset(settings: AgentSettings) -> LocalData:
    """Reads the device's dataset directory as its task says; raises DatasetError when no row is usable."""
    from mlecs.datasets import DatasetReport, MultimodalData, load_dataset
    from mlecs.tasks import TaskError, parse_task, task_text

    assert settings.data.dataset is not None and settings.data.task is not None
    try:
        text = task_text(settings.data.task)
        task = parse_task(text, settings.data.task)
    except TaskError as exc:
        raise ConfigError(f"data.task: {exc}") from exc

    def loaded(what: str, directory: Path) -> tuple[MultimodalData, DatasetReport]:
        data, report = load_dataset(directory, task, progress=lambda rows: log.info("%s: %d rows read", what, rows))
        log.info("%s %s: %d of %d rows usable; per split and modality %s", what, directory, report.usable,
                 report.rows, report.per_modality)
        for problem in report.problems:
            log.warning("%s: %s", what, problem.describe())
        return data, report

    private, report = loaded("dataset", settings.data.dataset)
    held = private.holds()
    if settings.modalities is not None:
        held = held & parse_modalities(settings.modalities, task.modalities)
    if not held:
        raise ConfigError(f"data.dataset {settings.data.dataset}: no sample holds any of the modalities "
                          f"{settings.modalities}")
    public = private.subset(np.zeros(0, dtype=np.int64))  # the coordinator's shard replaces it after enrolment
    if settings.data.public is not None:
        public, _ = loaded("public set", settings.data.public)
    return LocalData(modalities=frozenset(held), public=public,
                     private_train=private.split("train"), private_heldout=private.split("heldout"),
                     skipped_rows=report.skipped, model_inputs=task.edge_model_config().inputs,
                     task_text=text, task=task)


PERSONAL_MODEL_DIR = "personal-model"
"""Under the state directory: the model this device personalised in its latest round, as a model directory."""


class AmtTrainer:
    """Runs one round of AMT; the personal parts live in ``personal_model_path`` between rounds and restarts."""

    def __init__(self, data: LocalData, personal_model_path: Path) -> None:
        self._data = data
        self._personal_path = personal_model_path

    def _load_personal(self) -> dict[str, np.ndarray] | None:
        import torch

        if not self._personal_path.exists():
            return None
        try:
            stored = torch.load(self._personal_path, map_location="cpu", weights_only=True)
            return {str(k): v.numpy() for k, v in stored.items()}
        except Exception as exc:  # a torn or foreign file must not stop training: start personal parts afresh
            log.warning("ignoring unreadable personal model %s: %s", self._personal_path, exc)
            return None

    def _save_personal(self, tensors: dict[str, np.ndarray]) -> None:
        import torch

        tmp = self._personal_path.with_suffix(".tmp")
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp)
        tmp.replace(self._personal_path)  # atomic: a crash leaves the old or the new file, never half of one

    def _keep_personalised_model(self, model: Any, config: Any, task: TrainTask, metrics: dict[str, float]) -> None:
        """Writes the round's personalised model (shared tensors after the update stage, personal parts tuned)
        as a model directory beside the personal parts, replacing the previous round's; never fails the round."""
        import shutil

        from mlecs.inference import portable, write_model_directory

        final = self._personal_path.parent / PERSONAL_MODEL_DIR
        staging = final.with_name(PERSONAL_MODEL_DIR + ".tmp")
        try:
            portable_config, task_text = portable(config, self._data.task_text)
            shutil.rmtree(staging, ignore_errors=True)
            write_model_directory(staging, {k: v.numpy() for k, v in model.shared_state().items()}, portable_config,
                                  seed=task.seed, task_text=task_text,
                                  source={"round_number": task.round_number, "version_id": task.version_id,
                                          "personal_accuracy": metrics.get("personal_accuracy")})
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
        except (OSError, ValueError) as exc:
            log.warning("could not keep the personalised model in %s: %s", final, exc)

    def run(self, task: TrainTask, global_tensors: dict[str, np.ndarray], anchor_tensors: dict[str, np.ndarray],
            should_stop: Callable[[], bool]) -> RoundOutcome:
        from mlecs.learning.amt import AmtData, AmtRecipe, run_amt_round
        from mlecs.learning.seccl import Anchors
        from mlecs.model import ModelConfig, build_edge_model

        def progress(step: int, total: int, loss: float) -> None:
            if should_stop():
                raise TrainingInterrupted()

        started = time.perf_counter()
        data = self._data
        config = ModelConfig.from_dict(task.model)
        if data.model_inputs is not None and config.inputs != data.model_inputs:
            raise TaskMismatch(
                f"the federation's model reads {_describe(config.inputs)}, but this device's data.task declares "
                f"{_describe(data.model_inputs)}: configure the federation's task")
        model = build_edge_model(config, data.modalities, task.seed)
        stage: Literal["private", "public"] = "public" if task.upload_stage == "public" else "private"
        if stage == "public" and not len(data.public):
            raise TaskMismatch("the federation learns its uploads on the public set (upload_stage public), and this "
                               "device holds none: set data.public to its copy of the public set")
        recipe = AmtRecipe(
            upload_stage=stage,
            # The uploaded stage needs at least one epoch whichever data it trains on.
            public_epochs=max(task.public_epochs, 1) if stage == "public" else task.public_epochs,
            private_epochs=max(task.private_epochs, 1) if stage == "private" else task.private_epochs,
            personal_epochs=task.personal_epochs,
            batch_size=task.batch_size, learning_rate=task.learning_rate,
            ccl_weight=task.ccl_weight, ccl_temperature=task.ccl_temperature,
            seccl_weight=task.seccl_weight, seccl_temperature=task.seccl_temperature,
            fused_upload_samples=task.fused_upload_samples,
        )
        anchors = None
        if anchor_tensors:
            try:
                anchors = Anchors.from_tensors(anchor_tensors, config.fused_dim)
            except ValueError as exc:  # a bad anchor set costs this round its SE-CCL term, not the round
                log.warning("ignoring the version's anchors: %s", exc)
        personal = self._load_personal()
        if personal:
            log.info("personal parts restored: %d tensor(s) from %s", len(personal), self._personal_path)
        result = run_amt_round(
            model, AmtData(data.modalities, data.public, data.private_train, data.private_heldout),
            global_tensors, recipe=recipe, seed=task.seed * 1_000_003 + task.round_number,
            anchors=anchors, personal=personal, progress=progress,
        )
        self._save_personal(result.personal)
        self._keep_personalised_model(model, config, task, result.metrics)
        tensors = dict(result.delta)
        if len(result.fused_ids):
            tensors[FUSED_TENSOR] = result.fused
        metrics = dict(result.metrics)
        metrics["train_seconds"] = time.perf_counter() - started
        metrics["personal_restored"] = 1.0 if personal else 0.0
        metrics["skipped_rows"] = float(data.skipped_rows)
        if data.public_refused:
            metrics["public_rows_refused"] = float(data.public_refused)
        log.info("round %d trained (%s upload stage): update acc %.3f, personalised held-out acc %.3f in %.1fs",
                 task.round_number, stage, metrics["update_accuracy"], metrics.get("personal_accuracy", float("nan")),
                 metrics["train_seconds"])
        return RoundOutcome(tensors=tensors, fused_sample_ids=[int(i) for i in result.fused_ids],
                            metrics=metrics, public_samples=result.public_samples,
                            private_samples=result.private_samples)
