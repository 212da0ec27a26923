"""The device calls every device port serves: authentication, refusals, rate limits and Heartbeat.

The coordinator's device port serves the whole Fleet service (``FleetServicer``, which builds on this);
the heartbeat process serves Heartbeat alone on a port of its own (``add_heartbeat_service``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from mlecs.proto.v1 import fleet_pb2 as pb
from server import metrics
from server.domain.errors import (
    ConflictError,
    CoordinatorError,
    IdleStreamError,
    InvalidRequestError,
    MalformedRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    UnauthenticatedError,
    UnavailableError,
)
from server.domain.models import Device
from server.services.devices import DeviceService
from server.services.rate_limits import TokenBucketLimiter
from server.services.refusals import RefusalRecorder
from server.transport.tls import peer_certificate_name

log = logging.getLogger(__name__)
T = TypeVar("T")

FLEET_SERVICE = "mlecs.v1.Fleet"
CREDENTIAL_REFRESH_BATCH_S = 1.0
"""How long a credential due for renewal waits for others to be renewed with it (entries are renewed from
half their lifetime on, so this is far from expiry)."""
_STATUS: list[tuple[type[CoordinatorError], grpc.StatusCode]] = [
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (RateLimitedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (IdleStreamError, grpc.StatusCode.DEADLINE_EXCEEDED),
]


@dataclass(frozen=True)
class MalformedMessage:
    """What bytes that are not the expected protobuf message decode to: the handler refuses them as the
    caller's fault (INVALID_ARGUMENT, a counted refusal), where a raising deserializer would make gRPC answer
    UNKNOWN or INTERNAL with the parser's text and log a traceback per message."""

    message_type: str
    error: str

    def refusal(self) -> MalformedRequestError:
        return MalformedRequestError(f"the request is not a valid {self.message_type} message ({self.error[:200]})")


