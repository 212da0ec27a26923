"""The revocation feed replicas share through Redis (and the in-process one), on the real Redis server."""

from __future__ import annotations

import pytest

from server.domain.errors import UnavailableError
from server.persistence.revocations import MemoryRevocationFeed, create_revocation_feed
from tests.integration.coordinator_harness import free_port

REDIS_URL = "redis://127.0.0.1:6379/0"


def test_the_in_process_feed_gives_each_revocation_once():
    feed = MemoryRevocationFeed()
    assert feed.poll() == []
    feed.publish("a")
    feed.publish("b")
    assert feed.poll() == ["a", "b"]
    assert feed.poll() == []


@pytest.mark.redis
def test_every_replica_reads_each_revocation_published_after_it_started(redis_prefix):
    early = create_revocation_feed(REDIS_URL, redis_prefix)
    early.publish("before-b-started")
    a, b = create_revocation_feed(REDIS_URL, redis_prefix), create_revocation_feed(REDIS_URL, redis_prefix)
    other = create_revocation_feed(REDIS_URL, redis_prefix + "-other")
    try:
        a.publish("d1")
        a.publish("d2")
        assert b.poll() == ["d1", "d2"]  # not the one published before it started (it reads the database)
        assert b.poll() == []
        assert a.poll() == ["d1", "d2"]  # the publisher reads its own too: forgetting twice is harmless
        assert early.poll() == ["before-b-started", "d1", "d2"]
        b.publish("d3")
        assert a.poll() == ["d3"] and b.poll() == ["d3"]
        assert other.poll() == []  # another deployment's prefix sees nothing
    finally:
        for feed in (early, a, b, other):
            feed.close()


def test_an_unreachable_redis_is_unavailable_not_a_crash():
    feed = create_revocation_feed(f"redis://127.0.0.1:{free_port()}/0", "nobody")  # starting only warns
    try:
        with pytest.raises(UnavailableError, match=r"Redis is unavailable.*publish"):
            feed.publish("d1")
        with pytest.raises(UnavailableError, match=r"Redis is unavailable.*read revocations"):
            feed.poll()
    finally:
        feed.close()
