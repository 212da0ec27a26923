"""The new global adapter of a round, computed in two passes so memory stays flat in the fleet size.

Pass 1 sets every update's weight from its row alone (modalities, sample count, the anchor agreement
scored at acceptance, staleness). Pass 2 decodes one update blob at a time into running sums
(``mlecs.aggregation.streaming``) and lets it go.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mlecs.aggregation import ClientUpdate, fedavg_weights, mma_weights
from mlecs.aggregation.quality import agreement_weights
from mlecs.aggregation.streaming import StreamingAverage, StreamingLoraProducts
from mlecs.codec import decode_tensors
from server.domain.models import FederationConfig, Update
from server.domain.scheduling import staleness_weight
from server.learning.global_model import FUSED_TENSOR, apply_delta


@dataclass
class AggregateResult:
    tensors: dict[str, np.ndarray]
    weights: list[float]
    """Each update's relative weight (before per-tensor renormalisation over holders)."""
    quality: list[float]
    """MMA's noise factor per update (1 where there was no evidence)."""
    fused: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    """(public sample ids, fused z) of every update that carried them: the cloud tunes toward these."""


def update_weights(config: FederationConfig, updates: list[Update],
                   staleness: list[int]) -> tuple[list[float], list[float]]:
    """(weights, noise factors): the rule's weights, times each update's staleness discount."""
    metas = [ClientUpdate(client_id=u.device_id, tensors={}, num_samples=max(u.public_samples, 1),
                          modalities=frozenset(u.modalities)) for u in updates]
    agreements = [u.anchor_agreement for u in updates]
    # Peers with the same modality set are compared with each other (see agreement_weights).
    quality = agreement_weights(agreements, config.agreement_temperature,
                                groups=[frozenset(u.modalities) for u in updates])
    if config.aggregation == "mma":
        weights = mma_weights(metas, quality=quality if any(a is not None for a in agreements) else None)
    else:
        weights = fedavg_weights(metas)
    discounts = [staleness_weight(s, config.staleness_exponent) for s in staleness]
    return [w * d for w, d in zip(weights, discounts, strict=True)], quality


def aggregate(config: FederationConfig, base: dict[str, np.ndarray], updates: list[Update],
              staleness: list[int], read_blob: Callable[[Update], bytes]) -> AggregateResult:
    """base + the weighted average of the updates' deltas (exact LoRA factors in ``exact`` mode)."""
    weights, quality = update_weights(config, updates, staleness)
    average = StreamingAverage()
    products = StreamingLoraProducts() if config.lora_mode == "exact" else None
    fused = []
    for update, weight in zip(updates, weights, strict=True):
        tensors = decode_tensors(read_blob(update))
        z = tensors.pop(FUSED_TENSOR, None)
        if z is not None:
            fused.append((np.asarray(update.fused_sample_ids, dtype=np.int64), z))
        average.add(update.device_id, tensors, weight)
        if products is not None:  # the exact rule needs full weights: base + this client's delta
            products.add(update.device_id, {n: base[n] + t for n, t in tensors.items() if n in base}, weight)
        del tensors
    new = apply_delta(base, average.result())
    if products is not None:
        new.update(products.result())
    return AggregateResult(tensors=new, weights=weights, quality=quality, fused=fused)
