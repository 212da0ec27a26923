import pytest

from server.domain.errors import InvalidTransitionError
from server.domain.federation_config import FederationConfig
from server.domain.rounds import RoundState, check_transition

HAPPY_PATH = [RoundState.CREATED, RoundState.OPEN, RoundState.COLLECTING, RoundState.AGGREGATING,
              RoundState.COMMITTED]


def test_a_round_walks_created_open_collecting_aggregating_committed():
    state = HAPPY_PATH[0]
    for target in HAPPY_PATH[1:]:
        state = check_transition(state, target)
    assert state is RoundState.COMMITTED and state.is_terminal


@pytest.mark.parametrize("state", [s for s in RoundState if not s.is_terminal])
def test_every_unfinished_state_can_fail(state):
    assert check_transition(state, RoundState.FAILED) is RoundState.FAILED


@pytest.mark.parametrize("terminal", [RoundState.COMMITTED, RoundState.FAILED])
@pytest.mark.parametrize("target", list(RoundState))
def test_terminal_rounds_never_change(terminal, target):
    with pytest.raises(InvalidTransitionError):
        check_transition(terminal, target)


@pytest.mark.parametrize("current,target", [
    (RoundState.CREATED, RoundState.COLLECTING),
    (RoundState.OPEN, RoundState.AGGREGATING),
    (RoundState.OPEN, RoundState.COMMITTED),
    (RoundState.COLLECTING, RoundState.OPEN),
    (RoundState.AGGREGATING, RoundState.COLLECTING),
])
def test_skipping_or_reversing_a_step_is_refused_with_both_states_named(current, target):
    with pytest.raises(InvalidTransitionError, match=f"{current}.*{target}"):
        check_transition(current, target)


def test_only_open_and_collecting_rounds_accept_uploads():
    assert {s for s in RoundState if s.accepts_uploads} == {RoundState.OPEN, RoundState.COLLECTING}


def test_federation_config_names_every_bad_field():
    with pytest.raises(ValueError) as info:
        FederationConfig(aggregation="median", min_updates=0, batch_size=0)  # type: ignore[arg-type]
    message = str(info.value)
    assert "aggregation" in message and "min_updates" in message and "batch_size" in message
