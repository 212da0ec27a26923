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

A robust rule (coordinate-wise median or trimmed mean) needs every update at once, so it does not
stream: at commit the round's updates are decoded one at a time and spilled to disk, then reduced in
coordinate blocks (``mlecs.aggregation.blockwise``), with the same weights as the mean would use.
Clipping (``clip_norm``) applies to each update before any rule.

The sample count in an update's header is the device's word. With ``max_weight_ratio`` = k, no update
counts more samples than k times the round's lower median count (``capped_samples``): a device that
claims 2^31 samples weighs as much as one with k times a typical peer's data, no more. When a cap bites
the running sums were built with the claimed counts, so the commit adds the round's updates again from
their blobs with the capped ones; an honest round never pays for that.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlecs.aggregation.blockwise import SpilledUpdates, robust_aggregate
from mlecs.aggregation.claims import capped_sample_counts
from mlecs.aggregation.lora_exact import StreamingLoraProducts, merge_lora_products
from mlecs.aggregation.robust import clip_update
from mlecs.aggregation.streaming import StreamingAverage, merge_averages
from mlecs.codec import decode_tensors
from mlecs.tensor_names import FUSED_TENSOR
from server.domain.federation_config import FederationConfig
from server.domain.models import Update
from server.domain.scheduling import staleness_weight
from server.learning.global_model import apply_delta

_NO_EVIDENCE = ("no-evidence",)


@dataclass
class AggregateResult:
    tensors: dict[str, np.ndarray]
    quality: list[float]
    """MMA's noise factor of each update (1 where nobody had evidence)."""
    fused: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    """(public sample ids, fused z) of every update that carried them: the cloud tunes toward these."""
    excluded_devices: list[str] = field(default_factory=list)
    """Robust rules: devices whose update was left out as an outlier (``exclude_above``,
    ``exclude_cosine_below``)."""
    anomaly_scores: dict[str, float] = field(default_factory=dict)
    """Robust rules: each device's anomaly score (per tensor, its distance to the coordinate-wise median
    over the median distance of that tensor's holders, averaged by tensor size)."""
    centre_cosines: dict[str, float] = field(default_factory=dict)
    """Robust rules: each device's cosine with the coordinate-wise median (per tensor, averaged by size)."""
    capped_devices: list[str] = field(default_factory=list)
    """Devices whose claimed sample count ``max_weight_ratio`` capped."""


def version_staleness(version_ids: Sequence[str], round_base: str | None, update_base: str | None) -> int:
    """Versions between an update's base and its round's (``version_ids`` in creation order)."""
    order = {v: i for i, v in enumerate(version_ids)}
    current = order.get(round_base or "", len(version_ids) - 1)
    return max(0, current - order.get(update_base or "", current))


class RoundAccumulator:
    """Running weighted sums of one round's updates, grouped by the weight factor still to come."""

    def __init__(self, config: FederationConfig, base: dict[str, np.ndarray] | None = None,
                 samples: dict[str, int] | None = None) -> None:
        self._config = config
        self._samples = samples or {}  # update id -> its capped sample count, where a cap bit
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
        tensors, z = _prepared(config, tensors)
        weight, key = own_weight(config, update, staleness, self._samples.get(update.id))
        modalities, agreement = frozenset(update.modalities), update.anchor_agreement
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
        return group_scales(self._evidence, self._silent, self._config.agreement_temperature)

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


def _prepared(config: FederationConfig, tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                                                 np.ndarray | None]:
    """An update's tensors as every rule takes them (fused features apart, clipped to ``clip_norm``), and
    its fused features."""
    tensors = dict(tensors)
    z = tensors.pop(FUSED_TENSOR, None)
    if config.clip_norm:
        tensors, _ = clip_update(tensors, config.clip_norm)
    return tensors, z


def update_samples(config: FederationConfig, update: Update) -> int:
    """The samples an update's change was learned on: its public shard, plus its private training data
    when the federation's upload stage is ``private``."""
    if config.upload_stage == "private":
        return update.public_samples + update.private_samples
    return update.public_samples


def capped_samples(config: FederationConfig, updates: Sequence[Update]) -> dict[str, int]:
    """Update id -> its sample count capped at ``max_weight_ratio`` times the round's lower median count,
    for the updates the cap lowers (none: empty). The lower median, so that with two updates the honest
    one sets the bar; with fewer than half the round inflating its counts, an honest count sets it."""
    counts = [max(update_samples(config, u), 1) for u in updates]
    capped = capped_sample_counts(counts, config.max_weight_ratio)
    return {u.id: cap for u, count, cap in zip(updates, counts, capped, strict=True) if cap < count}


