"""Reading global versions: metadata and their stored bytes."""

from __future__ import annotations

from server.domain.errors import NotFoundError, PermissionDeniedError
from server.domain.models import ModelVersion
from server.services.context import ServiceContext
from server.services.federations import FederationService


class VersionService:
    def __init__(self, ctx: ServiceContext, federations: FederationService) -> None:
        self._ctx = ctx
        self._federations = federations

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
        adapter = self._ctx.blobs.get(version.adapter_key)
        anchors = self._ctx.blobs.get(version.anchors_key) if version.anchors_key else b""
        return version, adapter, anchors
