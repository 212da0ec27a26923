"""The load benchmarks' model: a tiny-backbone config whose shared adapter has about P parameters."""

from __future__ import annotations

import math
from typing import Any

FEATURE_DIMS = (32, 64, 128, 192, 256, 384, 512, 768, 1024)
LORA_RANKS = (4, 8)
_FUSED_STEP = 4  # fused_dim must be a multiple of num_soft_tokens (4 by default)
_SHAPE_SLACK = 0.005
"""Candidates this close (relative) to the best count compete on shape instead of count."""


def count_shared_params(model: dict[str, Any]) -> int:
    """Parameters of the shared adapter (every tensor an update may carry) of this model config."""
    from mlecs.model import ModelConfig, shared_schema

    return sum(math.prod(shape) for shape in shared_schema(ModelConfig.from_dict(model)).values())


def model_for_params(target: int) -> tuple[dict[str, Any], int]:
    """The tiny-backbone model config whose shared adapter size is closest to ``target``, and that size.

    For each (feature_dim, lora_rank) the count is affine in fused_dim, so two probes give the fused_dim
    to try and a third call gives its exact count. Among candidates about as close as the best, the one
    with fused_dim nearest 4 x feature_dim (the default models' proportion) wins.
    """
    if target < 1:
        raise ValueError(f"the parameter count must be positive, got {target}")
    candidates: list[tuple[dict[str, Any], int]] = []
    for feature_dim in FEATURE_DIMS:
        for rank in LORA_RANKS:
            base = {"backbone": "tiny", "lora_rank": rank, "feature_dim": feature_dim}
            first = count_shared_params({**base, "fused_dim": _FUSED_STEP})
            per_step = count_shared_params({**base, "fused_dim": 2 * _FUSED_STEP}) - first
            steps = max(0, round((target - first) / per_step))
            model = {**base, "fused_dim": _FUSED_STEP * (1 + steps)}
            candidates.append((model, count_shared_params(model)))
    best_error = min(abs(count - target) for _, count in candidates)
    close = [c for c in candidates if abs(c[1] - target) <= max(best_error, _SHAPE_SLACK * target)]
    return min(close, key=lambda c: (abs(math.log2(c[0]["fused_dim"] / (4 * c[0]["feature_dim"]))),
                                     c[0]["lora_rank"], abs(c[1] - target)))
