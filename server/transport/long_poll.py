"""Long polls: a device with nothing to do is answered as soon as there is something, not at its next poll.

``ChangeSignal`` wakes every held call at once; the coordinator notifies it when its view of the work
changes (a round opened, closed or moved on, a federation stopped), whichever replica made the change.
"""

from __future__ import annotations

import asyncio
import contextlib


class ChangeSignal:
    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        """The event the next change sets. Take it *before* checking for work, so no change slips by."""
        return self._event

    def notify(self) -> None:
        """Wakes everyone holding the current event; later waiters get a fresh one (call on the loop)."""
        self._event.set()
        self._event = asyncio.Event()


async def wait_for_change(event: asyncio.Event, timeout_s: float) -> bool:
    """True if ``event`` was set within ``timeout_s``."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=max(timeout_s, 0.0))
        return True
    return False
