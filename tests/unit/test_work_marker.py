"""Which changes wake held task polls: only those that could change a waiting device's answer."""

from server.domain.assignments import WorkMarker


def marker(open_rounds: set[str], halted: set[str] | None = None) -> WorkMarker:
    return WorkMarker(frozenset(open_rounds), frozenset(halted or set()))


def test_the_first_look_is_news():
    assert marker(set()).has_news_since(None)


def test_a_round_that_begins_taking_uploads_is_news():
    assert marker({"r1", "r2"}).has_news_since(marker({"r1"}))
    assert marker({"r2"}).has_news_since(marker({"r1"}))  # one closed and the next opened between looks


def test_a_round_that_stops_taking_uploads_is_not_news():
    assert not marker(set()).has_news_since(marker({"r1"}))
    assert not marker({"r1"}).has_news_since(marker({"r1"}))


def test_a_federation_paused_resumed_or_stopped_is_news():
    assert marker({"r1"}, {"f1:paused"}).has_news_since(marker({"r1"}))
    assert marker(set()).has_news_since(marker(set(), {"f1:paused"}))  # resumed
    assert marker(set(), {"f1:stopped"}).has_news_since(marker(set(), {"f1:paused"}))
