"""Loops every coordinator process runs beside its servers: the coordinator and its heartbeat process."""

from __future__ import annotations

import asyncio
import logging

from server import metrics
from server.config import CoordinatorSettings
from server.domain.errors import UnavailableError
from server.services.devices import DeviceService

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
