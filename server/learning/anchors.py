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
from pathlib import Path
from typing import Any

import numpy as np

from mlecs.codec import CodecKind, encode_tensors

_lock = threading.Lock()
_text: np.ndarray | None = None


def text_anchors() -> np.ndarray:
    """The class text anchors [num_classes, 384], computed on first use."""
    global _text
    with _lock:
        if _text is None:
            from mlecs.model.text import class_text_anchors

            _text = class_text_anchors()
        return _text


def encoded_text_anchors() -> bytes:
    """The anchor set of a version with no cloud representations yet (version 0): text anchors only."""
    from mlecs.learning.seccl import TEXT_ANCHORS

    return encode_tensors({TEXT_ANCHORS: text_anchors()}, CodecKind.FP32)


@dataclass(frozen=True)
class CloudRoundResult:
    anchors: bytes
    metrics: dict[str, float]


@dataclass
class CloudTuner:
    """The cloud model: tuned each round on the public set, evaluated, then used to generate anchors.

    The public set and test split are loaded once; a lock keeps concurrent commits off one model.
    """

    dataset_dir: Path | None = None
    setting: str = "canonical"

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._data: Any = None
        self._models: dict[str, Any] = {}

    def run_round(self, config: Any, global_tensors: Mapping[str, np.ndarray],
                  edge_fused: Sequence[tuple[np.ndarray, np.ndarray]], seed: int) -> CloudRoundResult:
        """Tunes the cloud model from ``global_tensors``, evaluates it and returns the next anchor set.

        ``config`` is the federation's config (the domain object); ``edge_fused`` the (ids, z) the
        round's accepted updates carried.
        """
        from mlecs.data.avmnist import load_avmnist
        from mlecs.data.partition import split_public
        from mlecs.learning import evaluate
        from mlecs.learning.cloud import CloudRecipe, adopt_global, generate_anchors, mean_edge_fused, tune_cloud
        from mlecs.model import ModelConfig, build_edge_model

        with self._lock:
            if self._data is None:
                self._data = load_avmnist(self.dataset_dir, setting=self.setting)  # type: ignore[arg-type]
            # The same public set the devices' partitions carve up (same fraction, same seed).
            public_index, _ = split_public(len(self._data.train), config.public_fraction, config.seed)
            public = self._data.train.subset(public_index)
            devices = ModelConfig.from_dict(dict(config.model))
            own = ModelConfig.from_dict(dict(config.cloud_model)) if config.cloud_model is not None else devices
            key = repr(own) + f"/{config.seed}"
            model = self._models.get(key)
            if model is None:
                model = build_edge_model(own, own.modality_names, config.seed)
                self._models[key] = model
            edge_config = None if own == devices else devices
            text = text_anchors()
            recipe = CloudRecipe(epochs=max(config.cloud_epochs, 1), batch_size=config.batch_size,
                                 learning_rate=config.learning_rate, seccl_weight=config.seccl_weight,
                                 seccl_temperature=config.seccl_temperature, ccl_weight=config.ccl_weight)
            metrics: dict[str, float] = {}
            if config.cloud_epochs > 0:
                stats = tune_cloud(model, global_tensors, public, recipe=recipe, seed=seed,
                                   edge_fused=mean_edge_fused(list(edge_fused)), text_anchors=text,
                                   edge_config=edge_config)
                metrics["cloud_train_loss"] = stats.loss
            else:
                adopt_global(model, global_tensors, edge_config)
            metrics["cloud_accuracy"] = evaluate(model, self._data.test, frozenset(own.modality_names))
            anchors = generate_anchors(model, public, text)
            return CloudRoundResult(anchors=encode_tensors(anchors.to_tensors(), CodecKind.FP32), metrics=metrics)
