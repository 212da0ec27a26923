"""Device liveness (heartbeats with a time-to-live), in this process or shared through Redis.

Both stores also remember when each device was last seen, so the coordinator can periodically
``drain_seen`` those times into the database instead of writing a row on every heartbeat.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import redis

from server.domain.errors import UnavailableError
from server.domain.models import utcnow
from server.domain.ports import PresenceStore


class MemoryPresenceStore:
    """Presence for a single coordinator process; expiry follows a monotonic clock, immune to clock jumps."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._expires: dict[str, float] = {}
        self._seen: dict[str, datetime] = {}

    def mark_seen(self, device_id: str, ttl_s: float) -> None:
        with self._lock:
            self._expires[device_id] = self._clock() + ttl_s
            self._seen[device_id] = utcnow()

    def online(self, device_ids: Iterable[str]) -> set[str]:
        now = self._clock()
        with self._lock:
            expired = [key for key, deadline in self._expires.items() if deadline <= now]
            for key in expired:  # forget the dead so the dict does not grow with every device ever seen
                del self._expires[key]
            return {key for key in device_ids if key in self._expires}

    def drain_seen(self) -> dict[str, datetime]:
        """Last-seen times recorded since the previous drain (each device at most once)."""
        with self._lock:
            seen, self._seen = self._seen, {}
        return seen

    def ping(self) -> bool:
        return True


class RedisPresenceStore:
    """Presence shared by every coordinator using the same Redis; one expiring key per device.

    Keys: ``<prefix>:presence:<device_id>`` (expires after the TTL) and the hash ``<prefix>:last_seen``
    (device id -> UNIX time in seconds) that ``drain_seen`` empties.
    """

    def __init__(self, client: redis.Redis, prefix: str = "mlecs") -> None:
        self._client = client
        self._prefix = prefix
        self._seen_key = f"{prefix}:last_seen"

    def mark_seen(self, device_id: str, ttl_s: float) -> None:
        # Millisecond TTLs keep sub-second settings meaningful; Redis rejects a TTL of 0.
        ttl_ms = max(1, round(ttl_s * 1000))
        with _redis_errors("record a heartbeat"):
            pipe = self._client.pipeline(transaction=False)
            pipe.set(self._presence_key(device_id), b"1", px=ttl_ms)
            pipe.hset(self._seen_key, device_id, repr(time.time()))
            pipe.execute()

    def online(self, device_ids: Iterable[str]) -> set[str]:
        keys = list(dict.fromkeys(device_ids))
        if not keys:
            return set()
        with _redis_errors("read presence"):
            values = self._client.mget([self._presence_key(key) for key in keys])
        return {key for key, value in zip(keys, values, strict=True) if value is not None}

    def drain_seen(self) -> dict[str, datetime]:
        """Last-seen times recorded since the previous drain, read and cleared atomically."""
        with _redis_errors("drain last-seen times"):
            pipe = self._client.pipeline(transaction=True)
            pipe.hgetall(self._seen_key)
            pipe.delete(self._seen_key)
            stored, _ = pipe.execute()
        return {_text(key): datetime.fromtimestamp(float(_text(value)), UTC) for key, value in stored.items()}

    def ping(self) -> bool:
        """Whether Redis answers; False (not an exception) when it does not, for health checks."""
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def _presence_key(self, device_id: str) -> str:
        return f"{self._prefix}:presence:{device_id}"


@contextmanager
def _redis_errors(action: str) -> Iterator[None]:
    """Turns Redis connection failures into UnavailableError naming what could not be done."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise UnavailableError(f"Redis is unavailable, could not {action}: {exc}") from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def create_presence_store(redis_url: str | None, prefix: str = "mlecs") -> PresenceStore:
    """Redis-backed presence for ``redis_url``, or in-process presence when it is None."""
    if redis_url is None:
        return MemoryPresenceStore()
    # Short timeouts: a hung Redis must turn into a prompt UnavailableError, not a stuck RPC.
    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    return RedisPresenceStore(client, prefix=prefix)


if TYPE_CHECKING:  # mypy proves both classes satisfy the port
    _memory_implements_port: type[PresenceStore] = MemoryPresenceStore
    _redis_implements_port: type[PresenceStore] = RedisPresenceStore
