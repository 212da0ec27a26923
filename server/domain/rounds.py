"""The round lifecycle: created -> open -> collecting -> aggregating -> committed | failed."""

from __future__ import annotations

from enum import StrEnum

from server.domain.errors import InvalidTransitionError


class RoundState(StrEnum):
    CREATED = "created"        # row exists, participants not yet invited
    OPEN = "open"              # participants get the train task
    COLLECTING = "collecting"  # at least one update accepted; waiting for quorum / deadline
    AGGREGATING = "aggregating"
    COMMITTED = "committed"    # a new global version exists
    FAILED = "failed"          # closed without a version; failure_reason says why

    @property
    def is_terminal(self) -> bool:
        return self in (RoundState.COMMITTED, RoundState.FAILED)

    @property
    def accepts_uploads(self) -> bool:
        return self in (RoundState.OPEN, RoundState.COLLECTING)


_ALLOWED: dict[RoundState, frozenset[RoundState]] = {
    RoundState.CREATED: frozenset({RoundState.OPEN, RoundState.FAILED}),
    RoundState.OPEN: frozenset({RoundState.COLLECTING, RoundState.FAILED}),
    RoundState.COLLECTING: frozenset({RoundState.AGGREGATING, RoundState.FAILED}),
    # A crash while aggregating leaves the round here; recovery re-runs aggregation.
    RoundState.AGGREGATING: frozenset({RoundState.COMMITTED, RoundState.FAILED}),
    RoundState.COMMITTED: frozenset(),
    RoundState.FAILED: frozenset(),
}


def check_transition(current: RoundState, target: RoundState) -> RoundState:
    """Returns ``target`` if the lifecycle allows ``current -> target``, else raises InvalidTransitionError."""
    if target not in _ALLOWED[current]:
        raise InvalidTransitionError(f"a round cannot go from {current} to {target}")
    return target
