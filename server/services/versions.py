"""Reading global versions: metadata and their stored bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict

from server.domain.errors import NotFoundError, PermissionDeniedError
from server.domain.models import ModelVersion
from server.services.context import ServiceContext
from server.services.federations import FederationService

CACHED_VERSIONS = 4
"""The current version and the few before it (async devices may still train from those)."""


class VersionService:
    def __init__(self, ctx: ServiceContext, federations: FederationService) -> None:
        self._ctx = ctx
        self._federations = federations
        # Versions never change, and a whole fleet downloads the same one at the start of a round: every
        # concurrent download shares one copy of the bytes instead of reading its own from disk.
        self._cache: OrderedDict[str, tuple[bytes, bytes]] = OrderedDict()
        self._cache_guard = threading.Lock()

    def list_for(self, federation_ref: str) -> list[ModelVersion]:
        return self._ctx.store.list_versions(self._federations.get(federation_ref).id)

    def get(self, version_id: str) -> ModelVersion:
        return self._ctx.store.get_version(version_id)

    def read(self, version_id: str | None, federation_id: str) -> tuple[ModelVersion, bytes, bytes]:
        """A version of ``federation_id`` (its current one when ``version_id`` is None) with adapter and anchors."""
        if version_id is None:
            current = self._ctx.store.get_federation(federation_id).current_version_id
            if current is None:
                raise NotFoundError("the federation has no global version yet")
            version_id = current
        version = self._ctx.store.get_version(version_id)
        if version.federation_id != federation_id:
            raise PermissionDeniedError("that version belongs to another federation")
        with self._cache_guard:
            cached = self._cache.get(version.id)
            if cached is not None:
                self._cache.move_to_end(version.id)
                return version, *cached
        adapter = self._ctx.blobs.get(version.adapter_key)
        if version.anchors_key is None:  # its anchors are still being generated: nothing to remember yet
            return version, adapter, b""
        anchors = self._ctx.blobs.get(version.anchors_key)
        with self._cache_guard:
            self._cache[version.id] = (adapter, anchors)
            while len(self._cache) > CACHED_VERSIONS:
                self._cache.popitem(last=False)
        return version, adapter, anchors
