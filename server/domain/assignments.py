"""What GetTask tells a device to do."""

from __future__ import annotations

from dataclasses import dataclass

from server.domain.federation_config import FederationConfig
from server.domain.models import Round


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


@dataclass(frozen=True)
class WorkMarker:
    """What a held task poll waits for: the rounds taking uploads, and the federations not active."""

    open_rounds: frozenset[str]
    halted: frozenset[str]
    """``"<federation id>:<state>"`` of every paused or stopped federation."""

    def has_news_since(self, earlier: WorkMarker | None) -> bool:
        """Whether a held poll could now be answered differently: a round began taking uploads, or a
        federation was paused, resumed or stopped. A round that stops taking uploads is no news (a device
        waiting before it closed waits after), so the polls of a whole fleet are not re-run for it."""
        return earlier is None or bool(self.open_rounds - earlier.open_rounds) or self.halted != earlier.halted