def own_weight(config: FederationConfig, update: Update, staleness: int,
               samples: int | None = None) -> tuple[float, Hashable]:
    """The part of an update's weight known from the update alone, and the peer group whose factor
    completes it (``group_scales``): modality count × samples (MMA) or samples (FedAvg; both counted by
    ``update_samples``, or ``samples`` when the round capped them), × the staleness discount,
    × exp((agreement - 1)/τ) when MMA has anchor evidence for it."""
    samples = max(update_samples(config, update) if samples is None else samples, 1)
    weight = float(len(update.modalities) * samples if config.aggregation == "mma" else samples)
    weight *= staleness_weight(staleness, config.staleness_exponent)
    agreement = update.anchor_agreement
    if config.aggregation == "mma" and agreement is not None:
        # exp((a - 1)/τ) <= 1; the group's exp((1 - best)/τ) is applied at the end (see merge). With
        # τ >= MIN_AGREEMENT_TEMPERATURE neither can overflow or vanish: |a - 1| <= 2.
        return weight * math.exp((agreement - 1.0) / config.agreement_temperature), frozenset(update.modalities)
    return weight, _NO_EVIDENCE


def group_scales(evidence: Sequence[tuple[frozenset[str], float]], silent: int,
                 tau: float) -> tuple[dict[Hashable, float], list[float]]:
    """Each peer group's remaining factor exp((1 - best)/τ), and every update's noise factor
    exp((a - best)/τ) (updates without evidence last, at the mean factor) for the round's metrics."""
    best: dict[frozenset[str], float] = {}
    for group, a in evidence:
        best[group] = max(a, best.get(group, a))
    factors = [math.exp((a - best[group]) / tau) for group, a in evidence]
    # As in agreement_weights: a client without evidence gets the mean factor of those with it.
    neutral = float(np.mean(factors)) if factors else 1.0
    scales: dict[Hashable, float] = {group: math.exp((1.0 - b) / tau) for group, b in best.items()}
    scales[_NO_EVIDENCE] = neutral
    return scales, factors + [neutral] * silent


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
              accumulator: RoundAccumulator | None = None, *, spill_dir: Path | None = None,
              block_bytes: int = 64 * 1024 * 1024) -> AggregateResult:
    """The round's new tensors from its accepted ``updates``: those the accumulator already holds are
    used as they are, the others are decoded from their blobs one at a time and added. A robust rule
    spills every update under ``spill_dir`` (a temporary directory, removed after) and reduces them
    in blocks of at most ``block_bytes``."""
    caps = capped_samples(config, updates)
    capped_devices = sorted(u.device_id for u in updates if u.id in caps)
    if config.robust_rule != "none":
        result = aggregate_robust(config, base, updates, staleness, read_blob, spill_dir=spill_dir,
                                  block_bytes=block_bytes, samples=caps)
    else:
        wanted = {u.id for u in updates}
        if accumulator is None or caps or not accumulator.included <= wanted:
            accumulator = RoundAccumulator(config, base, samples=caps)
        for update, stale in zip(updates, staleness, strict=True):
            if update.id not in accumulator.included:
                accumulator.add(update, decode_tensors(read_blob(update)), stale)
        result = accumulator.result(base)
    result.capped_devices = capped_devices
    return result


def aggregate_robust(config: FederationConfig, base: dict[str, np.ndarray], updates: list[Update],
                     staleness: list[int], read_blob: Callable[[Update], bytes], *, spill_dir: Path | None = None,
                     block_bytes: int = 64 * 1024 * 1024, samples: dict[str, int] | None = None) -> AggregateResult:
    """base + the coordinate-wise weighted median or trimmed mean of the (clipped) deltas, outliers left
    out when ``exclude_above`` or ``exclude_cosine_below`` is set. Weights are the mean's own (MMA or FedAvg,
    staleness, agreement)."""
    samples = samples or {}
    weighted = [own_weight(config, u, s, samples.get(u.id)) for u, s in zip(updates, staleness, strict=True)]
    evidence = [(frozenset(u.modalities), float(u.anchor_agreement)) for u in updates
                if config.aggregation == "mma" and u.anchor_agreement is not None]
    scales, quality = group_scales(evidence, len(updates) - len(evidence), config.agreement_temperature)
    device_of = {u.id: u.device_id for u in updates}
    fused: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if spill_dir is not None:
        spill_dir.mkdir(parents=True, exist_ok=True)
    with SpilledUpdates(spill_dir, block_bytes=block_bytes) as spilled:  # a private directory, removed after
        for update, (weight, key) in zip(updates, weighted, strict=True):
            tensors, z = _prepared(config, decode_tensors(read_blob(update)))
            spilled.add(update.id, tensors, weight * scales[key])
            if z is not None:
                fused[update.id] = (np.asarray(update.fused_sample_ids, dtype=np.int64), z)
        robust = robust_aggregate(spilled, config.robust_rule, trim=config.trim_fraction,
                                  exclude_above=config.exclude_above or None,
                                  exclude_cosine_below=config.exclude_cosine_below)
    # An outlier's fused features are left out of cloud tuning too.
    kept_fused = [pair for update_id, pair in fused.items() if update_id not in robust.excluded]
    return AggregateResult(tensors=apply_delta(base, robust.tensors), quality=quality, fused=kept_fused,
                           excluded_devices=sorted(device_of[u] for u in robust.excluded),
                           anomaly_scores={device_of[u]: score for u, score in robust.scores.items()},
                           centre_cosines={device_of[u]: cosine for u, cosine in robust.cosines.items()})
