"""Aggregation rules for client updates, by name: pure functions from updates to averaged tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mlecs.aggregation.base import (
    AggregationError,
    ClientUpdate,
    normalise_weights,
    weighted_average_per_tensor,
)
from mlecs.aggregation.fedavg import fedavg, fedavg_weights
from mlecs.aggregation.mma import mma, mma_weights

__all__ = [
    "AGGREGATORS",
    "AggregationError",
    "Aggregator",
    "ClientUpdate",
    "fedavg",
    "fedavg_weights",
    "get_aggregator",
    "mma",
    "mma_weights",
    "normalise_weights",
    "weighted_average_per_tensor",
]

Aggregator = Callable[[Sequence[ClientUpdate]], dict[str, np.ndarray]]

AGGREGATORS: dict[str, Aggregator] = {"fedavg": fedavg, "mma": mma}


def get_aggregator(name: str) -> Aggregator:
    """The aggregation rule registered under ``name`` (case-insensitive); ValueError lists known ones."""
    try:
        return AGGREGATORS[name.strip().lower()]
    except KeyError:
        known = ", ".join(sorted(AGGREGATORS))
        raise ValueError(f"unknown aggregator {name!r}; known aggregators: {known}") from None
