"""Gauges the dashboards read that no single event sets: what a committed round was made of (modality
coverage, each modality set's share of the aggregation weight, its bytes) and the fleet as it stands
(devices enrolled and online per modality set, whether the database and Redis answer).

Labels are modality names or sorted, comma-joined modality sets: a handful of values, never a device id.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from prometheus_client import Gauge

from server import metrics
from server.domain.errors import UnavailableError
from server.domain.federation_config import FederationConfig
from server.domain.models import Update
from server.services.aggregation import group_scales, own_weight
from server.services.context import ServiceContext


def modality_set_label(modalities: Iterable[str]) -> str:
    return ",".join(sorted(modalities))


def weight_shares(config: FederationConfig, updates: Sequence[Update], staleness: Sequence[int]) -> dict[str, float]:
    """Each modality set's share of the round's aggregation weight, with the same factors the aggregation
    applies (``own_weight`` and the peer-group factor of ``group_scales``)."""
    weighted = [own_weight(config, u, s) for u, s in zip(updates, staleness, strict=True)]
    evidence = [(frozenset(u.modalities), float(u.anchor_agreement)) for u in updates
                if config.aggregation == "mma" and u.anchor_agreement is not None]
    scales, _ = group_scales(evidence, len(updates) - len(evidence), config.agreement_temperature)
    totals: defaultdict[str, float] = defaultdict(float)
    for update, (weight, group) in zip(updates, weighted, strict=True):
        totals[modality_set_label(update.modalities)] += weight * scales[group]
    whole = sum(totals.values())
    return {label: value / whole for label, value in totals.items()} if whole > 0 else {}


def _set_all(gauge: Gauge, values: dict[str, float], seen: set[str], *prefix: str) -> None:
    """Sets one sample per label and zeroes labels set before but absent now (a gauge keeps them otherwise);
    ``prefix`` holds the labels before the varying one (the federation)."""
    for label in seen - set(values):
        gauge.labels(*prefix, label).set(0)
    for label, value in values.items():
        gauge.labels(*prefix, label).set(value)
    seen |= set(values)


_seen: dict[tuple[str, str], set[str]] = {}
"""(federation, gauge) -> the labels set so far; the fleet gauges span every federation ("")."""


def observe_round(federation: str, config: FederationConfig, accepted: Sequence[Update],
                  staleness: Sequence[int]) -> None:
    """Called as a round of ``federation`` commits, with the updates it aggregated (under a robust rule,
    outliers it left out are still counted here)."""
    count = len(accepted)
    coverage = Counter(m for u in accepted for m in u.modalities)
    names = config.modality_names() or tuple(coverage)
    _set_all(metrics.MODALITY_COVERAGE, {m: coverage[m] / count for m in names} if count else {},
             _seen.setdefault((federation, "coverage"), set()), federation)
    _set_all(metrics.AGGREGATION_WEIGHT_SHARE, weight_shares(config, accepted, staleness),
             _seen.setdefault((federation, "weights"), set()), federation)
    metrics.ROUND_UPLOAD_BYTES.labels(federation).set(sum(u.declared_size for u in accepted))


def observe_fleet(ctx: ServiceContext) -> None:
    """Devices enrolled (unrevoked) and online per modality set, over every federation. While Redis does
    not answer the online gauge keeps its last values rather than drop to zero (its health gauge says so)."""
    enrolled: Counter[str] = Counter()
    online: Counter[str] = Counter()
    presence_known = True
    for federation in ctx.store.list_federations():
        devices = [d for d in ctx.store.list_devices(federation.id) if not d.revoked]
        live: set[str] = set()
        if presence_known:
            try:
                live = ctx.presence.online(d.id for d in devices)
            except UnavailableError:
                presence_known = False
        for device in devices:
            label = modality_set_label(device.modalities)
            enrolled[label] += 1
            online[label] += device.id in live
    _set_all(metrics.DEVICES_ENROLLED, dict(enrolled), _seen.setdefault(("", "enrolled"), set()))
    if presence_known:
        _set_all(metrics.DEVICES_ONLINE, dict(online), _seen.setdefault(("", "online"), set()))


def observe_dependencies(database: bool, redis: bool) -> None:
    metrics.DEPENDENCY_UP.labels("database").set(1 if database else 0)
    metrics.DEPENDENCY_UP.labels("redis").set(1 if redis else 0)
