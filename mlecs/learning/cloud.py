"""The cloud's side of SE-CCL: tune the cloud model toward the edges, then generate the round's anchors.

The cloud holds the whole public set with every modality. Each round it starts from the new global
adapter, trains on the public set with the task loss, the class-anchor term and, for the public ids
edges uploaded, a pull toward the edges' mean fused ``z`` (edge -> cloud). The tuned model then embeds
every public sample once; those fused representations are the sample anchors every edge receives
(cloud -> edge). The cost is one pass over the public set per round, whatever the number of devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mlecs.data.split import LabelledSplit
from mlecs.learning.seccl import Anchors, alignment_loss
from mlecs.learning.supervised import TrainStats, fused_representations, train_supervised
from mlecs.model.config import ModelConfig
from mlecs.model.edge import EdgeModel


@dataclass(frozen=True)
class CloudRecipe:
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 1e-3
    seccl_weight: float = 0.5
    seccl_temperature: float = 0.1
    ccl_weight: float = 0.1


def mean_edge_fused(uploads: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Averages the edges' unit-normalised fused z per public id: (sorted unique ids, mean z [k, d])."""
    uploads = [(np.asarray(i, dtype=np.int64), np.asarray(z, dtype=np.float32)) for i, z in uploads if len(i)]
    if not uploads:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    ids = np.concatenate([i for i, _ in uploads])
    z = np.concatenate([v for _, v in uploads])
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    unique, inverse = np.unique(ids, return_inverse=True)
    sums = np.zeros((len(unique), z.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, z)
    counts = np.bincount(inverse, minlength=len(unique))[:, None]
    return unique, (sums / counts).astype(np.float32)


def tune_cloud(
    model: EdgeModel,
    global_tensors: Mapping[str, np.ndarray],
    public: LabelledSplit,
    *,
    recipe: CloudRecipe,
    seed: int,
    edge_fused: tuple[np.ndarray, np.ndarray] | None = None,
    text_anchors: np.ndarray | None = None,
    edge_config: ModelConfig | None = None,
) -> TrainStats:
    """Loads the global adapter into the full-modality cloud model and tunes it on the public set.

    ``edge_config``: the devices' model, when the cloud's differs from it (see :func:`adopt_global`).
    """
    adopt_global(model, global_tensors, edge_config)
    every = frozenset(model.config.modality_names)
    targets = None
    if edge_fused is not None and len(edge_fused[0]) >= 2:
        targets = Anchors(edge_fused[0], edge_fused[1])  # edge -> cloud: the edges' mean z per public id
    extra = alignment_loss(public.sample_ids, targets=targets, class_text=text_anchors,
                           fused_dim=model.config.fused_dim, weight=recipe.seccl_weight,
                           temperature=recipe.seccl_temperature)
    return train_supervised(model, public, every, epochs=recipe.epochs, batch_size=recipe.batch_size,
                            learning_rate=recipe.learning_rate, seed=seed, parameters="shared",
                            ccl_weight=recipe.ccl_weight, extra_loss=extra)


def adopt_global(model: EdgeModel, global_tensors: Mapping[str, np.ndarray], edge_config: ModelConfig | None) -> None:
    """Loads the global adapter into the cloud model.

    When the devices run the same model as the cloud (``edge_config`` None or equal), every tensor is
    replaced. When the cloud's backbone is larger (the devices hold the first layers of MiniLM, the cloud
    all six), it takes the extractors, the connector and the LoRA of the layers both have, and keeps its
    own upper layers' LoRA and its own head: the devices' head reads another backbone's output.
    """
    tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in global_tensors.items()}
    if edge_config is None or edge_config == model.config:
        model.load_shared_state(tensors)
    else:
        model.load_matching_shared_state(tensors, exclude=("head.",))


def generate_anchors(model: EdgeModel, public: LabelledSplit, text_anchors: np.ndarray | None) -> Anchors:
    """One pass of the cloud model over the public set: the sample anchors (plus the text anchors)."""
    fused = fused_representations(model, public, frozenset(model.config.modality_names)).numpy().astype(np.float32)
    return Anchors(sample_ids=public.sample_ids.astype(np.int64), fused=fused, text=text_anchors)
