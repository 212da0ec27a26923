"""Keeping something alive while long work runs: a lease (aggregation can take a while) or a cloud job's claim."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from server.domain.errors import UnavailableError
from server.domain.models import Fence
from server.domain.ports import RoundStore

log = logging.getLogger(__name__)


@contextmanager
def repeated_while_running(interval_s: float, action: Callable[[], bool], name: str) -> Iterator[None]:
    """Calls ``action`` every ``interval_s`` on a thread of its own until the block ends, or until ``action``
    returns False."""
    done = threading.Event()

    def repeat() -> None:
        while not done.wait(interval_s):
            if not action():
                return

    thread = threading.Thread(target=repeat, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextmanager
def lease_kept(store: RoundStore, fence: Fence, ttl_s: float) -> Iterator[None]:
    """Renews ``fence``'s lease every ttl/3 until the block ends.

    Losing the lease is not raised here: the writes at the end present the fence and are refused then.
    """
    def renew() -> bool:
        try:
            renewed = store.acquire_lease(fence.lease, fence.holder, ttl_s)
        except UnavailableError as exc:
            log.warning("could not renew lease %s: %s", fence.lease, exc)
            return True
        if renewed is None or renewed.token != fence.token:
            log.warning("lease %s passed to another replica; this replica's commit will be refused", fence.lease)
            return False
        return True

    with repeated_while_running(ttl_s / 3, renew, f"lease-{fence.lease}"):
        yield
