"""Keeping a lease alive while long work runs (aggregation with server-side tuning can take a while)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from server.domain.errors import UnavailableError
from server.domain.models import Fence
from server.domain.ports import RoundStore

log = logging.getLogger(__name__)


@contextmanager
def lease_kept(store: RoundStore, fence: Fence, ttl_s: float) -> Iterator[None]:
    """Renews ``fence``'s lease every ttl/3 until the block ends.

    Losing the lease is not raised here: the writes at the end present the fence and are refused then.
    """
    done = threading.Event()

    def renew() -> None:
        while not done.wait(ttl_s / 3):
            try:
                renewed = store.acquire_lease(fence.lease, fence.holder, ttl_s)
            except UnavailableError as exc:
                log.warning("could not renew lease %s: %s", fence.lease, exc)
                continue
            if renewed is None or renewed.token != fence.token:
                log.warning("lease %s passed to another replica; this replica's commit will be refused",
                            fence.lease)
                return

    thread = threading.Thread(target=renew, name=f"lease-{fence.lease}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
