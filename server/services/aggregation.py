"""The new global adapter of a round, built from running sums so memory stays flat in the fleet size.

Each update is added once to a ``RoundAccumulator`` with the part of its weight known on its own
(modality count × samples × staleness discount × exp(agreement / τ)); the part that depends on the
other updates (MMA's noise term compares a client with the best of its modality-set peers) is one
factor per peer group, applied when the groups are merged at commit. The result is exactly the rule
of ``mlecs.aggregation`` (``mma_weights`` with ``agreement_weights``, or FedAvg), per tensor over its
holders.

The replica that accepts an update adds it while the update is still decoded from validation, so the
commit does not decode it again. Updates this process did not see (accepted by another replica, or
before a restart) are read from the blob store and added at commit, one at a time.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mlecs.aggregation.streaming import (
    StreamingAverage,
    StreamingLoraProducts,
    merge_averages,
    merge_lora_products,
)
from mlecs.codec import decode_tensors
from server.domain.models import FederationConfig, Update
from server.domain.scheduling import staleness_weight
from server.learning.global_model import FUSED_TENSOR, apply_delta

_NO_EVIDENCE = ("no-evidence",)


@dataclass
class AggregateResult:
    tensors: dict[str, np.ndarray]
    quality: list[float]
    """MMA's noise factor of each update (1 where nobody had evidence)."""
    fused: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    """(public sample ids, fused z) of every update that carried them: the cloud tunes toward these."""


def version_staleness(version_ids: Sequence[str], round_base: str | None, update_base: str | None) -> int:
    """Versions between an update's base and its round's (``version_ids`` in creation order)."""
    order = {v: i for i, v in enumerate(version_ids)}
    current = order.get(round_base or "", len(version_ids) - 1)
    return max(0, current - order.get(update_base or "", current))


class RoundAccumulator:
    """Running weighted sums of one round's updates, grouped by the weight factor still to come."""

    def __init__(self, config: FederationConfig, base: dict[str, np.ndarray] | None = None) -> None:
        self._config = config
        self._base = base  # only the exact LoRA rule needs it (products of full weights)
        self._lock = threading.Lock()
        self._groups: dict[Hashable, tuple[StreamingAverage, StreamingLoraProducts | None]] = {}
        self._evidence: list[tuple[frozenset[str], float]] = []
        self._silent = 0
        self.included: set[str] = set()
        self.fused: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, update: Update, tensors: dict[str, np.ndarray], staleness: int) -> None:
        """Adds an accepted update (its decoded tensors, ``fused.z`` included or not); once per update."""
        config = self._config
        tensors = dict(tensors)
        z = tensors.pop(FUSED_TENSOR, None)
        modalities = frozenset(update.modalities)
        samples = max(update.public_samples, 1)
        weight = float(len(modalities) * samples if config.aggregation == "mma" else samples)
        weight *= staleness_weight(staleness, config.staleness_exponent)
        key: Hashable = _NO_EVIDENCE
        agreement = update.anchor_agreement
        if config.aggregation == "mma" and agreement is not None:
            # exp((a - 1)/τ) <= 1; the group's exp((1 - best)/τ) is applied at the end (see merge). With
            # τ >= MIN_AGREEMENT_TEMPERATURE neither can overflow or vanish: |a - 1| <= 2.
            weight *= math.exp((agreement - 1.0) / config.agreement_temperature)
            key = modalities
        with self._lock:
            if update.id in self.included:
                return
            average, products = self._groups.setdefault(
                key, (StreamingAverage(), StreamingLoraProducts() if config.lora_mode == "exact" else None))
            average.add(update.device_id, tensors, weight)
            if products is not None:
                if self._base is None:
                    raise RuntimeError("the exact LoRA rule needs the round's base tensors")
                full = {n: self._base[n] + t for n, t in tensors.items() if n in self._base}
                products.add(update.device_id, full, weight)
            if key is _NO_EVIDENCE:
                self._silent += 1
            else:
                self._evidence.append((modalities, float(agreement)))  # type: ignore[arg-type]
            if z is not None:
                self.fused.append((np.asarray(update.fused_sample_ids, dtype=np.int64), z))
            self.included.add(update.id)

    def _group_scales(self) -> tuple[dict[Hashable, float], list[float]]:
        """Each group's remaining factor, and every update's noise factor (for the round's metrics)."""
        tau = self._config.agreement_temperature
        best: dict[frozenset[str], float] = {}
        for group, a in self._evidence:
            best[group] = max(a, best.get(group, a))
        factors = [math.exp((a - best[group]) / tau) for group, a in self._evidence]
        # As in agreement_weights: a client without evidence gets the mean factor of those with it.
        neutral = float(np.mean(factors)) if factors else 1.0
        scales: dict[Hashable, float] = {group: math.exp((1.0 - b) / tau) for group, b in best.items()}
        scales[_NO_EVIDENCE] = neutral
        return scales, factors + [neutral] * self._silent

    def result(self, base: dict[str, np.ndarray]) -> AggregateResult:
        """base + the weighted average of the deltas (exact LoRA factors in ``exact`` mode)."""
        with self._lock:
            scales, quality = self._group_scales()
            average = merge_averages([(avg, scales[key]) for key, (avg, _) in self._groups.items()])
            new = apply_delta(base, average.result())
            if self._config.lora_mode == "exact":
                products = merge_lora_products([(prod, scales[key]) for key, (_, prod) in self._groups.items()
                                                if prod is not None])
                new.update(products.result())
            return AggregateResult(tensors=new, quality=quality, fused=list(self.fused))


class RoundAccumulators:
    """The accumulators of the rounds this process is accepting updates for (shared by the services)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._rounds: dict[str, RoundAccumulator] = {}

    def add(self, round_id: str, config: FederationConfig, base: Callable[[], dict[str, np.ndarray]],
            update: Update, tensors: dict[str, np.ndarray], staleness: int) -> None:
        """Adds an update as it is accepted. ``base`` loads the round's base tensors (exact LoRA only)."""
        with self._guard:
            accumulator = self._rounds.get(round_id)
            if accumulator is None:
                accumulator = RoundAccumulator(config, base() if config.lora_mode == "exact" else None)
                self._rounds[round_id] = accumulator
        accumulator.add(update, tensors, staleness)

    def take(self, round_id: str) -> RoundAccumulator | None:
        with self._guard:
            return self._rounds.pop(round_id, None)

    def keep_only(self, round_ids: set[str]) -> None:
        """Forgets rounds that finished elsewhere (another replica committed or failed them)."""
        with self._guard:
            for stale in set(self._rounds) - round_ids:
                del self._rounds[stale]


def aggregate(config: FederationConfig, base: dict[str, np.ndarray], updates: list[Update],
              staleness: list[int], read_blob: Callable[[Update], bytes],
              accumulator: RoundAccumulator | None = None) -> AggregateResult:
    """The round's new tensors from its accepted ``updates``: those the accumulator already holds are
    used as they are, the others are decoded from their blobs one at a time and added."""
    wanted = {u.id for u in updates}
    if accumulator is None or not accumulator.included <= wanted:
        accumulator = RoundAccumulator(config, base)
    for update, stale in zip(updates, staleness, strict=True):
        if update.id not in accumulator.included:
            accumulator.add(update, decode_tensors(read_blob(update)), stale)
    return accumulator.result(base)
