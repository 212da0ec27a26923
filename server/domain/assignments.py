"""What GetTask tells a device to do."""

from __future__ import annotations

from dataclasses import dataclass

from server.domain.models import FederationConfig, Round


@dataclass(frozen=True)
class TrainAssignment:
    round: Round
    config: FederationConfig


@dataclass(frozen=True)
class WaitAssignment:
    retry_after_s: int
    reason: str


@dataclass(frozen=True)
class StopAssignment:
    reason: str


Assignment = TrainAssignment | WaitAssignment | StopAssignment
