"""Device enrolment, credentials and liveness."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta

from mlecs.modality import parse_modalities
from server import metrics
from server.domain.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from server.domain.models import Device, EnrolmentToken, utcnow
from server.services.context import ServiceContext
from server.services.credentials import CredentialCache
from server.services.federations import FederationService

log = logging.getLogger(__name__)

ENROLMENT_TOKEN_PREFIX = "mlecs_enrol_"
"""Starts every enrolment token, so a leaked one is recognisable (and secret scanners can match it)."""
MAX_ENROLMENT_TOKEN_TTL_S = 30 * 24 * 3600.0


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

    def enrol(self, federation_name: str, device_name: str, modalities: list[str], enrolment_token: str = "",
              certificate_name: str | None = None) -> Enrolment:
        """Registers a device (or re-registers one with the same name) and issues a fresh secret.

        Needs a valid one-time ``enrolment_token`` of the federation (unless ``open_enrolment``), which is
        used up in the same transaction. ``certificate_name`` is the CN of the caller's client certificate
        (mutual TLS; None without): it must equal ``device_name``.
        """
        federation = self._federations.get(federation_name)
        if federation.state.is_final:  # a paused one still enrols: its devices wait for rounds
            raise PermissionDeniedError(f"federation {federation.name!r} is {federation.state}, not enrolling")
        device_name = device_name.strip()
        if not device_name or len(device_name) > 128:
            raise InvalidRequestError("device_name must be 1-128 characters")
        _check_certificate(device_name, certificate_name)
        try:
            mods = parse_modalities(modalities, federation.config.modality_names())
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc
        grant = self._enrolment_grant(federation.id, device_name, enrolment_token)
        secret = secrets.token_urlsafe(32)
        store = self._ctx.store
        existing = store.find_device_by_name(federation.id, device_name)
        if existing is not None:
            if existing.revoked:
                raise PermissionDeniedError(f"device revoked: {device_name!r} may not enrol again")
            if grant is not None and grant.device_name is None and certificate_name is None:
                # Otherwise anyone holding a token for a new device could take an enrolled device's name over.
                raise PermissionDeniedError(
                    f"device {device_name!r} is already enrolled: re-enrolling it needs an enrolment token issued "
                    "for that device name (or, with mutual TLS, its client certificate)")
            # A re-installed agent keeps its name; its old secret stops working.
            existing.secret_hash = hash_secret(secret)
            existing.modalities = mods
            device = existing
        else:
            device = Device(federation_id=federation.id, name=device_name, modalities=mods,
                            secret_hash=hash_secret(secret))
        if not store.enrol_device(device, new=existing is None, token=grant):
            raise UnauthenticatedError("the enrolment token was used by another enrolment or expired meanwhile")
        self._credentials.forget(device.id)  # a replaced secret stops working here at once
        self._credentials.put(device)  # its first calls need no database read
        try:
            self._ctx.presence.mark_seen(device.id, self._ctx.settings.presence_ttl_s)
        except UnavailableError as exc:  # the enrolment is in the database; its next heartbeat marks it live
            log.warning("enrolled %s without marking it live: %s", device.name, exc)
        return Enrolment(device=device, secret=secret)

    def authenticate(self, device_id: str, secret: str, certificate_name: str | None = None) -> Device:
        """Returns the device whose credential this is; raises UnauthenticatedError otherwise, and
        PermissionDeniedError when it is revoked or ``certificate_name`` (mutual TLS) names another device."""
        device = self.authenticate_cached(device_id, secret, certificate_name)
        if device is not None:
            return device
        try:
            device = self._ctx.store.get_device(device_id)
        except NotFoundError:
            raise UnauthenticatedError("unknown device credential") from None
        if not hmac.compare_digest(device.secret_hash, hash_secret(secret)):
            raise UnauthenticatedError("unknown device credential")
        if device.revoked:
            raise PermissionDeniedError("device revoked")
        self._credentials.put(device)
        _check_certificate(device.name, certificate_name)
        return device

    def authenticate_cached(self, device_id: str, secret: str, certificate_name: str | None = None) -> Device | None:
        """The device, if its credential was verified recently; None when the database must be asked.
        Raises PermissionDeniedError when ``certificate_name`` names another device. Does no I/O, so it
        may run on the event loop."""
        device = self._credentials.get(device_id)
        if device is None or not hmac.compare_digest(device.secret_hash, hash_secret(secret)):
            return None
        _check_certificate(device.name, certificate_name)
        return device

    def revoke(self, device_id: str) -> Device:
        """Revokes the device: every later call it makes is refused (PERMISSION_DENIED), on this replica at
        once and on the others once they read the revocation feed. It cannot enrol again under its name."""
        device = self._ctx.store.revoke_device(device_id)
        self._credentials.forget(device.id)
        try:
            self._ctx.revocations.publish(device.id)
        except UnavailableError as exc:
            log.warning("device %s revoked; other replicas refuse it when its cached credential expires (%.0f s), "
                        "the revocation feed is unavailable: %s", device.id, self._ctx.settings.credential_cache_s,
                        exc)
        metrics.REVOCATIONS.inc()
        log.info("device %s (%s) revoked", device.id, device.name)
        return device

    def follow_revocations(self) -> int:
        """Forgets the remembered credentials of devices revoked by any replica since the last call; returns
        how many revocations were read. May raise UnavailableError (the feed's Redis is down)."""
        revoked = self._ctx.revocations.poll()
        for device_id in revoked:
            self._credentials.forget(device_id)
        return len(revoked)

    def issue_enrolment_token(self, federation: str, device_name: str | None, ttl_s: float,
                              created_by: str) -> tuple[str, EnrolmentToken]:
        """Creates a one-time enrolment token for ``federation`` (an id or name), usable for ``ttl_s``
        seconds, by the device called ``device_name`` only when given. Returns the plaintext, which is not
        kept anywhere (only its sha256 is), and the stored record."""
        target = self._federations.get(federation)
        if target.state.is_final:
            raise ConflictError(f"federation {target.name!r} is {target.state}: it enrols no devices")
        if not (math.isfinite(ttl_s) and 0 < ttl_s <= MAX_ENROLMENT_TOKEN_TTL_S):
            raise InvalidRequestError(f"an enrolment token's lifetime must be more than 0 and at most "
                                      f"{MAX_ENROLMENT_TOKEN_TTL_S / 86400:.0f} days, not {ttl_s} s")
        if device_name is not None:
            device_name = device_name.strip()
            if not device_name or len(device_name) > 128:
                raise InvalidRequestError("device_name must be 1-128 characters")
        created_by = created_by.strip()
        if not created_by or len(created_by) > 200:
            raise InvalidRequestError("created_by must be 1-200 characters")
        plaintext = ENROLMENT_TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = EnrolmentToken(federation_id=target.id, token_hash=hash_secret(plaintext), created_by=created_by,
                               expires_at=utcnow() + timedelta(seconds=ttl_s), device_name=device_name)
        self._ctx.store.add_enrolment_token(token)
        log.info("enrolment token %s issued by %s for federation %s%s, valid until %s", token.id, created_by,
                 target.name, f" (device {device_name})" if device_name else "", token.expires_at.isoformat())
        return plaintext, token

    def list_enrolment_tokens(self, federation: str) -> list[EnrolmentToken]:
        """The federation's enrolment tokens (digests and use, never a plaintext), oldest first."""
        return self._ctx.store.list_enrolment_tokens(self._federations.get(federation).id)

    def _enrolment_grant(self, federation_id: str, device_name: str, token: str) -> EnrolmentToken | None:
        """The valid token ``token`` names, or None when enrolment is open and none was given."""
        if not token:
            if self._ctx.settings.open_enrolment:
                return None
            raise UnauthenticatedError(
                "enrolment needs a one-time enrolment token: ask the operator for one (`mlecs-coordinator "
                "enrolment-tokens create --federation NAME`) and set enrolment_token_file in the agent config")
        grant = self._ctx.store.find_enrolment_token_by_hash(hash_secret(token))
        if grant is None:
            raise UnauthenticatedError("unknown enrolment token")
        problem = grant.refusal(federation_id, device_name, utcnow())
        if problem is not None:
            raise UnauthenticatedError(problem)
        return grant

    def credential_due_for_refresh(self, device_id: str) -> bool:
        """Whether the caller should have ``refresh_credentials`` called for it (in the background, batched
        with others), once per cache entry."""
        return self._credentials.claim_refresh(device_id)

    def refresh_credentials(self, device_ids: Collection[str]) -> None:
        """Re-reads remembered devices in one database read, so their cache entries are renewed before they
        expire (or dropped if a device was revoked, re-enrolled or deleted meanwhile)."""
        found = {device.id: device for device in self._ctx.store.get_devices(device_ids)}
        for device_id in device_ids:
            device = found.get(device_id)
            if device is None or device.revoked:
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

    def view(self, device_id: str) -> DeviceView:
        """One device by id, with whether it is online now."""
        device = self._ctx.store.get_device(device_id)
        return DeviceView(device=device, online=device.id in self._ctx.presence.online([device.id]))

    def flush_presence(self) -> int:
        """Writes last-seen times gathered in presence to the database; returns how many."""
        self._credentials.prune()
        seen = self._ctx.presence.drain_seen()
        if seen:
            self._ctx.store.touch_devices(seen)
        return len(seen)


def _check_certificate(device_name: str, certificate_name: str | None) -> None:
    """With mutual TLS, a call acts only for the device its client certificate names (CN = device name)."""
    if certificate_name is not None and certificate_name != device_name:
        raise PermissionDeniedError(f"a device may act only as itself: the client certificate is for "
                                    f"{certificate_name!r}, the request for device {device_name!r}")
