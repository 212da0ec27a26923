"""Server-side model operations: the initial global adapter, applying an aggregate, evaluation.

torch is imported here and only here on the coordinator, so the API and gRPC layers load without it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlecs.tensor_names import SAMPLE_ANCHOR_IDS, SAMPLE_ANCHORS
from server.learning.task_data import TaskData


def _model_config(model: Mapping[str, Any]) -> Any:
    from mlecs.model.config import ModelConfig  # torch-free: reading a config loads no model code

    return ModelConfig.from_dict(dict(model))


def initial_global_state(model: Mapping[str, Any], seed: int) -> dict[str, np.ndarray]:
    """The shared tensors of a freshly initialised full-modality edge model (version 0 of a federation)."""
    from mlecs.model import build_edge_model

    config = _model_config(model)
    edge = build_edge_model(config, config.modality_names, seed)
    return {name: t.numpy() for name, t in edge.shared_state().items()}


def check_cloud_model(model: Mapping[str, Any], cloud_model: Mapping[str, Any] | None) -> None:
    """Raises ValueError unless ``cloud_model`` (None: the devices' own) is a valid model whose fused
    representation has the devices' width: the anchors the cloud publishes live in that space."""
    if cloud_model is None:
        return
    devices, cloud = _model_config(model), _model_config(cloud_model)
    if cloud.fused_dim != devices.fused_dim:
        raise ValueError(f"cloud_model.fused_dim ({cloud.fused_dim}) must equal the devices' ({devices.fused_dim})")


def adapter_schema(model: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an update may carry in this federation."""
    from mlecs.model import shared_schema

    return shared_schema(_model_config(model))


def full_model_bytes(model: Mapping[str, Any]) -> int:
    """Bytes of the whole edge model in fp32: the denominator of the communication ratio."""
    from mlecs.model import full_model_fp32_bytes

    return int(full_model_fp32_bytes(_model_config(model)))


def fused_dim(model: Mapping[str, Any]) -> int:
    """Width of the fused representation z in this federation's model."""
    return int(_model_config(model).fused_dim)


def client_agreements(anchor_tensors: Mapping[str, np.ndarray],
                      fused: list[tuple[np.ndarray, np.ndarray] | None]) -> list[float | None]:
    """Per client: mean cosine of its uploaded z to the anchors of the same public ids (None: no evidence)."""
    from mlecs.aggregation.quality import anchor_agreement

    if SAMPLE_ANCHOR_IDS not in anchor_tensors:
        return [None] * len(fused)
    ids = np.asarray(anchor_tensors[SAMPLE_ANCHOR_IDS]).astype(np.int64)
    row_of = {int(i): r for r, i in enumerate(ids)}
    out: list[float | None] = []
    for item in fused:
        rows = [] if item is None else [(k, row_of[int(i)]) for k, i in enumerate(item[0]) if int(i) in row_of]
        if item is None or not rows:
            out.append(None)
            continue
        mine, theirs = zip(*rows, strict=True)
        out.append(anchor_agreement(item[1][list(mine)], anchor_tensors[SAMPLE_ANCHORS][list(theirs)]))
    return out


def apply_delta(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """base + delta for every tensor in base; tensors no client touched stay as they were."""
    out = {}
    for name, value in base.items():
        step = delta.get(name)
        out[name] = value if step is None else (value + step).astype(np.float32)
    return out


@dataclass
class GlobalEvaluator:
    """Evaluates a global adapter on the federation's test split, with every modality and with each alone.

    The backbone is slow to load, so models are cached for the evaluator's lifetime; a lock keeps
    concurrent aggregations from sharing one model instance. No test split: no metrics.
    """

    data: TaskData

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, Any] = {}

    def evaluate(self, federation_config: Any, tensors: Mapping[str, np.ndarray]) -> dict[str, float]:
        import torch

        from mlecs.learning import evaluate
        from mlecs.model import build_edge_model

        test = self.data.for_config(federation_config).test
        if test is None:
            return {}
        seed = federation_config.seed
        with self._lock:
            config = _model_config(federation_config.model)
            key = repr(config)
            edge = self._models.get(key)
            if edge is None:
                edge = build_edge_model(config, config.modality_names, seed)
                self._models[key] = edge
            edge.load_shared_state({name: torch.from_numpy(np.asarray(v)) for name, v in tensors.items()})
            every = frozenset(config.modality_names)
            # With every modality, then with each alone (a device that holds only that one).
            result = {"accuracy": evaluate(edge, test, every)}
            for modality in config.modality_names:
                result[f"accuracy_{modality}"] = evaluate(edge, test, frozenset({modality}))
            return result
