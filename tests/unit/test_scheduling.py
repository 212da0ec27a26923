"""Pure scheduling rules: invitation counts, stratified participant draws, round decisions, staleness."""

from __future__ import annotations

import random

import pytest

from server.domain.scheduling import (
    Action,
    could_close,
    decide,
    invitation_count,
    select_participants,
    staleness_weight,
)

IMAGE = frozenset({"image"})
AUDIO = frozenset({"audio"})
BOTH = frozenset({"audio", "image"})

# ---------------------------------------------------------------------------------------------------
# invitation_count


def test_zero_clients_per_round_invites_and_targets_every_eligible_device() -> None:
    assert invitation_count(100, 0, 0.3) == (100, 100)
    assert invitation_count(7, 0, 0.0) == (7, 7)
    assert invitation_count(0, 0, 0.5) == (0, 0)


def test_overselection_invites_the_ceiling_of_target_times_one_plus_overselect() -> None:
    assert invitation_count(100, 10, 0.3) == (13, 10)
    assert invitation_count(100, 3, 0.5) == (5, 3)  # ceil(4.5)
    assert invitation_count(100, 4, 0.01) == (5, 4)  # any overselection rounds up to one more device


def test_without_overselection_exactly_the_target_is_invited() -> None:
    assert invitation_count(100, 10, 0.0) == (10, 10)


def test_float_error_in_the_product_does_not_invite_one_device_too_many() -> None:
    # 10 * 1.1 == 11.000000000000002 in binary floating point; a plain ceil would give 12.
    assert invitation_count(100, 10, 0.1) == (11, 10)
    assert invitation_count(100, 10, 0.7) == (17, 10)


def test_invitations_are_capped_by_the_eligible_devices_and_the_target_by_the_invited() -> None:
    assert invitation_count(8, 10, 0.3) == (8, 8)
    assert invitation_count(12, 10, 0.3) == (12, 10)
    assert invitation_count(0, 10, 0.3) == (0, 0)


# ---------------------------------------------------------------------------------------------------
# select_participants


def _fleet(images: int = 9, audios: int = 1, both: int = 0) -> list[tuple[str, frozenset[str]]]:
    return ([(f"img-{i:02d}", IMAGE) for i in range(images)] + [(f"aud-{i:02d}", AUDIO) for i in range(audios)]
            + [(f"both-{i:02d}", BOTH) for i in range(both)])


def test_the_requested_number_of_distinct_candidate_ids_comes_back_sorted() -> None:
    candidates = _fleet(images=6, audios=3, both=3)
    chosen = select_participants(candidates, 5, seed=3)
    assert len(chosen) == 5
    assert len(set(chosen)) == 5
    assert chosen == sorted(chosen)
    assert set(chosen) <= {device_id for device_id, _ in candidates}


def test_the_same_seed_draws_the_same_participants_whatever_the_candidate_order() -> None:
    candidates = _fleet(images=6, audios=3, both=3)
    shuffled = list(candidates)
    random.Random(1).shuffle(shuffled)
    for seed in range(5):
        assert select_participants(candidates, 4, seed) == select_participants(candidates, 4, seed)
        assert select_participants(shuffled, 4, seed) == select_participants(candidates, 4, seed)


def test_different_seeds_draw_different_participants() -> None:
    candidates = _fleet(images=10, audios=10)
    draws = {tuple(select_participants(candidates, 3, seed)) for seed in range(20)}
    assert len(draws) > 1


def test_a_rare_modality_set_is_never_crowded_out_by_a_common_one() -> None:
    candidates = _fleet(images=9, audios=1)
    for seed in range(30):
        chosen = select_participants(candidates, 2, seed)
        assert "aud-00" in chosen, f"seed {seed} left the only audio device out: {chosen}"
        assert len(chosen) == 2


def test_every_modality_set_gets_a_turn_before_any_gets_a_second() -> None:
    candidates = _fleet(images=8, audios=4, both=2)
    for seed in range(10):
        chosen = select_participants(candidates, 3, seed)
        assert {device_id.split("-")[0] for device_id in chosen} == {"img", "aud", "both"}


def test_asking_for_more_participants_than_candidates_returns_every_candidate() -> None:
    candidates = _fleet(images=3, audios=2)
    assert select_participants(candidates, 50, seed=0) == sorted(device_id for device_id, _ in candidates)
    assert select_participants([], 3, seed=0) == []


def test_asking_for_no_participants_returns_none() -> None:
    assert select_participants(_fleet(), 0, seed=0) == []


