"""Device liveness (heartbeats with a time-to-live), in this process or shared through Redis.

Both stores also remember when each device was last seen, so the coordinator can periodically
``drain_seen`` those times into the database instead of writing a row on every heartbeat.

Redis presence is used through ``BatchedPresenceStore``: a heartbeat is recorded in memory and a
background thread writes the recorded heartbeats to Redis in one pipeline a few times a second, so a
heartbeat never waits for a network round trip (at 1,000 devices those round trips, queued behind each
other, were what made heartbeats slow).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import redis

from server.domain.errors import UnavailableError
from server.domain.models import utcnow
from server.domain.ports import PresenceStore
from server.persistence.causes import logged_cause

log = logging.getLogger(__name__)


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

    def close(self) -> None:
        """Nothing to release; here for the port."""


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
        self.mark_many({device_id: ttl_s})

    def mark_many(self, marks: Mapping[str, float]) -> None:
        """Records heartbeats of several devices (device id -> TTL in seconds) in one round trip."""
        if not marks:
            return
        now = repr(time.time())
        with _redis_errors("record a heartbeat"):
            pipe = self._client.pipeline(transaction=False)
            for device_id, ttl_s in marks.items():
                # Millisecond TTLs keep sub-second settings meaningful; Redis rejects a TTL of 0.
                pipe.set(self._presence_key(device_id), b"1", px=max(1, round(ttl_s * 1000)))
            pipe.hset(self._seen_key, mapping=dict.fromkeys(marks, now))
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

    def check(self, action: str = "reach Redis") -> None:
        """Raises UnavailableError, naming ``action`` and the reason, unless Redis answers."""
        with _redis_errors(action):
            self._client.ping()

    def close(self) -> None:
        self._client.close()

    def _presence_key(self, device_id: str) -> str:
        return f"{self._prefix}:presence:{device_id}"


class BatchedPresenceStore:
    """Redis presence whose heartbeats are buffered here and written by a background thread every
    ``flush_interval_s``; ``mark_seen`` does no I/O, so it may run on the event loop.

    A heartbeat is acknowledged once buffered: if this process dies before the next flush the device
    looks alive a fraction of a second later than it could have, which its next heartbeat repairs.
    While Redis does not answer (found by the last write or ping) ``mark_seen`` raises UnavailableError
    naming the reason, as a direct write would; buffered heartbeats are kept and written once it is back.
    """

    def __init__(self, backend: RedisPresenceStore, flush_interval_s: float = 0.25) -> None:
        self._backend = backend
        self._interval = flush_interval_s
        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}
        self._problem: str | None = None
        self._stopping = threading.Event()
        self._check()  # learn at once whether Redis answers, before the first heartbeat
        self._thread = threading.Thread(target=self._run, name="mlecs-presence", daemon=True)
        self._thread.start()

    def mark_seen(self, device_id: str, ttl_s: float) -> None:
        problem = self._problem
        if problem is not None:
            raise UnavailableError(problem)
        with self._lock:
            self._pending[device_id] = ttl_s

    def online(self, device_ids: Iterable[str]) -> set[str]:
        ids = list(device_ids)
        with self._lock:
            buffered = {device_id for device_id in ids if device_id in self._pending}
        return buffered | self._backend.online(ids)

    def drain_seen(self) -> dict[str, datetime]:
        self.flush()
        return self._backend.drain_seen()

    def ping(self) -> bool:
        return self._check()

    def flush(self) -> None:
        """Writes the buffered heartbeats now; raises UnavailableError (keeping them) if Redis is down."""
        with self._lock:
            marks, self._pending = self._pending, {}
        if not marks:
            if self._problem is not None:
                self._check()
            return
        try:
            self._backend.mark_many(marks)
        except UnavailableError as exc:
            with self._lock:  # newer heartbeats of the same devices win
                self._pending = {**marks, **self._pending}
            self._set_problem(str(exc))
            raise
        self._set_problem(None)

    def close(self) -> None:
        """Stops the writer thread after a last flush (best effort)."""
        self._stopping.set()
        self._thread.join(timeout=5)
        try:
            self.flush()
        except UnavailableError:
            log.warning("presence: %d heartbeat(s) not written at shutdown, Redis is down", len(self._pending))
        self._backend.close()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self.flush()
            except UnavailableError:
                pass  # logged on the transition; heartbeats answer UNAVAILABLE meanwhile
            except Exception:  # the writer must outlive any surprise, or presence silently stops
                log.exception("presence writer failed; retrying")

    def _check(self) -> bool:
        try:
            self._backend.check("record a heartbeat")
        except UnavailableError as exc:
            self._set_problem(str(exc))
            return False
        self._set_problem(None)
        return True

    def _set_problem(self, problem: str | None) -> None:
        if problem != self._problem:
            if problem is None:
                log.info("presence: Redis answers again; heartbeats are recorded")
            elif self._problem is None:
                log.warning("presence: %s", problem)
        self._problem = problem


@contextmanager
def _redis_errors(action: str) -> Iterator[None]:
    """Turns Redis connection failures into UnavailableError naming what could not be done."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise UnavailableError(f"Redis is unavailable, could not {action} [ref {logged_cause(exc)}]") from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def create_presence_store(redis_url: str | None, prefix: str = "mlecs",
                          flush_interval_s: float = 0.25) -> MemoryPresenceStore | BatchedPresenceStore:
    """Batched Redis presence for ``redis_url``, or in-process presence when it is None. Neither does I/O
    in ``mark_seen``; call ``close()`` on the Redis one when done."""
    if redis_url is None:
        return MemoryPresenceStore()
    # Short timeouts: a hung Redis must turn into a prompt UnavailableError, not a stuck RPC.
    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    return BatchedPresenceStore(RedisPresenceStore(client, prefix=prefix), flush_interval_s)


if TYPE_CHECKING:  # mypy proves both classes satisfy the port
    _memory_implements_port: type[PresenceStore] = MemoryPresenceStore
    _redis_implements_port: type[PresenceStore] = RedisPresenceStore
    _batched_implements_port: type[PresenceStore] = BatchedPresenceStore
