"""The revocation feed: which devices were revoked recently, in this process or shared through Redis.

Why a feed: each replica remembers verified device credentials for ``credential_cache_s`` so most device
calls need no database read. The replica that revokes a device forgets it at once; the others learn of
it here. Each replica polls the feed every ``revocation_poll_interval_s`` (one non-blocking ``XREAD``, a
few times a second) and forgets the devices listed, so their next call reads the database and is
refused. Checking the database or Redis on every call instead would put a round trip back into the
heartbeat path, which answers from memory on the event loop.

Redis keeps the feed as a stream ``<prefix>:revocations`` (entries ``device=<id>``), capped at about
``MAX_ENTRIES``: stream ids are ordered by Redis, so replicas need no agreement on clocks. If Redis is
down or a replica falls further behind than the cap, the cache's expiry still bounds how long a revoked
device is served: the feed is a shortcut, never the source of truth.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import redis

from server.domain.errors import UnavailableError
from server.persistence.causes import logged_cause

log = logging.getLogger(__name__)

MAX_ENTRIES = 10_000
"""Revocations kept in the Redis stream; far more than a replica could miss between two polls."""


class MemoryRevocationFeed:
    """The feed of a single coordinator process (no Redis): what it publishes it reads back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[str] = []
        self._read = 0

    def publish(self, device_id: str) -> None:
        with self._lock:
            self._entries.append(device_id)

    def poll(self) -> list[str]:
        with self._lock:
            new, self._read = self._entries[self._read:], len(self._entries)
            # Everything published was read: drop it, so the list does not grow with every revocation.
            self._entries, self._read = [], 0
        return new

    def close(self) -> None:
        """Nothing to release; here for the port."""


class RedisRevocationFeed:
    """The feed shared by every replica using the same Redis and prefix."""

    def __init__(self, client: redis.Redis, prefix: str = "mlecs") -> None:
        self._client = client
        self._key = f"{prefix}:revocations"
        self._last_id: str | None = None  # entries after this one are new to this replica

    def publish(self, device_id: str) -> None:
        try:
            self._client.xadd(self._key, {"device": device_id}, maxlen=MAX_ENTRIES, approximate=True)
        except redis.RedisError as exc:
            raise UnavailableError(
                f"Redis is unavailable, could not publish the revocation [ref {logged_cause(exc)}]") from exc

    def poll(self) -> list[str]:
        try:
            if self._last_id is None:
                self._find_end()
                return []
            replies: Any = self._client.xread({self._key: self._last_id}, count=MAX_ENTRIES)
        except redis.RedisError as exc:
            raise UnavailableError(
                f"Redis is unavailable, could not read revocations [ref {logged_cause(exc)}]") from exc
        devices = []
        for _stream, entries in replies or []:
            for entry_id, fields in entries:
                self._last_id = _text(entry_id)
                device = fields.get(b"device", fields.get("device"))
                if device is not None:
                    devices.append(_text(device))
        return devices

    def start(self) -> None:
        """Finds where the feed ends now, before this replica remembers any credential: revocations
        published earlier are already in the database it will read. If Redis does not answer, the first
        poll that reaches it does this instead (revocations in between are caught by the cache's expiry)."""
        try:
            self._find_end()
        except redis.RedisError as exc:
            log.warning("revocations: Redis does not answer (%s); revocations by other replicas take effect "
                        "here when cached credentials expire, until it does", exc)

    def _find_end(self) -> None:
        newest: Any = self._client.xrevrange(self._key, count=1)
        self._last_id = _text(newest[0][0]) if newest else "0-0"

    def close(self) -> None:
        self._client.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def create_revocation_feed(redis_url: str | None, prefix: str = "mlecs") -> MemoryRevocationFeed | RedisRevocationFeed:
    """The Redis feed for ``redis_url`` (replicas sharing it see each other's revocations), or an
    in-process one when it is None."""
    if redis_url is None:
        return MemoryRevocationFeed()
    # Short timeouts: polling runs off the request path, but a hung Redis must not stall it for long.
    feed = RedisRevocationFeed(redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2), prefix)
    feed.start()
    return feed


if TYPE_CHECKING:  # mypy proves both classes satisfy the port
    from server.domain.ports import RevocationFeed

    _memory_implements_port: type[RevocationFeed] = MemoryRevocationFeed
    _redis_implements_port: type[RevocationFeed] = RedisRevocationFeed
