"""The anchor generator: what the coordinator publishes beside each global adapter.

Text anchors (MiniLM embeddings of the class descriptions) do not depend on the devices or the round,
so they are computed once per process. Sample anchors come from the cloud model: after each round the
coordinator tunes it on the public set (SE-CCL edge -> cloud) and embeds every public sample once. The
result is encoded once per version and stored with it; every device downloads the same bytes, so the
cost does not grow with the number of devices.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlecs.codec import CodecKind, encode_tensors
from server.learning.task_data import TaskData

_lock = threading.Lock()
_text: dict[tuple[str, ...], np.ndarray] = {}


def label_descriptions(config: Any) -> tuple[str, ...]:
    """What the language model embeds per class: the task's label texts, or AV-MNIST's digit descriptions."""
    task = config.task_spec()
    if task is None:
        from mlecs.model.text import class_descriptions

        return tuple(class_descriptions())
    return tuple(task.label_descriptions())


def text_anchors(config: Any) -> np.ndarray:
    """The class text anchors [num_classes, 384] of a federation's labels, computed once per label set."""
    descriptions = label_descriptions(config)
    with _lock:
        if descriptions not in _text:
            from mlecs.model.text import text_anchors_of

            _text[descriptions] = text_anchors_of(list(descriptions))
        return _text[descriptions]


def encoded_text_anchors(config: Any) -> bytes:
    """The anchor set of a version with no cloud representations (version 0, or no public set): text only."""
    from mlecs.learning.seccl import TEXT_ANCHORS

    return encode_tensors({TEXT_ANCHORS: text_anchors(config)}, CodecKind.FP32)


@dataclass(frozen=True)
class CloudRoundResult:
    anchors: bytes
    metrics: dict[str, float]


@dataclass
class CloudTuner:
    """The cloud model: tuned each round on the public set, evaluated, then used to generate anchors.

    ``data`` holds the coordinator's public set and test split per federation. Each cloud model has its lock:
    jobs on one model take turns, jobs of federations with different models run side by side.
    """

    data: TaskData

    def __post_init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._models: dict[str, Any] = {}

    def _lock_for(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def run_round(self, config: Any, global_tensors: Mapping[str, np.ndarray],
                  edge_fused: Sequence[tuple[np.ndarray, np.ndarray]], seed: int) -> CloudRoundResult:
        """Tunes the cloud model from ``global_tensors``, evaluates it and returns the next anchor set.

        ``config`` is the federation's config (the domain object); ``edge_fused`` the (ids, z) the
        round's accepted updates carried. Without a public set the anchors are the text anchors alone.
        """
        from mlecs.learning import evaluate
        from mlecs.learning.cloud import CloudRecipe, adopt_global, generate_anchors, mean_edge_fused, tune_cloud
        from mlecs.model import ModelConfig, build_edge_model

        data = self.data.for_config(config)
        if data.public is None:
            return CloudRoundResult(anchors=encoded_text_anchors(config), metrics={})
        devices = ModelConfig.from_dict(dict(config.model))
        own = ModelConfig.from_dict(dict(config.cloud_model)) if config.cloud_model is not None else devices
        key = repr(own) + f"/{config.seed}"
        with self._lock_for(key):
            model = self._models.get(key)
            if model is None:
                model = build_edge_model(own, own.modality_names, config.seed)
                self._models[key] = model
            edge_config = None if own == devices else devices
            text = text_anchors(config)
            recipe = CloudRecipe(epochs=max(config.cloud_epochs, 1), batch_size=config.batch_size,
                                 learning_rate=config.learning_rate, seccl_weight=config.seccl_weight,
                                 seccl_temperature=config.seccl_temperature, ccl_weight=config.ccl_weight)
            metrics: dict[str, float] = {}
            if config.cloud_epochs > 0:
                stats = tune_cloud(model, global_tensors, data.public, recipe=recipe, seed=seed,
                                   edge_fused=mean_edge_fused(list(edge_fused)), text_anchors=text,
                                   edge_config=edge_config)
                metrics["cloud_train_loss"] = stats.loss
            else:
                adopt_global(model, global_tensors, edge_config)
            if data.test is not None:
                metrics["cloud_accuracy"] = evaluate(model, data.test, frozenset(own.modality_names))
            anchors = generate_anchors(model, data.public, text)
            return CloudRoundResult(anchors=encode_tensors(anchors.to_tensors(), CodecKind.FP32), metrics=metrics)
