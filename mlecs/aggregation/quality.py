"""MMA's noise term: how well a client's uploaded fused representations agree with the cloud's anchors.

A client whose ``z`` for public samples points the same way as the cloud's anchors for the same ids is
learning the shared representation; one whose ``z`` does not is noisy (bad data, a broken sensor, or
an attacker) and should weigh less. Pure functions of arrays.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from mlecs.aggregation.base import AggregationError

__all__ = ["agreement_weights", "anchor_agreement"]


def anchor_agreement(fused: np.ndarray, anchors: np.ndarray) -> float:
    """Mean cosine similarity between rows of ``fused`` and the rows of ``anchors`` for the same ids, in [-1, 1]."""
    fused = np.asarray(fused, dtype=np.float64)
    anchors = np.asarray(anchors, dtype=np.float64)
    if fused.shape != anchors.shape or fused.ndim != 2 or fused.shape[0] == 0:
        raise AggregationError(
            f"agreement needs two equal non-empty [k, d] arrays, got {fused.shape} and {anchors.shape}")
    if not (np.all(np.isfinite(fused)) and np.all(np.isfinite(anchors))):
        raise AggregationError("fused representations hold non-finite values")
    norms = np.linalg.norm(fused, axis=1) * np.linalg.norm(anchors, axis=1)
    cosine = np.einsum("ij,ij->i", fused, anchors) / np.maximum(norms, 1e-12)
    if not np.all(np.isfinite(cosine)):
        raise AggregationError("fused representations hold non-finite values")
    return float(np.clip(cosine.mean(), -1.0, 1.0))


def agreement_weights(agreements: Sequence[float | None], temperature: float = 0.2,
                      groups: Sequence[Hashable] | None = None) -> list[float]:
    """Quality factors in (0, 1]: ``exp((a_k - max_j a_j) / temperature)``, the max over k's group.

    The best-agreeing client of a group gets 1; one ``temperature`` of cosine below it gets 1/e.
    ``groups`` (e.g. each client's modality set) makes the comparison among peers only: the cloud's
    anchors are computed from every modality, so a client that lacks one agrees less with them however
    clean its data is; judged against all clients it would be punished for what it lacks, not for
    noise. Without ``groups`` every client is one group. A client with no evidence (``None``: it
    uploaded no representations, or none had an anchor) gets the mean factor of those with evidence,
    so it is neither rewarded nor punished for silence; if nobody has evidence, all get 1.
    """
    if not temperature > 0:
        raise AggregationError(f"temperature must be > 0, got {temperature!r}")
    if groups is not None and len(groups) != len(agreements):
        raise AggregationError(f"{len(groups)} groups given for {len(agreements)} agreements")
    known = [a for a in agreements if a is not None]
    if any(not np.isfinite(a) for a in known):
        raise AggregationError(f"agreements must be finite, got {list(agreements)}")
    if not known:
        return [1.0] * len(agreements)
    keys = list(groups) if groups is not None else [0] * len(agreements)
    best: dict[Hashable, float] = {}
    for key, a in zip(keys, agreements, strict=True):
        if a is not None:
            best[key] = max(a, best.get(key, a))
    factors = {i: float(np.exp((a - best[keys[i]]) / temperature))
               for i, a in enumerate(agreements) if a is not None}
    neutral = float(np.mean(list(factors.values())))
    return [factors.get(i, neutral) for i in range(len(agreements))]
