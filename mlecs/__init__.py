"""mlecs: federated multimodal learning between a cloud coordinator and edge devices.

``mlecs.load_model(DIR)`` loads a model directory for inference (see :mod:`mlecs.inference`); it is imported
on first use, so ``import mlecs`` stays light.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from mlecs.inference import load_model

        return load_model
    raise AttributeError(f"module 'mlecs' has no attribute {name!r}")
