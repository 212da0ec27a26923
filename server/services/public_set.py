"""The federation's one public set, handed out to devices: each device's shard as an archive, and checks of
the copies devices hold themselves (docs/datasets.md, "The public set")."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from mlecs.datasets.public_shard import Mismatch, SampleFingerprint, compare, shard_ids, write_shard
from server import metrics
from server.domain.errors import InvalidRequestError
from server.domain.models import Device
from server.learning.task_data import PublicReference, TaskData
from server.services.context import ServiceContext

log = logging.getLogger(__name__)

CACHED_SHARD_BYTES = 64 * 1024 * 1024
"""Archives kept ready (most recently asked first): a restarting fleet asks for the same shards again."""
MAX_VERIFY_SAMPLES = 10_000
"""Samples one VerifyPublicCopy call may carry (the agent sends a larger copy in batches)."""


@dataclass(frozen=True)
class PublicShard:
    sha256: str
    samples: int
    archive: bytes


@dataclass(frozen=True)
class CopyCheck:
    verified: int
    mismatches: list[Mismatch]


class PublicSetService:
    def __init__(self, ctx: ServiceContext, data: TaskData) -> None:
        self._ctx = ctx
        self._data = data
        self._archives: OrderedDict[tuple[str, str, str], PublicShard] = OrderedDict()
        self._archive_bytes = 0
        self._guard = threading.Lock()

    def _reference(self, device: Device) -> tuple[PublicReference | None, int, int]:
        config = self._ctx.store.get_federation(device.federation_id).config
        return self._data.public_reference(config), config.public_shard_samples, config.seed

    def shard_for(self, device: Device) -> PublicShard | None:
        """The device's shard of its federation's public set; None when the coordinator holds none."""
        reference, samples, seed = self._reference(device)
        if reference is None:
            return None
        key = (device.federation_id, str(reference.directory), device.id)
        with self._guard:
            if key in self._archives:
                self._archives.move_to_end(key)
                return self._archives[key]
        ids = shard_ids(reference.ids, samples, seed, device.id)
        archive = write_shard(reference.directory, reference.task, ids)
        shard = PublicShard(hashlib.sha256(archive).hexdigest(), len(ids), archive)
        with self._guard:
            if key not in self._archives:
                self._archives[key] = shard
                self._archive_bytes += len(archive)
            while self._archive_bytes > CACHED_SHARD_BYTES and len(self._archives) > 1:
                _, dropped = self._archives.popitem(last=False)
                self._archive_bytes -= len(dropped.archive)
        return shard

    def verify_copy(self, device: Device, offered: Sequence[SampleFingerprint]) -> CopyCheck | None:
        """Which of a device's public samples are the coordinator's; None when it holds no public set."""
        if len(offered) > MAX_VERIFY_SAMPLES:
            raise InvalidRequestError(f"a copy check carries at most {MAX_VERIFY_SAMPLES} samples, this one "
                                      f"{len(offered)}: send the rest in another call")
        reference, _, _ = self._reference(device)
        if reference is None:
            metrics.PUBLIC_COPY_SAMPLES.labels("unchecked").inc(len(offered))
            return None
        mismatches = compare(reference.fingerprints, offered)
        verified = len(offered) - len(mismatches)
        metrics.PUBLIC_COPY_SAMPLES.labels("verified").inc(verified)
        metrics.PUBLIC_COPY_SAMPLES.labels("refused").inc(len(mismatches))
        if mismatches:
            log.info("device %s: %d of %d public samples are not the coordinator's (first: %s %s)", device.id,
                     len(mismatches), len(offered), mismatches[0].id, mismatches[0].reason)
        return CopyCheck(verified, mismatches)
