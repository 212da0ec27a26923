"""FedAvg: every client weighted by its number of training samples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mlecs.aggregation.base import ClientUpdate, normalise_weights, weighted_average_per_tensor

__all__ = ["fedavg", "fedavg_weights"]


def fedavg_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """Weights proportional to each client's sample count, summing to 1 (AggregationError if all 0)."""
    return normalise_weights([update.num_samples for update in updates], "sample counts")


def fedavg(updates: Sequence[ClientUpdate]) -> dict[str, np.ndarray]:
    """Sample-weighted average of each tensor over the clients holding it (float32 results)."""
    return weighted_average_per_tensor(updates, fedavg_weights(updates))
