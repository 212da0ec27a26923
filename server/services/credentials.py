"""Verified device credentials remembered for a short time, so most device calls need no database read."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from server.domain.models import Device


class CredentialCache:
    """Device id -> the device as last read from the database, for ``ttl_s`` seconds.

    Only the stored secret hash is kept (never a secret); a caller compares the presented secret's hash
    with it. ``forget`` drops a device at once when this process changes its credential or revokes it.
    Entries of devices that stop calling are dropped when they are next looked up or by ``prune``.
    """

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, Device]] = {}
        self._refresh_claimed: set[str] = set()

    def get(self, device_id: str) -> Device | None:
        if self._ttl <= 0:
            return None
        with self._lock:
            entry = self._entries.get(device_id)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._entries[device_id]
                self._refresh_claimed.discard(device_id)
                return None
            return entry[1]

    def claim_refresh(self, device_id: str) -> bool:
        """True, once per entry, when the entry is past half its TTL: the caller should re-read the device
        (in the background) so that a busy device's calls never wait for the database at expiry."""
        with self._lock:
            entry = self._entries.get(device_id)
            if entry is None or device_id in self._refresh_claimed or self._clock() < entry[0] - self._ttl / 2:
                return False
            self._refresh_claimed.add(device_id)
            return True

    def put(self, device: Device) -> None:
        if self._ttl > 0:
            with self._lock:
                self._entries[device.id] = (self._clock() + self._ttl, device)
                self._refresh_claimed.discard(device.id)

    def forget(self, device_id: str) -> None:
        with self._lock:
            self._entries.pop(device_id, None)
            self._refresh_claimed.discard(device_id)

    def prune(self) -> int:
        """Drops expired entries; returns how many are left."""
        now = self._clock()
        with self._lock:
            for device_id in [k for k, (expires, _) in self._entries.items() if expires <= now]:
                del self._entries[device_id]
                self._refresh_claimed.discard(device_id)
            return len(self._entries)
