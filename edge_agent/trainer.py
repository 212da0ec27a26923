"""AMT on the device: a public-shard stage whose adapter is uploaded, and a private stage kept here.

torch and the model code are imported only in this module of the agent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.config import AgentSettings
from edge_agent.tasks import TrainTask
from mlecs.data.avmnist import AVMnistSplit, load_avmnist
from mlecs.data.partition import PartitionSpec, client_shard
from mlecs.modality import Modality, parse_modalities

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """The agent was asked to stop while training."""


@dataclass(frozen=True)
class LocalData:
    modalities: frozenset[Modality]
    public: AVMnistSplit
    private_train: AVMnistSplit
    private_heldout: AVMnistSplit


@dataclass(frozen=True)
class RoundOutcome:
    delta: dict[str, np.ndarray]
    metrics: dict[str, float]
    public_samples: int
    private_samples: int


def load_local_data(settings: AgentSettings) -> LocalData:
    """This device's public shard and private data (split into train and held-out), from its partition."""
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


class AmtTrainer:
    def __init__(self, data: LocalData, personal_model_path: Path) -> None:
        self._data = data
        self._personal_path = personal_model_path

    def run(self, task: TrainTask, global_tensors: dict[str, np.ndarray],
            should_stop: Callable[[], bool]) -> RoundOutcome:
        import torch

        from mlecs.learning import evaluate, train_supervised
        from mlecs.model import ModelConfig, build_edge_model

        def progress(step: int, total: int, loss: float) -> None:
            if should_stop():
                raise TrainingInterrupted()

        started = time.perf_counter()
        data, mods = self._data, self._data.modalities
        model = build_edge_model(ModelConfig.from_dict(task.model), mods, task.seed)
        model.load_shared_state({k: torch.from_numpy(np.asarray(v)) for k, v in global_tensors.items()})
        seed = task.seed * 1_000_003 + task.round_number
        # (b) public stage: connector, LoRA, head and this device's extractors, from the global adapter.
        public = train_supervised(model, data.public, mods, epochs=task.public_epochs, batch_size=task.batch_size,
                                  learning_rate=task.learning_rate, seed=seed, parameters="shared",
                                  progress=progress)
        trained = model.shared_state()
        delta = {name: (value.numpy() - global_tensors[name]).astype(np.float32)
                 for name, value in trained.items()}
        # (c) private stage: personalise every trainable part on private data; it never leaves the device.
        private = train_supervised(model, data.private_train, mods, epochs=task.private_epochs,
                                   batch_size=task.batch_size, learning_rate=task.learning_rate, seed=seed + 1,
                                   parameters="trainable", progress=progress)
        personal_accuracy = evaluate(model, data.private_heldout, mods)
        torch.save(model.personal_state(), self._personal_path)
        metrics = {
            "public_loss": public.loss, "public_accuracy": public.accuracy,
            "private_loss": private.loss, "private_accuracy": private.accuracy,
            "personal_accuracy": personal_accuracy,
            "train_seconds": time.perf_counter() - started,
        }
        log.info("round %d trained: public acc %.3f, personalised held-out acc %.3f in %.1fs",
                 task.round_number, public.accuracy, personal_accuracy, metrics["train_seconds"])
        return RoundOutcome(delta=delta, metrics=metrics, public_samples=len(data.public),
                            private_samples=len(data.private_train))
