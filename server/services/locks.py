"""Per-round mutual exclusion inside one coordinator process.

Accepting an update and closing its round must not interleave, or an update could be acknowledged
after the aggregator listed the round's updates and never be counted.
"""

from __future__ import annotations

import threading
from collections import defaultdict


class RoundLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

    def __call__(self, round_id: str) -> threading.Lock:
        with self._guard:
            return self._locks[round_id]
