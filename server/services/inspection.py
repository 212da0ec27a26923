"""What operators read about a finished or running round: who took part and how, what was refused, and its
metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from server.domain.models import ModelVersion, Refusal, Round, Update, UpdateState
from server.services.context import ServiceContext

# When a device made several uploads to one round, the one that counts is shown: accepted before one still
# arriving before a rejected one.
_RANK = {UpdateState.ACCEPTED: 0, UpdateState.PARTIAL: 1, UpdateState.REJECTED: 2}


@dataclass(frozen=True)
class Participation:
    """One device's part in a round: invited or not (async rounds take any eligible device), and its update."""

    device_id: str
    device_name: str | None
    """None when the device row is gone (it cannot be, today; kept honest rather than invented)."""
    invited: bool
    uploads: int
    update: Update | None
    """The upload that counts (see ``_RANK``); None when the device sent nothing."""
    reported: dict[str, float] = field(default_factory=dict)
    """The device's latest report for the round (e.g. personalised accuracy)."""
    reported_at: datetime | None = None


@dataclass(frozen=True)
class RoundMetrics:
    round: Round
    version: ModelVersion | None
    """The version the round committed (its server-side evaluation), None unless committed."""
    reports: dict[str, dict[str, float]]
    """Device id -> the device's latest report for the round."""


class RoundInspectionService:
    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    def participants(self, round_id: str) -> list[Participation]:
        """Every invited device and every device that uploaded, invited ones first, then by name."""
        store = self._ctx.store
        round_ = store.get_round(round_id)
        names = {d.id: d.name for d in store.list_devices(round_.federation_id)}
        by_device: dict[str, list[Update]] = {}
        for update in store.list_updates(round_id):
            by_device.setdefault(update.device_id, []).append(update)
        reports = {r.device_id: r for r in store.list_device_reports(round_id)}  # oldest first: the last one wins
        out = []
        for device_id in dict.fromkeys([*round_.participants, *by_device]):
            updates = by_device.get(device_id, [])
            counting = min(updates, key=lambda u: (_RANK[u.state], -u.created_at.timestamp()), default=None)
            report = reports.get(device_id)
            out.append(Participation(
                device_id=device_id, device_name=names.get(device_id), invited=device_id in round_.participants,
                uploads=len(updates), update=counting, reported={} if report is None else dict(report.metrics),
                reported_at=None if report is None else report.reported_at))
        return sorted(out, key=lambda p: (not p.invited, p.device_name or "", p.device_id))

    def metrics(self, round_id: str) -> RoundMetrics:
        store = self._ctx.store
        round_ = store.get_round(round_id)
        version = None if round_.version_id is None else store.get_version(round_.version_id)
        reports = {r.device_id: dict(r.metrics) for r in store.list_device_reports(round_id)}
        return RoundMetrics(round=round_, version=version, reports=reports)

    def refusals(self, round_id: str, limit: int = 100) -> list[Refusal]:
        """Device requests refused in this round (bad updates, rate limits, identity), newest first."""
        self._ctx.store.get_round(round_id)  # an unknown round is a 404, not an empty list
        return self._ctx.store.list_refusals(round_id=round_id, limit=limit)
