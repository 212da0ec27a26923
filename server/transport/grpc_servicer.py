"""The v1 Fleet gRPC service: authenticate, convert, call a service in a worker thread, convert back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from mlecs.codec import iter_chunks
from mlecs.proto.v1 import fleet_pb2 as pb
from mlecs.proto.v1 import fleet_pb2_grpc
from server import metrics
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
                 blob_reader: Callable[[str | None, str], Any], chunk_bytes: int) -> None:
        self._devices = devices
        self._rounds = rounds
        self._uploads = uploads
        self._blob_reader = blob_reader
        self._chunk_bytes = chunk_bytes

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
        return await asyncio.to_thread(self._devices.authenticate, device_id, secret)

    async def Enrol(self, request: pb.EnrolRequest, context: grpc.aio.ServicerContext) -> pb.EnrolResponse:
        async def body() -> pb.EnrolResponse:
            try:
                enrolment = await asyncio.to_thread(
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
            device = await self._device(context)
            return pb.HeartbeatResponse(next_heartbeat_s=self._devices.heartbeat(device))
        return await self._call("Heartbeat", context, body)

    async def GetTask(self, request: pb.GetTaskRequest,
                      context: grpc.aio.ServicerContext) -> pb.GetTaskResponse:
        async def body() -> pb.GetTaskResponse:
            device = await self._device(context)
            try:
                self._devices.heartbeat(device)
            except UnavailableError as exc:  # presence is a hint; Postgres still decides the task
                log.warning("presence not recorded: %s", exc)
            return assignment_to_proto(await asyncio.to_thread(self._rounds.assignment_for, device))
        return await self._call("GetTask", context, body)

    async def DownloadGlobal(self, request: pb.DownloadGlobalRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DownloadChunk]:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            device = await self._device(context)
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
            metrics.RPC_DURATION.labels("DownloadGlobal", code.name).observe(time.perf_counter() - started)

    async def UploadUpdate(self, request_iterator: AsyncIterator[pb.UploadMessage],
                           context: grpc.aio.ServicerContext) -> pb.UploadResponse:
        async def body() -> pb.UploadResponse:
            device = await self._device(context)
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
        return await self._call("UploadUpdate", context, body)

    async def GetUploadStatus(self, request: pb.UploadStatusRequest,
                              context: grpc.aio.ServicerContext) -> pb.UploadStatusResponse:
        async def body() -> pb.UploadStatusResponse:
            device = await self._device(context)
            if request.device_id and request.device_id != device.id:
                raise PermissionDeniedError("a device may query only its own uploads")
            state, offset = await asyncio.to_thread(
                self._uploads.status, device, request.round_id, request.upload_id)
            return pb.UploadStatusResponse(state=_UPLOAD_STATE[state], acknowledged_offset=offset)
        return await self._call("GetUploadStatus", context, body)

    async def ReportMetrics(self, request: pb.ReportMetricsRequest,
                            context: grpc.aio.ServicerContext) -> pb.ReportMetricsResponse:
        async def body() -> pb.ReportMetricsResponse:
            device = await self._device(context)
            await asyncio.to_thread(self._rounds.record_report, device, request.round_id, dict(request.metrics))
            return pb.ReportMetricsResponse()
        return await self._call("ReportMetrics", context, body)
