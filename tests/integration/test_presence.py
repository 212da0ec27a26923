"""Presence in memory and on a real Redis: online sets, TTL expiry, draining last-seen times, outages."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from server.domain.errors import UnavailableError
from server.domain.ports import PresenceStore
from server.persistence.presence import MemoryPresenceStore, RedisPresenceStore, create_presence_store


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def presence(request: pytest.FixtureRequest) -> PresenceStore:
    if request.param == "memory":
        return MemoryPresenceStore()
    client: redis.Redis = request.getfixturevalue("redis_client")
    return RedisPresenceStore(client, prefix=request.getfixturevalue("redis_prefix"))


@pytest.fixture
def unreachable_redis() -> Iterator[redis.Redis]:
    # No retries: the client's default back-off would spend seconds proving the same thing.
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1, socket_timeout=1,
                         retry=Retry(NoBackoff(), 0))
    yield client
    client.close()


def test_a_device_seen_recently_is_online_and_others_are_not(presence: PresenceStore) -> None:
    presence.mark_seen("d1", 30)
    presence.mark_seen("d2", 30)
    assert presence.online(["d1", "d3", "d2", "d1"]) == {"d1", "d2"}
    assert presence.online([]) == set()


def test_a_device_goes_offline_once_its_ttl_has_passed(presence: PresenceStore) -> None:
    presence.mark_seen("short", 0.1)
    presence.mark_seen("long", 30)
    time.sleep(0.25)
    assert presence.online(["short", "long"]) == {"long"}


def test_a_new_heartbeat_extends_the_ttl(presence: PresenceStore) -> None:
    presence.mark_seen("d1", 0.1)
    presence.mark_seen("d1", 30)
    time.sleep(0.25)
    assert presence.online(["d1"]) == {"d1"}


def test_draining_returns_last_seen_times_once(presence: PresenceStore) -> None:
    before = datetime.now(UTC)
    presence.mark_seen("d1", 30)
    presence.mark_seen("d2", 30)
    presence.mark_seen("d1", 30)
    after = datetime.now(UTC)

    seen = presence.drain_seen()
    assert set(seen) == {"d1", "d2"}
    for at in seen.values():
        assert at.tzinfo is not None
        assert before - timedelta(seconds=1) <= at <= after + timedelta(seconds=1)
    assert presence.drain_seen() == {}


def test_heartbeats_after_a_drain_appear_in_the_next_one(presence: PresenceStore) -> None:
    presence.mark_seen("d1", 30)
    presence.drain_seen()
    presence.mark_seen("d2", 30)
    assert set(presence.drain_seen()) == {"d2"}


def test_a_reachable_store_answers_ping(presence: PresenceStore) -> None:
    assert presence.ping() is True


def test_memory_presence_expires_by_its_monotonic_clock() -> None:
    now = [100.0]
    presence = MemoryPresenceStore(clock=lambda: now[0])
    presence.mark_seen("d1", 5)
    now[0] = 104.9
    assert presence.online(["d1"]) == {"d1"}
    now[0] = 105.0
    assert presence.online(["d1"]) == set()


@pytest.mark.redis
def test_redis_presence_keeps_its_keys_under_its_prefix(redis_client: redis.Redis, redis_prefix: str) -> None:
    RedisPresenceStore(redis_client, prefix=redis_prefix).mark_seen("d1", 30)
    keys = {key.decode() for key in redis_client.scan_iter(match=f"{redis_prefix}:*")}
    assert keys == {f"{redis_prefix}:presence:d1", f"{redis_prefix}:last_seen"}


@pytest.mark.redis
def test_two_stores_on_one_redis_prefix_share_presence(redis_client: redis.Redis, redis_prefix: str) -> None:
    RedisPresenceStore(redis_client, prefix=redis_prefix).mark_seen("d1", 30)
    assert RedisPresenceStore(redis_client, prefix=redis_prefix).online(["d1"]) == {"d1"}


def test_an_unreachable_redis_raises_unavailable_and_fails_ping(unreachable_redis: redis.Redis) -> None:
    presence = RedisPresenceStore(unreachable_redis, prefix="unused")
    with pytest.raises(UnavailableError, match="Redis is unavailable, could not record a heartbeat"):
        presence.mark_seen("d1", 30)
    with pytest.raises(UnavailableError, match="read presence"):
        presence.online(["d1"])
    with pytest.raises(UnavailableError, match="drain"):
        presence.drain_seen()
    assert presence.ping() is False


def test_the_factory_picks_memory_without_a_url_and_redis_with_one() -> None:
    assert isinstance(create_presence_store(None), MemoryPresenceStore)
    assert isinstance(create_presence_store("redis://127.0.0.1:6379/0"), RedisPresenceStore)
