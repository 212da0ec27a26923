"""The v1 Fleet gRPC service: authenticate, convert, call a service in a worker thread, convert back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
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
    UnauthenticatedError,
    UnavailableError,
)
from server.domain.models import Device, UpdateState
from server.services.devices import DeviceService
from server.services.rounds import RoundService
from server.services.uploads import UploadService
from server.transport.grpc_convert import (
    assignment_to_proto,
    codec_to_proto,
    modality_names,
    upload_header_from_proto,
)
from server.transport.long_poll import ChangeSignal, wait_for_change

log = logging.getLogger(__name__)
T = TypeVar("T")

_STATUS: list[tuple[type[CoordinatorError], grpc.StatusCode]] = [
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
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


class FleetServicer(fleet_pb2_grpc.FleetServicer):
    def __init__(self, devices: DeviceService, rounds: RoundService, uploads: UploadService,
                 blob_reader: Callable[[str | None, str], Any], chunk_bytes: int, *,
                 max_uploads: int = 16, max_downloads: int = 32, control_threads: int = 4,
                 changes: ChangeSignal | None = None) -> None:
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
                    body: Callable[[], Awaitable[T]]) -> T:
        """Runs one RPC body, maps domain errors to statuses once, and records its duration."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await body()
        except CoordinatorError as exc:
            code = status_for(exc)
            await context.abort(code, str(exc))
            raise  # unreachable: abort raises
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method)
            await context.abort(code, f"internal error in {method}; see coordinator logs")
            raise
        finally:
            metrics.RPC_DURATION.labels(method, code.name).observe(time.perf_counter() - started)

    async def _device(self, context: grpc.aio.ServicerContext) -> Device:
        device_id, secret = _credential(context)
        return await self._light(self._devices.authenticate, device_id, secret)

    async def Enrol(self, request: pb.EnrolRequest, context: grpc.aio.ServicerContext) -> pb.EnrolResponse:
        async def body() -> pb.EnrolResponse:
            try:
                enrolment = await self._light(
                    self._devices.enrol, request.federation, request.device_name, modality_names(request.modalities))
            except CoordinatorError:
                metrics.ENROLMENTS.labels("refused").inc()
                raise
            metrics.ENROLMENTS.labels("accepted").inc()
            return pb.EnrolResponse(device_id=enrolment.device.id, device_secret=enrolment.secret,
                                    heartbeat_interval_s=self._devices.heartbeat_interval())
        return await self._call("Enrol", context, body)

    async def Heartbeat(self, request: pb.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        async def body() -> pb.HeartbeatResponse:
            device_id, secret = _credential(context)
            # The common case does no I/O (a remembered credential, buffered presence): answered on the
            # event loop, it never queues behind task polls and transfers for a thread.
            device = self._devices.authenticate_cached(device_id, secret)
            if device is None:
                return pb.HeartbeatResponse(next_heartbeat_s=await self._light(self._beat, device_id, secret))
            if self._devices.credential_due_for_refresh(device.id):
                self._in_background(self._light(self._devices.refresh_credential, device.id))
            return pb.HeartbeatResponse(next_heartbeat_s=self._devices.heartbeat(device))
        return await self._call("Heartbeat", context, body)

    async def GetTask(self, request: pb.GetTaskRequest,
                      context: grpc.aio.ServicerContext) -> pb.GetTaskResponse:
        async def body() -> pb.GetTaskResponse:
            device_id, secret = _credential(context)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + min(request.wait_s, MAX_TASK_WAIT_S)
            while True:
                change = self._changes.current()
                assignment = await self._light(self._task, device_id, secret)
                if not isinstance(assignment, WaitAssignment) or loop.time() >= deadline:
                    return assignment_to_proto(assignment)
                if not await wait_for_change(change, deadline - loop.time()):
                    # Held for the whole wait: the device should ask again at once, not sleep first.
                    return assignment_to_proto(WaitAssignment(0, assignment.reason))
        return await self._call("GetTask", context, body)

    def _beat(self, device_id: str, secret: str) -> int:
        return self._devices.heartbeat(self._devices.authenticate(device_id, secret))

    def _task(self, device_id: str, secret: str) -> Assignment:
        device = self._devices.authenticate(device_id, secret)
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
        try:
            device = await self._device(context)
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
            await context.abort(code, str(exc))
        finally:
            if acquired:
                self._download_slots.release()
            metrics.RPC_DURATION.labels("DownloadGlobal", code.name).observe(time.perf_counter() - started)

    async def UploadUpdate(self, request_iterator: AsyncIterator[pb.UploadMessage],
                           context: grpc.aio.ServicerContext) -> pb.UploadResponse:
        async def body() -> pb.UploadResponse:
            device = await self._device(context)
            async with self._upload_slots:
                return await self._receive(device, request_iterator)
        return await self._call("UploadUpdate", context, body)

    async def _receive(self, device: Device, request_iterator: AsyncIterator[pb.UploadMessage]) -> pb.UploadResponse:
        session = None
        async for message in request_iterator:
            part = message.WhichOneof("part")
            if session is None:
                if part != "header":
                    raise InvalidRequestError("the first message of an upload must be its header")
                header = upload_header_from_proto(message.header)
                session = await asyncio.to_thread(self._uploads.open, device, header)
            elif part == "chunk":
                await asyncio.to_thread(self._uploads.append, session, message.chunk.offset,
                                        message.chunk.data)
            else:
                raise InvalidRequestError("an upload carries exactly one header, first")
        if session is None:
            raise InvalidRequestError("empty upload stream")
        update = await asyncio.to_thread(self._uploads.finish, session)
        offset = update.declared_size if update.state is UpdateState.ACCEPTED else session.offset
        return pb.UploadResponse(upload_id=update.upload_id, state=_UPLOAD_STATE[update.state],
                                 acknowledged_offset=offset)

    async def GetUploadStatus(self, request: pb.UploadStatusRequest,
                              context: grpc.aio.ServicerContext) -> pb.UploadStatusResponse:
        async def body() -> pb.UploadStatusResponse:
            device = await self._device(context)
            if request.device_id and request.device_id != device.id:
                raise PermissionDeniedError("a device may query only its own uploads")
            state, offset = await self._light(
                self._uploads.status, device, request.round_id, request.upload_id)
            return pb.UploadStatusResponse(state=_UPLOAD_STATE[state], acknowledged_offset=offset)
        return await self._call("GetUploadStatus", context, body)

    async def ReportMetrics(self, request: pb.ReportMetricsRequest,
                            context: grpc.aio.ServicerContext) -> pb.ReportMetricsResponse:
        async def body() -> pb.ReportMetricsResponse:
            device = await self._device(context)
            await self._light(self._rounds.record_report, device, request.round_id, dict(request.metrics))
            return pb.ReportMetricsResponse()
        return await self._call("ReportMetrics", context, body)
