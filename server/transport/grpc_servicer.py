"""The v1 Fleet gRPC service: authenticate, convert, call a service in a worker thread, convert back."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import grpc

from mlecs.codec import iter_chunks
from mlecs.proto.v1 import fleet_pb2 as pb
from mlecs.proto.v1 import fleet_pb2_grpc
from server import metrics
from server.domain.assignments import Assignment, WaitAssignment
from server.domain.errors import (
    ConflictError,
    CoordinatorError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    UnauthenticatedError,
    UnavailableError,
)
from server.domain.models import Device, UpdateState
from server.services.devices import DeviceService
from server.services.rate_limits import TokenBucketLimiter
from server.services.refusals import RefusalRecorder
from server.services.rounds import RoundService
from server.services.uploads import UploadService
from server.transport.grpc_convert import (
    assignment_to_proto,
    codec_to_proto,
    modality_names,
    upload_header_from_proto,
)
from server.transport.long_poll import ChangeSignal, wait_for_change
from server.transport.tls import peer_certificate_name

log = logging.getLogger(__name__)
T = TypeVar("T")

_STATUS: list[tuple[type[CoordinatorError], grpc.StatusCode]] = [
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (RateLimitedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
]
MAX_TASK_WAIT_S = 30
"""The longest a GetTask long poll is held, whatever the device asks for."""
_UPLOAD_STATE = {UpdateState.PARTIAL: pb.UPLOAD_STATE_PARTIAL, UpdateState.ACCEPTED: pb.UPLOAD_STATE_ACCEPTED,
                 UpdateState.REJECTED: pb.UPLOAD_STATE_REJECTED}


def status_for(exc: CoordinatorError) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _credential(context: grpc.aio.ServicerContext) -> tuple[str, str]:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Device "):
            device_id, _, secret = value[len("Device "):].partition(":")
            if device_id and secret:
                return device_id, secret
    raise UnauthenticatedError("missing 'authorization: Device <id>:<secret>' metadata; enrol first")


def _check_claim(claimed: str, device_id: str) -> None:
    """A request that names a device (``device_id`` fields) must name the one whose credential it carries."""
    if claimed and claimed != device_id:
        raise PermissionDeniedError(f"a device may act only as itself: the request names device {claimed[:64]!r}, "
                                    f"the credential device {device_id!r}")


@dataclass
class _Caller:
    """What one call has learnt about who sent it and what it concerns, so that a refusal can name them."""

    device: Device | None = None
    claimed_device_id: str | None = None
    """The id in the credential, before (or without) proof."""
    round_id: str | None = None


def _peer_host(context: grpc.aio.ServicerContext) -> str:
    """``ipv4:10.0.0.7`` from ``ipv4:10.0.0.7:53124``: one key per host, whatever port a call comes from."""
    peer = context.peer() or ""
    return peer.rpartition(":")[0] or peer


class FleetServicer(fleet_pb2_grpc.FleetServicer):
    def __init__(self, devices: DeviceService, rounds: RoundService, uploads: UploadService,
                 blob_reader: Callable[[str | None, str], Any], chunk_bytes: int, *,
                 max_uploads: int = 16, max_downloads: int = 32, control_threads: int = 4,
                 changes: ChangeSignal | None = None, limiter: TokenBucketLimiter | None = None,
                 refusals: RefusalRecorder | None = None, mtls: bool = False) -> None:
        self._devices = devices
        self._rounds = rounds
        self._uploads = uploads
        self._blob_reader = blob_reader
        self._chunk_bytes = chunk_bytes
        # Heartbeats and task polls get threads of their own, so they never queue behind the uploads and
        # aggregation that occupy the default pool: a busy round must not make live devices look dead.
        self._control = ThreadPoolExecutor(max_workers=control_threads, thread_name_prefix="mlecs-control")
        # Bounded transfers bound memory: each one in flight holds its chunks and, for uploads, a decoded
        # copy during validation. Streams beyond the bound wait (and gRPC flow control holds the senders).
        self._upload_slots = asyncio.Semaphore(max_uploads)
        self._download_slots = asyncio.Semaphore(max_downloads)
        self._changes = changes or ChangeSignal()
        self._background: set[asyncio.Future[None]] = set()
        self._limiter = limiter if limiter is not None else TokenBucketLimiter(0, 1)  # default: no limit
        self._refusals = refusals
        # With mutual TLS every call carries a client certificate, and a device acts only as the one it names.
        self._mtls = mtls

    async def _light(self, call: Callable[..., T], *args: Any) -> T:
        """Runs a short control-plane call (database or Redis) on the control threads."""
        return await asyncio.get_running_loop().run_in_executor(self._control, partial(call, *args))

    def close(self) -> None:
        self._control.shutdown(wait=False, cancel_futures=True)

    def _in_background(self, work: Awaitable[None]) -> None:
        """Runs ``work`` without making the caller wait; a failure is logged, never raised."""
        async def run() -> None:
            try:
                await work
            except Exception:
                log.warning("background refresh failed; the next call reads the database", exc_info=True)

        task = asyncio.ensure_future(run())
        self._background.add(task)  # a reference, so the task is not collected before it finishes
        task.add_done_callback(self._background.discard)

    async def _call(self, method: str, context: grpc.aio.ServicerContext,
                    body: Callable[[], Awaitable[T]], caller: _Caller | None = None) -> T:
        """Runs one RPC body, maps domain errors to statuses once (recording refusals), and records its
        duration. ``caller`` is what the body learnt about the caller before it was refused."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await body()
        except CoordinatorError as exc:
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
                 caller: _Caller | None) -> tuple[tuple[str, str], ...]:
        """Counts and records a refusal (best-effort, never blocking); returns the trailing metadata of its
        answer: ``retry-after-ms`` when the caller was over its rate limit."""
        if self._refusals is not None:
            caller = caller or _Caller()
            device = caller.device
            self._refusals.refused(
                method, exc, caller=device.id if device else _peer_host(context),
                device_id=device.id if device else caller.claimed_device_id,
                federation_id=device.federation_id if device else None, round_id=caller.round_id)
        if isinstance(exc, RateLimitedError):
            return (("retry-after-ms", str(max(1, math.ceil(exc.retry_after_s * 1000)))),)
        return ()

    def _admit(self, device: Device, caller: _Caller | None) -> None:
        """Takes one request from the device's rate limit (RateLimitedError when it is spent). Thread-safe."""
        if caller is not None:
            caller.device = device
        self._limiter.check(device.id, f"device {device.id}")

    def _certificate_name(self, context: grpc.aio.ServicerContext) -> str | None:
        """The device name the caller's client certificate proves (mutual TLS), else None."""
        return peer_certificate_name(context) if self._mtls else None

    async def _device(self, context: grpc.aio.ServicerContext, caller: _Caller | None = None) -> Device:
        """The authenticated caller, admitted by its rate limit."""
        device_id, secret = _credential(context)
        if caller is not None:
            caller.claimed_device_id = device_id
        device = await self._light(self._devices.authenticate, device_id, secret, self._certificate_name(context))
        self._admit(device, caller)
        return device

    async def Enrol(self, request: pb.EnrolRequest, context: grpc.aio.ServicerContext) -> pb.EnrolResponse:
        async def body() -> pb.EnrolResponse:
            # No identity yet: the limit is per name asked for (not per address, which a fleet behind NAT shares).
            self._limiter.check(("Enrol", request.federation, request.device_name),
                                f"enrolment of {request.device_name[:128]!r} in {request.federation[:128]!r}")
            try:
                enrolment = await self._light(
                    self._devices.enrol, request.federation, request.device_name, modality_names(request.modalities),
                    request.enrolment_token, self._certificate_name(context))
            except CoordinatorError:
                metrics.ENROLMENTS.labels("refused").inc()
                raise
            metrics.ENROLMENTS.labels("accepted").inc()
            return pb.EnrolResponse(device_id=enrolment.device.id, device_secret=enrolment.secret,
                                    heartbeat_interval_s=self._devices.heartbeat_interval())
        return await self._call("Enrol", context, body)

    async def Heartbeat(self, request: pb.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        caller = _Caller()

        async def body() -> pb.HeartbeatResponse:
            device_id, secret = _credential(context)
            caller.claimed_device_id = device_id
            _check_claim(request.device_id, device_id)
            certificate = self._certificate_name(context)
            # The common case does no I/O (a remembered credential, buffered presence): answered on the
            # event loop, it never queues behind task polls and transfers for a thread.
            device = self._devices.authenticate_cached(device_id, secret, certificate)
            if device is None:
                return pb.HeartbeatResponse(
                    next_heartbeat_s=await self._light(self._beat, device_id, secret, caller, certificate))
            self._admit(device, caller)
            if self._devices.credential_due_for_refresh(device.id):
                self._in_background(self._light(self._devices.refresh_credential, device.id))
            return pb.HeartbeatResponse(next_heartbeat_s=self._devices.heartbeat(device))
        return await self._call("Heartbeat", context, body, caller)

    async def GetTask(self, request: pb.GetTaskRequest,
                      context: grpc.aio.ServicerContext) -> pb.GetTaskResponse:
        caller = _Caller()

        async def body() -> pb.GetTaskResponse:
            device_id, secret = _credential(context)
            caller.claimed_device_id = device_id
            _check_claim(request.device_id, device_id)
            certificate = self._certificate_name(context)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + min(request.wait_s, MAX_TASK_WAIT_S)
            admit: _Caller | None = caller  # one poll is one request, however often a held one looks again
            while True:
                change = self._changes.current()
                assignment = await self._light(self._task, device_id, secret, admit, certificate)
                admit = None
                if not isinstance(assignment, WaitAssignment) or loop.time() >= deadline:
                    return assignment_to_proto(assignment)
                if not await wait_for_change(change, deadline - loop.time()):
                    # Held for the whole wait: the device should ask again at once, not sleep first.
                    return assignment_to_proto(WaitAssignment(0, assignment.reason))
        return await self._call("GetTask", context, body, caller)

    def _beat(self, device_id: str, secret: str, caller: _Caller, certificate: str | None) -> int:
        device = self._devices.authenticate(device_id, secret, certificate)
        self._admit(device, caller)
        return self._devices.heartbeat(device)

    def _task(self, device_id: str, secret: str, admit: _Caller | None, certificate: str | None) -> Assignment:
        """The device's assignment; ``admit``: take a request from its rate limit first (the first look)."""
        device = self._devices.authenticate(device_id, secret, certificate)
        if admit is not None:
            self._admit(device, admit)
        try:
            self._devices.heartbeat(device)
        except UnavailableError as exc:  # presence is a hint; Postgres still decides the task
            log.warning("presence not recorded: %s", exc)
        return self._rounds.assignment_for(device)

    async def DownloadGlobal(self, request: pb.DownloadGlobalRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DownloadChunk]:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        acquired = False
        caller = _Caller()
        try:
            device = await self._device(context, caller)
            _check_claim(request.device_id, device.id)
            await self._download_slots.acquire()
            acquired = True
            version, adapter, anchors = await asyncio.to_thread(
                self._blob_reader, request.version_id or None, device.federation_id)
            yield pb.DownloadChunk(header=pb.DownloadHeader(
                version_id=version.id, round_number=version.round_number, codec=codec_to_proto(version.codec),
                adapter_size=len(adapter), adapter_sha256=version.adapter_sha256,
                anchors_size=len(anchors), anchors_sha256=version.anchors_sha256 or ""))
            for kind, data in ((pb.BLOB_KIND_ADAPTER, adapter), (pb.BLOB_KIND_ANCHORS, anchors)):
                for offset, piece in iter_chunks(data, self._chunk_bytes) if data else ():
                    yield pb.DownloadChunk(chunk=pb.BlobChunk(kind=kind, offset=offset, data=piece))
            metrics.DOWNLOAD_BYTES.inc(len(adapter) + len(anchors))
        except CoordinatorError as exc:
            code = status_for(exc)
            await context.abort(code, str(exc), self._refused("DownloadGlobal", exc, context, caller))
        finally:
            if acquired:
                self._download_slots.release()
            metrics.RPC_DURATION.labels("DownloadGlobal", code.name).observe(time.perf_counter() - started)

    async def UploadUpdate(self, request_iterator: AsyncIterator[pb.UploadMessage],
                           context: grpc.aio.ServicerContext) -> pb.UploadResponse:
        caller = _Caller()

        async def body() -> pb.UploadResponse:
            device = await self._device(context, caller)  # one request per stream, however many chunks
            async with self._upload_slots:
                return await self._receive(device, request_iterator, caller)
        return await self._call("UploadUpdate", context, body, caller)

    async def _receive(self, device: Device, request_iterator: AsyncIterator[pb.UploadMessage],
                       caller: _Caller) -> pb.UploadResponse:
        session = None
        async for message in request_iterator:
            part = message.WhichOneof("part")
            if session is None:
                if part != "header":
                    raise self._uploads.malformed("the first message of an upload must be its header")
                header = upload_header_from_proto(message.header)
                caller.round_id = header.round_id
                session = await asyncio.to_thread(self._uploads.open, device, header)
                caller.round_id = session.update.round_id  # async mode may redirect it to the open buffer
            elif part == "chunk":
                await asyncio.to_thread(self._uploads.append, session, message.chunk.offset,
                                        message.chunk.data)
            else:
                raise self._uploads.malformed("an upload carries exactly one header, first")
        if session is None:
            raise self._uploads.malformed("empty upload stream: no header")
        update = await asyncio.to_thread(self._uploads.finish, session)
        offset = update.declared_size if update.state is UpdateState.ACCEPTED else session.offset
        return pb.UploadResponse(upload_id=update.upload_id, state=_UPLOAD_STATE[update.state],
                                 acknowledged_offset=offset)

    async def GetUploadStatus(self, request: pb.UploadStatusRequest,
                              context: grpc.aio.ServicerContext) -> pb.UploadStatusResponse:
        caller = _Caller()

        async def body() -> pb.UploadStatusResponse:
            device = await self._device(context, caller)
            if request.device_id and request.device_id != device.id:
                raise PermissionDeniedError("a device may query only its own uploads")
            state, offset = await self._light(
                self._uploads.status, device, request.round_id, request.upload_id)
            return pb.UploadStatusResponse(state=_UPLOAD_STATE[state], acknowledged_offset=offset)
        return await self._call("GetUploadStatus", context, body, caller)

    async def ReportMetrics(self, request: pb.ReportMetricsRequest,
                            context: grpc.aio.ServicerContext) -> pb.ReportMetricsResponse:
        caller = _Caller(round_id=request.round_id)

        async def body() -> pb.ReportMetricsResponse:
            device = await self._device(context, caller)
            _check_claim(request.device_id, device.id)
            await self._light(self._rounds.record_report, device, request.round_id, dict(request.metrics))
            return pb.ReportMetricsResponse()
        return await self._call("ReportMetrics", context, body, caller)
