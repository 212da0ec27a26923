"""Device enrolment, credentials and liveness."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

from mlecs.modality import parse_modalities
from server.domain.errors import (
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from server.domain.models import Device, FederationState
from server.services.context import ServiceContext
from server.services.credentials import CredentialCache
from server.services.federations import FederationService

log = logging.getLogger(__name__)


def hash_secret(secret: str) -> str:
    # Secrets are 256-bit random tokens, so a plain digest is enough (no password stretching needed).
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Enrolment:
    device: Device
    secret: str


@dataclass(frozen=True)
class DeviceView:
    device: Device
    online: bool


class DeviceService:
    def __init__(self, ctx: ServiceContext, federations: FederationService) -> None:
        self._ctx = ctx
        self._federations = federations
        self._credentials = CredentialCache(ctx.settings.credential_cache_s)

    def enrol(self, federation_name: str, device_name: str, modalities: list[str]) -> Enrolment:
        """Registers a device (or re-registers one with the same name) and issues a fresh secret."""
        federation = self._federations.get(federation_name)
        if federation.state is not FederationState.ACTIVE:
            raise PermissionDeniedError(f"federation {federation.name!r} is {federation.state}, not enrolling")
        device_name = device_name.strip()
        if not device_name or len(device_name) > 128:
            raise InvalidRequestError("device_name must be 1-128 characters")
        try:
            mods = frozenset(m.value for m in parse_modalities(modalities))
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc
        secret = secrets.token_urlsafe(32)
        store = self._ctx.store
        existing = store.find_device_by_name(federation.id, device_name)
        if existing is not None:
            if existing.revoked:
                raise PermissionDeniedError(f"device {device_name!r} is revoked")
            # A re-installed agent keeps its name; its old secret stops working.
            existing.secret_hash = hash_secret(secret)
            existing.modalities = mods
            store.save_device(existing)
            self._credentials.forget(existing.id)  # the old secret stops working here at once
            device = existing
        else:
            device = Device(federation_id=federation.id, name=device_name, modalities=mods,
                            secret_hash=hash_secret(secret))
            store.add_device(device)
        self._credentials.put(device)  # its first calls need no database read
        try:
            self._ctx.presence.mark_seen(device.id, self._ctx.settings.presence_ttl_s)
        except UnavailableError as exc:  # the enrolment is in the database; its next heartbeat marks it live
            log.warning("enrolled %s without marking it live: %s", device.name, exc)
        return Enrolment(device=device, secret=secret)

    def authenticate(self, device_id: str, secret: str) -> Device:
        """Returns the device whose credential this is; raises UnauthenticatedError otherwise."""
        device = self.authenticate_cached(device_id, secret)
        if device is not None:
            return device
        try:
            device = self._ctx.store.get_device(device_id)
        except NotFoundError:
            raise UnauthenticatedError("unknown device credential") from None
        if not hmac.compare_digest(device.secret_hash, hash_secret(secret)):
            raise UnauthenticatedError("unknown device credential")
        if device.revoked:
            raise PermissionDeniedError("device is revoked")
        self._credentials.put(device)
        return device

    def authenticate_cached(self, device_id: str, secret: str) -> Device | None:
        """The device, if its credential was verified recently; None when the database must be asked.
        Does no I/O, so it may run on the event loop."""
        device = self._credentials.get(device_id)
        if device is None or not hmac.compare_digest(device.secret_hash, hash_secret(secret)):
            return None
        return device

    def credential_due_for_refresh(self, device_id: str) -> bool:
        """Whether the caller should call ``refresh_credential`` (in the background), once per cache entry."""
        return self._credentials.claim_refresh(device_id)

    def refresh_credential(self, device_id: str) -> None:
        """Re-reads a remembered device, so its cache entry is renewed before it expires (or dropped if the
        device was revoked or re-enrolled meanwhile)."""
        try:
            device = self._ctx.store.get_device(device_id)
        except NotFoundError:
            self._credentials.forget(device_id)
            return
        if device.revoked:
            self._credentials.forget(device_id)
        else:
            self._credentials.put(device)

    def heartbeat_interval(self) -> int:
        return self._ctx.settings.heartbeat_interval_s

    def heartbeat(self, device: Device) -> int:
        """Records that the device is alive; returns seconds until the next heartbeat is due. Does no I/O
        (presence buffers heartbeats), so it may run on the event loop."""
        self._ctx.presence.mark_seen(device.id, self._ctx.settings.presence_ttl_s)
        return self._ctx.settings.heartbeat_interval_s

    def list_for(self, federation_id_or_name: str) -> list[DeviceView]:
        federation = self._federations.get(federation_id_or_name)
        devices = self._ctx.store.list_devices(federation.id)
        online = self._ctx.presence.online(d.id for d in devices)
        return [DeviceView(device=d, online=d.id in online) for d in devices]

    def flush_presence(self) -> int:
        """Writes last-seen times gathered in presence to the database; returns how many."""
        self._credentials.prune()
        seen = self._ctx.presence.drain_seen()
        if seen:
            self._ctx.store.touch_devices(seen)
        return len(seen)
