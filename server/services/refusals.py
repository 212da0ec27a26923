"""Refusals: a device request refused on purpose is counted at once and recorded for operators, best-effort.

    transport (event loop)                                      one writer thread
    RefusalRecorder.refused(method, error, ...)  -- Refusal --> bounded queue --> store.add_refusal
      counts mlecs_refusals_total{method,reason}

The caller's answer never waits on the database and never fails because of it: rows go through a bounded
queue to one background writer, and a row that does not fit (queue full) or cannot be written (database
down) is dropped and counted in ``mlecs_refusals_unrecorded_total``. Floods are thinned before they reach
the queue: a caller refused for its rate, as unauthenticated or as not permitted (a revoked device that
keeps calling is refused before its rate limit applies) is recorded at most once per ``record_interval_s``,
method and reason; the metric still counts every refusal.

Reasons are short codes from a bounded set (metric labels): an update's own rejection reason
(``checksum``, ``schema``, ``norm_bound``, ``chunk_offset`` ...) or the kind of refusal (``late``,
``rate_limited``, ``permission_denied``, ``unauthenticated``, ``invalid_request``, ``conflict``, ``not_found``).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from server import metrics
from server.domain.errors import (
    ConflictError,
    CoordinatorError,
    IdleStreamError,
    InvalidRequestError,
    LateUpdateError,
    MalformedRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    ResourceLimitError,
    UnauthenticatedError,
    UpdateRejectedError,
)
from server.domain.models import Refusal
from server.domain.ports import RefusalStore

log = logging.getLogger(__name__)

MAX_DETAIL_CHARS = 1000
"""Details quote what the device sent (ids, names); a hostile device must not fill the table through them."""
_MAX_ID_CHARS = 64  # the width of the id columns; a longer claimed id is left out (the detail quotes it)
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_THINNED = ("rate_limited", "unauthenticated", "permission_denied", "upload_streams", "staging_full")
_KINDS: list[tuple[type[CoordinatorError], str]] = [
    (RateLimitedError, "rate_limited"),
    (IdleStreamError, "idle"),
    (LateUpdateError, "late"),
    (ConflictError, "conflict"),
    (MalformedRequestError, "malformed"),
    (InvalidRequestError, "invalid_request"),
    (UnauthenticatedError, "unauthenticated"),
    (PermissionDeniedError, "permission_denied"),
    (NotFoundError, "not_found"),
]


def refusal_reason(error: CoordinatorError) -> str | None:
    """The reason code of a refusal, or None when the error is not one (a dependency down is our fault)."""
    if isinstance(error, UpdateRejectedError | ResourceLimitError):
        return error.reason if _CODE.match(error.reason) else "other"
    for kind, reason in _KINDS:
        if isinstance(error, kind):
            return reason
    return None


class RefusalRecorder:
    """Counts refusals and writes them to the store from a background thread; ``close()`` at shutdown."""

    def __init__(self, store: RefusalStore, *, record_interval_s: float = 10.0, queue_size: int = 1000,
                 max_callers: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._interval = record_interval_s
        self._max_callers = max_callers
        self._clock = clock
        self._queue: queue.Queue[Refusal | None] = queue.Queue(maxsize=queue_size)
        self._guard = threading.Lock()
        self._last_recorded: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._failures = 0
        self._writer = threading.Thread(target=self._write_all, name="mlecs-refusals", daemon=True)
        self._writer.start()

    def refused(self, method: str, error: CoordinatorError, *, caller: str = "", device_id: str | None = None,
                federation_id: str | None = None, round_id: str | None = None) -> str | None:
        """Counts a refusal and queues its row; returns its reason (None: ``error`` is no refusal).

        ``caller`` identifies who asked (a device id or peer address) for thinning floods. Never blocks and
        never raises, so it is safe on the event loop and inside error handling.
        """
        reason = refusal_reason(error)
        if reason is None:
            return None
        metrics.REFUSALS.labels(method, reason).inc()
        if reason in _THINNED and not self._due((caller or device_id or "", method, reason)):
            metrics.REFUSALS_UNRECORDED.labels("thinned").inc()
            return reason
        refusal = Refusal(method=method, reason=reason, detail=str(error)[:MAX_DETAIL_CHARS],
                          federation_id=_id(federation_id), device_id=_id(device_id), round_id=_id(round_id))
        try:
            self._queue.put_nowait(refusal)
        except queue.Full:
            metrics.REFUSALS_UNRECORDED.labels("queue_full").inc()
        return reason

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Waits until every queued row is written (or dropped); False if that took longer than ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Writes what is queued (for up to ``timeout_s``) and stops the writer."""
        self.flush(timeout_s)
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            return  # the writer is stuck on the database; it is a daemon thread and dies with the process
        self._writer.join(timeout_s)

    def _due(self, key: tuple[str, str, str]) -> bool:
        """Whether a thinned refusal of this caller, method and reason should be recorded now."""
        now = self._clock()
        with self._guard:
            last = self._last_recorded.get(key)
            if last is not None and now - last < self._interval:
                return False
            self._last_recorded[key] = now
            self._last_recorded.move_to_end(key)
            while len(self._last_recorded) > self._max_callers:
                self._last_recorded.popitem(last=False)
            return True

    def _write_all(self) -> None:
        while True:
            refusal = self._queue.get()
            try:
                if refusal is None:
                    return
                self._store.add_refusal(refusal)
            except Exception as exc:  # best-effort: the refusal was answered and counted already
                metrics.REFUSALS_UNRECORDED.labels("store_error").inc()
                self._failures += 1
                if self._failures % 100 == 1:  # a database outage must not flood the log either
                    log.warning("refusals not recorded (%d so far): %s", self._failures, exc)
            finally:
                self._queue.task_done()


def _id(value: str | None) -> str | None:
    return value if value and len(value) <= _MAX_ID_CHARS else None
