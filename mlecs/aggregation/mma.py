"""MMA, modality-aware model aggregation: clients covering more modalities weigh more.

The paper's reference rule is ``w_k = |M_k| / sum_j |M_j|`` with ``|M_k|`` the number of modalities
client k trains with. With ``use_sample_counts`` (the default) we combine it multiplicatively with the
sample count, ``w_k ∝ |M_k| * n_k``, so a client with many modalities but few samples does not dominate.
Each tensor is then averaged over only the clients that hold it, weights renormalised over those.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mlecs.aggregation.base import ClientUpdate, normalise_weights, weighted_average_per_tensor

__all__ = ["mma", "mma_weights"]


def mma_weights(updates: Sequence[ClientUpdate], *, use_sample_counts: bool = True) -> list[float]:
    """Client weights ∝ modality count (times sample count by default), summing to 1.

    Raises AggregationError when there are no updates or every weight is zero (e.g. no samples).
    """
    if use_sample_counts:
        raw = [len(update.modalities) * update.num_samples for update in updates]
        return normalise_weights(raw, "modality-weighted sample counts")
    return normalise_weights([len(update.modalities) for update in updates], "modality counts")


def mma(updates: Sequence[ClientUpdate], *, use_sample_counts: bool = True) -> dict[str, np.ndarray]:
    """Modality-aware average of each tensor over the clients holding it (float32 results)."""
    return weighted_average_per_tensor(updates, mma_weights(updates, use_sample_counts=use_sample_counts))
