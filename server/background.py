"""Loops every coordinator process runs beside its servers: the coordinator and its heartbeat process, and the
tasks that drive each federation's rounds."""

from __future__ import annotations

import asyncio
import logging

from server import metrics
from server.config import CoordinatorSettings
from server.domain.errors import UnavailableError
from server.domain.models import Federation
from server.services.devices import DeviceService
from server.services.rounds import RoundService

log = logging.getLogger("mlecs.coordinator")


async def follow_revocations(devices: DeviceService, settings: CoordinatorSettings) -> None:
    """Forgets the remembered credentials of devices other replicas revoked (see
    ``server.persistence.revocations``), every ``revocation_poll_interval_s``."""
    failing = False
    while True:
        await asyncio.sleep(settings.revocation_poll_interval_s)
        try:
            await asyncio.to_thread(devices.follow_revocations)
        except UnavailableError as exc:
            if not failing:
                log.warning("revocations by other replicas take effect here when cached credentials "
                            "expire (%.0f s) until Redis answers: %s", settings.credential_cache_s, exc)
            failing = True
        else:
            failing = False


async def measure_loop_lag(interval_s: float = 0.1) -> None:
    """Records how late a timer fires: the time any gRPC or HTTP call waits before the loop runs it."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval_s)
        metrics.EVENT_LOOP_LAG.observe(max(0.0, loop.time() - started - interval_s))


class FederationDrivers:
    """Drives each federation's rounds in a task of its own (``RoundService.drive_one`` on a worker thread), side
    by side: one federation's long commit (a robust rule over a thousand updates takes seconds) never holds
    another's round. A federation asked for again while its task runs is driven again as soon as it is done."""

    def __init__(self, rounds: RoundService, *, changed: asyncio.Event, wake: asyncio.Event) -> None:
        self._rounds = rounds
        self._changed = changed  # set after every drive: it may have opened or closed a round
        self._wake = wake  # set when a federation asked for meanwhile should be driven again now
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()

    def drive(self, federations: list[Federation]) -> None:
        """Starts a driver for each federation that has none running; marks the others to go again."""
        for federation in federations:
            running = self._tasks.get(federation.id)
            if running is not None and not running.done():
                self._again.add(federation.id)
            else:
                self._tasks[federation.id] = asyncio.create_task(self._drive(federation))
        listed = {f.id for f in federations}
        for gone in [key for key, task in self._tasks.items() if key not in listed and task.done()]:
            del self._tasks[gone]

    def cancel(self) -> None:
        for task in self._tasks.values():
            task.cancel()

    async def _drive(self, federation: Federation) -> None:
        try:
            await asyncio.to_thread(self._rounds.drive_one, federation)
        except UnavailableError as exc:
            log.warning("rounds of %s paused: %s", federation.name, exc)
        finally:
            self._changed.set()
            if federation.id in self._again:
                self._again.discard(federation.id)
                self._wake.set()