def tolerant_deserializer(message_class: type[Message]) -> Callable[[bytes], Any]:
    """``message_class.FromString``, returning a ``MalformedMessage`` instead of raising on bad bytes."""
    name = message_class.DESCRIPTOR.name

    def decode(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except (DecodeError, ValueError) as exc:  # ValueError: invalid UTF-8 in a string field, for one
            return MalformedMessage(name, str(exc) or type(exc).__name__)
    return decode


def status_for(exc: CoordinatorError) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def device_credential(context: grpc.aio.ServicerContext) -> tuple[str, str]:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Device "):
            device_id, _, secret = value[len("Device "):].partition(":")
            if device_id and secret:
                return device_id, secret
    raise UnauthenticatedError("missing 'authorization: Device <id>:<secret>' metadata; enrol first")


def check_claim(claimed: str, device_id: str) -> None:
    """A request that names a device (``device_id`` fields) must name the one whose credential it carries."""
    if claimed and claimed != device_id:
        raise PermissionDeniedError(f"a device may act only as itself: the request names device {claimed[:64]!r}, "
                                    f"the credential device {device_id!r}")


@dataclass
class Caller:
    """What one call has learnt about who sent it and what it concerns, so that a refusal can name them."""

    device: Device | None = None
    claimed_device_id: str | None = None
    """The id in the credential, before (or without) proof."""
    round_id: str | None = None


def peer_host(context: grpc.aio.ServicerContext) -> str:
    """``ipv4:10.0.0.7`` from ``ipv4:10.0.0.7:53124``: one key per host, whatever port a call comes from."""
    peer = context.peer() or ""
    return peer.rpartition(":")[0] or peer


class HeartbeatServicer:
    """What every device port shares: authenticating a call, mapping domain errors to statuses (and
    recording the refusal), rate limits, and the Heartbeat call itself.

    ``FleetServicer`` adds the rest of the Fleet service. The heartbeat process serves this class alone
    (``add_heartbeat_service``), so that liveness never waits behind transfers; ``heartbeat_port`` is the
    port devices are told to send heartbeats to (0: the port they called)."""

    def __init__(self, devices: DeviceService, *, control_threads: int = 4,
                 limiter: TokenBucketLimiter | None = None, refusals: RefusalRecorder | None = None,
                 mtls: bool = False, heartbeat_port: int = 0,
                 failed_auth_limiter: TokenBucketLimiter | None = None) -> None:
        self._devices = devices
        # Heartbeats and task polls get threads of their own, so they never queue behind the uploads and
        # aggregation that occupy the default pool: a busy round must not make live devices look dead.
        self._control = ThreadPoolExecutor(max_workers=control_threads, thread_name_prefix="mlecs-control")
        self._background: set[asyncio.Future[None]] = set()
        self._refresh_due: set[str] = set()
        self._limiter = limiter if limiter is not None else TokenBucketLimiter(0, 1)  # default: no limit
        # Failed authentications per peer address: a caller guessing credentials costs a database read each
        # time; once its address has failed too often, its calls are refused before any read.
        self._failed_auth = failed_auth_limiter if failed_auth_limiter is not None else TokenBucketLimiter(0, 1)
        self._refusals = refusals
        # With mutual TLS every call carries a client certificate, and a device acts only as the one it names.
        self._mtls = mtls
        self.heartbeat_port = heartbeat_port

    async def _light(self, call: Callable[..., T], *args: Any) -> T:
        """Runs a short control-plane call (database or Redis) on the control threads."""
        return await asyncio.get_running_loop().run_in_executor(self._control, partial(call, *args))

    def close(self) -> None:
        self._control.shutdown(wait=False, cancel_futures=True)

    def _refresh_later(self, device_id: str) -> None:
        """Renews the device's remembered credential in the background, batched with the other devices due
        within ``CREDENTIAL_REFRESH_BATCH_S``: one database read per batch instead of one per device (at a
        thousand devices, per-device reads took a quarter of the heartbeat process's CPU)."""
        self._refresh_due.add(device_id)
        if len(self._refresh_due) == 1:
            task = asyncio.ensure_future(self._refresh_batch())
            self._background.add(task)  # a reference, so the task is not collected before it finishes
            task.add_done_callback(self._background.discard)

    async def _refresh_batch(self) -> None:
        await asyncio.sleep(CREDENTIAL_REFRESH_BATCH_S)
        batch, self._refresh_due = self._refresh_due, set()
        try:
            await self._light(self._devices.refresh_credentials, batch)
        except Exception:  # the entries then expire, and those devices' next calls read the database
            log.warning("background refresh of %d credentials failed", len(batch), exc_info=True)

    async def _call(self, method: str, context: grpc.aio.ServicerContext,
                    body: Callable[[], Awaitable[T]], caller: Caller | None = None) -> T:
        """Runs one RPC body, maps domain errors to statuses once (recording refusals), and records its
        duration. ``caller`` is what the body learnt about the caller before it was refused."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await body()
        except CoordinatorError as exc:
            if isinstance(exc, UnauthenticatedError):
                self._failed_auth.take(peer_host(context))
            code = status_for(exc)
            await context.abort(code, str(exc), self._refused(method, exc, context, caller))
            raise  # unreachable: abort raises
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method)
            await context.abort(code, f"internal error in {method}; see coordinator logs")
            raise
        finally:
            metrics.RPC_DURATION.labels(method, code.name).observe(time.perf_counter() - started)

    def _refused(self, method: str, exc: CoordinatorError, context: grpc.aio.ServicerContext,
                 caller: Caller | None) -> tuple[tuple[str, str], ...]:
        """Counts and records a refusal (best-effort, never blocking); returns the trailing metadata of its
        answer: ``retry-after-ms`` when the caller was over its rate limit."""
        if self._refusals is not None:
            caller = caller or Caller()
            device = caller.device
            self._refusals.refused(
                method, exc, caller=device.id if device else peer_host(context),
                device_id=device.id if device else caller.claimed_device_id,
                federation_id=device.federation_id if device else None, round_id=caller.round_id)
        if isinstance(exc, RateLimitedError):
            return (("retry-after-ms", str(max(1, math.ceil(exc.retry_after_s * 1000)))),)
        return ()

    def _admit(self, device: Device, caller: Caller | None) -> None:
        """Takes one request from the device's rate limit (RateLimitedError when it is spent). Thread-safe."""
        if caller is not None:
            caller.device = device
        self._limiter.check(device.id, f"device {device.id}")

    def _certificate_name(self, context: grpc.aio.ServicerContext) -> str | None:
        """The device name the caller's client certificate proves (mutual TLS), else None."""
        return peer_certificate_name(context) if self._mtls else None

    def refusing_malformed(self, method: str, handler: Callable[[Any, grpc.aio.ServicerContext], Awaitable[T]]
                           ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[T]]:
        """A unary handler that refuses a ``MalformedMessage`` request (counted and recorded as a refusal)
        before ``handler`` sees it."""
        async def checked(request: Any, context: grpc.aio.ServicerContext) -> T:
            if isinstance(request, MalformedMessage):
                async def refuse() -> T:
                    raise request.refusal()
                return await self._call(method, context, refuse, Caller())
            return await handler(request, context)
        return checked

    def check_failed_authentications(self, host: str) -> None:
        """Refuses a call from ``host`` while its failed authentications are over their limit: such a call
        would cost a database read (the credential is not remembered, or it is an enrolment)."""
        wait = self._failed_auth.waiting(host)
        if wait:
            raise RateLimitedError(f"too many failed authentications from {host}; retry in {wait:.1f} s",
                                   retry_after_s=wait)

    def _authenticate(self, device_id: str, secret: str, certificate: str | None, host: str) -> Device:
        """The device whose credential this is. A remembered credential answers at once, whatever its address
        did; one that needs the database is refused first while the address is over its failed-authentication
        limit, so that a flood of guesses neither reaches the database nor locks out the devices sharing its
        address (a NAT)."""
        device = self._devices.authenticate_cached(device_id, secret, certificate)
        if device is not None:
            return device
        self.check_failed_authentications(host)
        return self._devices.authenticate(device_id, secret, certificate)

    async def _device(self, context: grpc.aio.ServicerContext, caller: Caller | None = None) -> Device:
        """The authenticated caller, admitted by its rate limit."""
        device_id, secret = device_credential(context)
        if caller is not None:
            caller.claimed_device_id = device_id
        device = await self._light(self._authenticate, device_id, secret, self._certificate_name(context),
                                   peer_host(context))
        self._admit(device, caller)
        return device

    def _claimed(self, context: grpc.aio.ServicerContext, named_device_id: str,
                 caller: Caller) -> tuple[str, str, str | None]:
        """(device id, secret) of the credential the call carries, checked against the device the request
        names, and the device name its client certificate proves (None without mutual TLS)."""
        device_id, secret = device_credential(context)
        caller.claimed_device_id = device_id
        check_claim(named_device_id, device_id)
        return device_id, secret, self._certificate_name(context)

    async def Heartbeat(self, request: pb.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        caller = Caller()

        async def body() -> pb.HeartbeatResponse:
            device_id, secret, certificate = self._claimed(context, request.device_id, caller)
            # The common case does no I/O (a remembered credential, buffered presence): answered on the
            # event loop, it never queues behind task polls and transfers for a thread.
            device = self._devices.authenticate_cached(device_id, secret, certificate)
            if device is None:
                return pb.HeartbeatResponse(
                    next_heartbeat_s=await self._light(self._beat, device_id, secret, caller, certificate,
                                                       peer_host(context)),
                    heartbeat_port=self.heartbeat_port)
            self._admit(device, caller)
            if self._devices.credential_due_for_refresh(device.id):
                self._refresh_later(device.id)
            return pb.HeartbeatResponse(next_heartbeat_s=self._devices.heartbeat(device),
                                        heartbeat_port=self.heartbeat_port)
        return await self._call("Heartbeat", context, body, caller)

    def _beat(self, device_id: str, secret: str, caller: Caller, certificate: str | None, host: str) -> int:
        device = self._authenticate(device_id, secret, certificate, host)
        self._admit(device, caller)
        return self._devices.heartbeat(device)


def add_heartbeat_service(servicer: HeartbeatServicer, server: grpc.aio.Server) -> None:
    """Serves only ``mlecs.v1.Fleet/Heartbeat`` on ``server``; other Fleet methods answer UNIMPLEMENTED."""
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.refusing_malformed("Heartbeat", servicer.Heartbeat),
        request_deserializer=tolerant_deserializer(pb.HeartbeatRequest),
        response_serializer=pb.HeartbeatResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(FLEET_SERVICE, {"Heartbeat": handler}),))