# ---------------------------------------------------------------------------------------------------
# decide


def test_a_round_aggregates_as_soon_as_its_target_is_reached() -> None:
    decision = decide(accepted=5, target=5, min_updates=2, past_deadline=False, pending_online=3)
    assert decision.action is Action.AGGREGATE
    assert "5 of 5" in decision.reason


def test_a_round_aggregates_once_quorum_is_met_and_nobody_pending_is_online() -> None:
    decision = decide(accepted=2, target=5, min_updates=2, past_deadline=False, pending_online=0)
    assert decision.action is Action.AGGREGATE
    assert "quorum of 2" in decision.reason


@pytest.mark.parametrize("pending_online", [None, 1, 3])
def test_a_round_with_quorum_waits_for_live_or_unknown_stragglers_before_the_deadline(
        pending_online: int | None) -> None:
    decision = decide(accepted=2, target=5, min_updates=2, past_deadline=False, pending_online=pending_online)
    assert decision.action is Action.WAIT
    assert "2 of 5" in decision.reason


def test_a_round_without_quorum_waits_before_the_deadline() -> None:
    assert decide(accepted=1, target=5, min_updates=2, past_deadline=False, pending_online=4).action is Action.WAIT


@pytest.mark.parametrize("pending_online", [None, 0, 2])
def test_a_round_with_quorum_aggregates_at_the_deadline(pending_online: int | None) -> None:
    decision = decide(accepted=3, target=5, min_updates=2, past_deadline=True, pending_online=pending_online)
    assert decision.action is Action.AGGREGATE


@pytest.mark.parametrize("pending_online", [None, 0, 2])
def test_a_round_without_quorum_fails_at_the_deadline_naming_the_counts(pending_online: int | None) -> None:
    decision = decide(accepted=1, target=5, min_updates=2, past_deadline=True, pending_online=pending_online)
    assert decision.action is Action.FAIL
    assert "1 of 2" in decision.reason


def test_a_target_of_zero_is_treated_as_one() -> None:
    assert decide(accepted=1, target=0, min_updates=1, past_deadline=False, pending_online=None).action \
        is Action.AGGREGATE
    assert decide(accepted=0, target=0, min_updates=1, past_deadline=False, pending_online=None).action \
        is Action.WAIT


def test_no_updates_at_all_never_aggregate() -> None:
    for past_deadline in (False, True):
        for pending_online in (None, 0, 1):
            decision = decide(accepted=0, target=3, min_updates=1, past_deadline=past_deadline,
                              pending_online=pending_online)
            assert decision.action is not Action.AGGREGATE


# ---------------------------------------------------------------------------------------------------
# staleness_weight


def test_a_fresh_update_has_full_weight() -> None:
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(0, 3.0) == 1.0


def test_staleness_discounts_by_one_plus_s_to_the_minus_exponent() -> None:
    assert staleness_weight(3, 0.5) == pytest.approx(0.5)
    assert staleness_weight(1, 1.0) == pytest.approx(0.5)
    assert staleness_weight(8, 1 / 3) == pytest.approx(1 / 3 ** (2 / 3))
    assert isinstance(staleness_weight(2, 0.5), float)


def test_an_exponent_of_zero_ignores_staleness() -> None:
    assert [staleness_weight(s, 0.0) for s in range(5)] == [1.0] * 5


def test_weights_shrink_as_updates_get_staler() -> None:
    weights = [staleness_weight(s, 0.5) for s in range(6)]
    assert weights == sorted(weights, reverse=True)
    assert len(set(weights)) == len(weights)


def test_a_negative_staleness_is_refused() -> None:
    with pytest.raises(ValueError, match="staleness must be >= 0, got -1"):
        staleness_weight(-1, 0.5)


# ---------------------------------------------------------------------------------------------------
# could_close: an arrival wakes the scheduler only when decide could aggregate


@pytest.mark.parametrize("target", [0, 1, 3, 8])
@pytest.mark.parametrize("min_updates", [1, 2, 5, 8])
def test_could_close_is_true_exactly_when_some_presence_lets_decide_aggregate_before_the_deadline(
        target: int, min_updates: int) -> None:
    for accepted in range(10):
        aggregates_somehow = any(
            decide(accepted=accepted, target=target, min_updates=min_updates, past_deadline=False,
                   pending_online=pending).action is Action.AGGREGATE for pending in (None, 0, 1, 5))
        assert could_close(accepted=accepted, target=target, min_updates=min_updates) is aggregates_somehow, (
            accepted, target, min_updates)
