"""Presence in memory and on a real Redis: online sets, TTL expiry, draining last-seen times, outages."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from server.domain.errors import UnavailableError
from server.domain.ports import PresenceStore
from server.persistence.presence import (
    BatchedPresenceStore,
    MemoryPresenceStore,
    RedisPresenceStore,
    create_presence_store,
)
from tests.integration.coordinator_harness import free_port


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("batched", marks=pytest.mark.redis)])
def presence(request: pytest.FixtureRequest) -> Iterator[PresenceStore]:
    if request.param == "memory":
        yield MemoryPresenceStore()
        return
    client: redis.Redis = request.getfixturevalue("redis_client")
    backend = RedisPresenceStore(client, prefix=request.getfixturevalue("redis_prefix"))
    if request.param == "redis":
        yield backend
        return
    batched = BatchedPresenceStore(backend, flush_interval_s=0.02)
    yield batched
    batched.close()


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


def test_the_factory_picks_memory_without_a_url_and_batched_redis_with_one() -> None:
    assert isinstance(create_presence_store(None), MemoryPresenceStore)
    batched = create_presence_store("redis://127.0.0.1:6379/0")
    assert isinstance(batched, BatchedPresenceStore)
    batched.close()


@pytest.mark.redis
def test_batched_heartbeats_reach_redis_without_a_round_trip_each(redis_client: redis.Redis,
                                                                   redis_prefix: str) -> None:
    batched = BatchedPresenceStore(RedisPresenceStore(redis_client, prefix=redis_prefix), flush_interval_s=60)
    try:
        batched.mark_seen("d1", 30)
        batched.mark_seen("d2", 30)
        assert redis_client.exists(f"{redis_prefix}:presence:d1") == 0  # buffered, not written yet
        assert batched.online(["d1", "d2", "d3"]) == {"d1", "d2"}  # buffered heartbeats already count
        batched.flush()
        assert redis_client.exists(f"{redis_prefix}:presence:d1", f"{redis_prefix}:presence:d2") == 2
        assert RedisPresenceStore(redis_client, prefix=redis_prefix).online(["d1", "d2"]) == {"d1", "d2"}
    finally:
        batched.close()


def test_batched_presence_on_an_unreachable_redis_refuses_heartbeats_with_the_reason(
        unreachable_redis: redis.Redis) -> None:
    batched = BatchedPresenceStore(RedisPresenceStore(unreachable_redis, prefix="unused"), flush_interval_s=60)
    try:
        with pytest.raises(UnavailableError, match="Redis is unavailable, could not record a heartbeat"):
            batched.mark_seen("d1", 30)
        assert batched.ping() is False
    finally:
        batched.close()


@pytest.fixture
def own_redis() -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    """A Redis server of this test's own on a free port, which the test may stop and start again."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    servers: list[subprocess.Popen[bytes]] = []
    yield port, servers
    for server in servers:
        server.kill()
        server.wait()


def _start_redis(port: int, servers: list[subprocess.Popen[bytes]]) -> None:
    servers.append(subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                     "--appendonly", "no"], stdout=subprocess.DEVNULL))
    client = redis.Redis(port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    client.close()


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _refuses_heartbeats(batched: BatchedPresenceStore) -> bool:
    try:
        batched.mark_seen("probe", 30)
    except UnavailableError:
        return True
    return False


def test_batched_presence_keeps_heartbeats_through_a_redis_restart(own_redis) -> None:
    port, servers = own_redis
    _start_redis(port, servers)
    client = redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0))
    batched = BatchedPresenceStore(RedisPresenceStore(client, prefix="p"), flush_interval_s=0.05)
    try:
        batched.mark_seen("before", 30)
        _wait_for(lambda: client.exists("p:presence:before") == 1)

        servers[-1].kill()
        servers[-1].wait()
        batched.mark_seen("buffered", 30)  # accepted: nothing has told the store yet that Redis is gone
        _wait_for(lambda: _refuses_heartbeats(batched))  # its write fails, and heartbeats are refused
        with pytest.raises(UnavailableError, match="Redis is unavailable"):
            batched.mark_seen("during", 30)

        _start_redis(port, servers)  # an empty Redis: what was buffered must be written again
        _wait_for(lambda: not _refuses_heartbeats(batched))
        batched.mark_seen("after", 30)
        _wait_for(lambda: client.exists("p:presence:buffered", "p:presence:after") == 2)
        assert set(batched.drain_seen()) >= {"buffered", "after"}
    finally:
        batched.close()
        client.close()
