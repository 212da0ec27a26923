"""MMA, modality-aware model aggregation: clients covering more modalities weigh more.

The paper's reference rule is ``w_k = |M_k| / sum_j |M_j|`` with ``|M_k|`` the number of modalities
client k trains with. With ``use_sample_counts`` (the default) we combine it multiplicatively with the
sample count, ``w_k ∝ |M_k| * n_k``, so a client with many modalities but few samples does not dominate.
Each tensor is then averaged over only the clients that hold it, weights renormalised over those.
An optional per-client ``quality`` factor (``mlecs.aggregation.quality``: agreement of the client's
fused representations with the cloud's anchors) multiplies the weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mlecs.aggregation.base import AggregationError, ClientUpdate, normalise_weights, weighted_average_per_tensor

__all__ = ["mma", "mma_weights"]


def mma_weights(
    updates: Sequence[ClientUpdate], *, use_sample_counts: bool = True, quality: Sequence[float] | None = None
) -> list[float]:
    """Client weights ∝ modality count (times sample count by default, times ``quality`` if given), summing to 1.

    Raises AggregationError when there are no updates, ``quality`` does not match them or is negative,
    or every weight is zero (e.g. no samples).
    """
    raw = [float(len(update.modalities) * (update.num_samples if use_sample_counts else 1)) for update in updates]
    if quality is not None:
        if len(quality) != len(updates):
            raise AggregationError(f"{len(quality)} quality factors given for {len(updates)} client updates")
        if any(not (np.isfinite(q) and q >= 0) for q in quality):
            raise AggregationError(f"quality factors must be finite and non-negative, got {list(quality)}")
        raw = [w * float(q) for w, q in zip(raw, quality, strict=True)]
    return normalise_weights(raw, "modality-aware weights")


def mma(
    updates: Sequence[ClientUpdate], *, use_sample_counts: bool = True, quality: Sequence[float] | None = None
) -> dict[str, np.ndarray]:
    """Modality-aware average of each tensor over the clients holding it (float32 results)."""
    return weighted_average_per_tensor(
        updates, mma_weights(updates, use_sample_counts=use_sample_counts, quality=quality)
    )
