"""The edge model M = {E, C, B}.

``ModelConfig`` is importable without torch; the torch-backed names load lazily on first use, so
torch-free code (wire, codec, CLI) can share the config.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mlecs.model.config import ModelConfig

if TYPE_CHECKING:
    from mlecs.model.edge import (
        EdgeModel,
        ModelOutput,
        build_edge_model,
        full_model_fp32_bytes,
        shared_schema,
        tensor_modality,
    )

__all__ = [
    "EdgeModel",
    "ModelConfig",
    "ModelOutput",
    "build_edge_model",
    "full_model_fp32_bytes",
    "shared_schema",
    "tensor_modality",
]

_LAZY = {name: "mlecs.model.edge" for name in __all__ if name != "ModelConfig"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
