"""The v1 Fleet gRPC service: authenticate, convert, call a service in a worker thread, convert back."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import message_factory

from mlecs.codec import iter_chunks
from mlecs.proto.v1 import fleet_pb2 as pb
from mlecs.proto.v1 import fleet_pb2_grpc
from server import metrics
from server.domain.assignments import Assignment, WaitAssignment
from server.domain.errors import (
    CoordinatorError,
    IdleStreamError,
    PermissionDeniedError,
    ResourceLimitError,
    UnavailableError,
)
from server.domain.models import Device, UpdateState
from server.services.devices import DeviceService
from server.services.public_set import PublicSetService
from server.services.rate_limits import TokenBucketLimiter
from server.services.refusals import RefusalRecorder
from server.services.rounds import RoundService
from server.services.uploads import UploadService
from server.transport.grpc_convert import (
    assignment_to_proto,
    codec_to_proto,
    copy_check_to_proto,
    fingerprints_from_proto,
    requested_modalities,
    upload_header_from_proto,
)
from server.transport.grpc_heartbeat import (
    FLEET_SERVICE,
    Caller,
    HeartbeatServicer,
    MalformedMessage,
    check_claim,
    peer_host,
    status_for,
    tolerant_deserializer,
)
from server.transport.long_poll import ChangeSignal, wait_for_change

log = logging.getLogger(__name__)
MAX_TASK_WAIT_S = 30
"""The longest a GetTask long poll is held, whatever the device asks for."""
ENCODED_VERSIONS = 4
"""Global versions whose download streams are kept encoded: the current one and the few before it."""
_UPLOAD_STATE = {UpdateState.PARTIAL: pb.UPLOAD_STATE_PARTIAL, UpdateState.ACCEPTED: pb.UPLOAD_STATE_ACCEPTED,
                 UpdateState.REJECTED: pb.UPLOAD_STATE_REJECTED}


class FleetServicer(HeartbeatServicer, fleet_pb2_grpc.FleetServicer):
    """The whole v1 Fleet service: enrolment, heartbeats (``HeartbeatServicer``), tasks and transfers."""

    def __init__(self, devices: DeviceService, rounds: RoundService, uploads: UploadService,
                 blob_reader: Callable[[str | None, str], Any], chunk_bytes: int, *,
                 max_uploads: int = 16, max_downloads: int = 32, control_threads: int = 4,
                 max_upload_streams_per_device: int = 2, upload_idle_timeout_s: float = 30.0,
                 changes: ChangeSignal | None = None, limiter: TokenBucketLimiter | None = None,
                 refusals: RefusalRecorder | None = None, mtls: bool = False, heartbeat_port: int = 0,
                 failed_auth_limiter: TokenBucketLimiter | None = None,
                 public_set: PublicSetService | None = None) -> None:
        """``public_set``: None serves no public shards (every device is told the coordinator holds none)."""
        super().__init__(devices, control_threads=control_threads, limiter=limiter, refusals=refusals, mtls=mtls,
                         heartbeat_port=heartbeat_port, failed_auth_limiter=failed_auth_limiter)
        self._rounds = rounds
        self._uploads = uploads
        self._blob_reader = blob_reader
        self._public_set = public_set
        self._chunk_bytes = chunk_bytes
        # Bounded transfers bound memory: each one in flight holds its chunks and, for uploads, a decoded
        # copy during validation. Streams beyond the bound wait (and gRPC flow control holds the senders).
        self._upload_slots = asyncio.Semaphore(max_uploads)
        # Streams per device, counted from authentication on: one device cannot hold every slot, and a stream
        # that sends nothing is closed after the idle timeout, header or not.
        self._upload_streams: Counter[str] = Counter()
        self._max_streams_per_device = max_upload_streams_per_device
        self._upload_idle_s = upload_idle_timeout_s
        self._download_slots = asyncio.Semaphore(max_downloads)
        self._changes = changes or ChangeSignal()
        # A whole fleet downloads the same version at the start of a round, and its stream is the same for
        # every device: encoded once, it is sent as bytes, without a protobuf copy per device and chunk.
        self._encoded: OrderedDict[str, tuple[int, list[bytes]]] = OrderedDict()
        self._encoded_guard = threading.Lock()

    async def Enrol(self, request: pb.EnrolRequest, context: grpc.aio.ServicerContext) -> pb.EnrolResponse:
        async def body() -> pb.EnrolResponse:
            # No identity yet: the limit is per name asked for (not per address, which a fleet behind NAT shares).
            self.check_failed_authentications(peer_host(context))  # every enrolment reads the database
            self._limiter.check(("Enrol", request.federation, request.device_name),
                                f"enrolment of {request.device_name[:128]!r} in {request.federation[:128]!r}")
            try:
                enrolment = await self._light(
                    self._devices.enrol, request.federation, request.device_name, requested_modalities(request),
                    request.enrolment_token, self._certificate_name(context))
            except CoordinatorError:
                metrics.ENROLMENTS.labels("refused").inc()
                raise
            metrics.ENROLMENTS.labels("accepted").inc()
            return pb.EnrolResponse(device_id=enrolment.device.id, device_secret=enrolment.secret,
                                    heartbeat_interval_s=self._devices.heartbeat_interval(),
                                    heartbeat_port=self.heartbeat_port)
        return await self._call("Enrol", context, body)

    async def GetTask(self, request: pb.GetTaskRequest,
                      context: grpc.aio.ServicerContext) -> pb.GetTaskResponse:
        caller = Caller()

        async def body() -> pb.GetTaskResponse:
            device_id, secret, certificate = self._claimed(context, request.device_id, caller)
            host = peer_host(context)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + min(request.wait_s, MAX_TASK_WAIT_S)
            admit: Caller | None = caller  # one poll is one request, however often a held one looks again
            while True:
                change = self._changes.current()
                assignment = await self._light(self._task, device_id, secret, admit, certificate, host)
                admit = None
                if not isinstance(assignment, WaitAssignment) or loop.time() >= deadline:
                    return assignment_to_proto(assignment)
                if not await wait_for_change(change, deadline - loop.time()):
                    # Held for the whole wait: the device should ask again at once, not sleep first.
                    return assignment_to_proto(WaitAssignment(0, assignment.reason))
        return await self._call("GetTask", context, body, caller)

    def _task(self, device_id: str, secret: str, admit: Caller | None, certificate: str | None,
              host: str) -> Assignment:
        """The device's assignment; ``admit``: take a request from its rate limit first (the first look)."""
        device = self._authenticate(device_id, secret, certificate, host)
        if admit is not None:
            self._admit(device, admit)
        try:
            self._devices.heartbeat(device)
        except UnavailableError as exc:  # presence is a hint; Postgres still decides the task
            log.warning("presence not recorded: %s", exc)
        return self._rounds.assignment_for(device)

    async def DownloadGlobal(self, request: pb.DownloadGlobalRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        acquired = False
        caller = Caller()
        try:
            if isinstance(request, MalformedMessage):
                raise request.refusal()
            device = await self._device(context, caller)
            check_claim(request.device_id, device.id)
            await self._download_slots.acquire()
            acquired = True
            size, messages = await asyncio.to_thread(self._download_stream, request.version_id or None,
                                                     device.federation_id)
            for message in messages:
                yield message
            metrics.DOWNLOAD_BYTES.inc(size)
        except CoordinatorError as exc:
            code = status_for(exc)
            await context.abort(code, str(exc), self._refused("DownloadGlobal", exc, context, caller))
        finally:
            if acquired:
                self._download_slots.release()
            metrics.RPC_DURATION.labels("DownloadGlobal", code.name).observe(time.perf_counter() - started)

    def _download_stream(self, version_id: str | None, federation_id: str) -> tuple[int, list[bytes]]:
        """The encoded DownloadChunk messages of a version (header, adapter, anchors) and its blob bytes."""
        version, adapter, anchors = self._blob_reader(version_id, federation_id)  # checks it is the device's
        with self._encoded_guard:
            if version.id in self._encoded:
                self._encoded.move_to_end(version.id)
                return self._encoded[version.id]
        messages = [pb.DownloadChunk(header=pb.DownloadHeader(
            version_id=version.id, round_number=version.round_number, codec=codec_to_proto(version.codec),
            adapter_size=len(adapter), adapter_sha256=version.adapter_sha256,
            anchors_size=len(anchors), anchors_sha256=version.anchors_sha256 or "")).SerializeToString()]
        for kind, data in ((pb.BLOB_KIND_ADAPTER, adapter), (pb.BLOB_KIND_ANCHORS, anchors)):
            for offset, piece in iter_chunks(data, self._chunk_bytes) if data else ():
                messages.append(pb.DownloadChunk(chunk=pb.BlobChunk(kind=kind, offset=offset, data=piece))
                                .SerializeToString())
        stream = (len(adapter) + len(anchors), messages)
        with self._encoded_guard:
            self._encoded[version.id] = stream
            while len(self._encoded) > ENCODED_VERSIONS:
                self._encoded.popitem(last=False)
        return stream

    async def DownloadPublicShard(self, request: pb.PublicShardRequest,
                                  context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PublicShardChunk]:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        acquired = False
        caller = Caller()
        try:
            if isinstance(request, MalformedMessage):
                raise request.refusal()
            device = await self._device(context, caller)
            check_claim(request.device_id, device.id)
            await self._download_slots.acquire()
            acquired = True
            shard = None if self._public_set is None else await asyncio.to_thread(self._public_set.shard_for, device)
            if shard is None:
                yield pb.PublicShardChunk(header=pb.PublicShardHeader(held=False))
                return
            unchanged = request.cached_sha256 == shard.sha256
            yield pb.PublicShardChunk(header=pb.PublicShardHeader(
                held=True, sha256=shard.sha256, size=len(shard.archive), samples=shard.samples, unchanged=unchanged))
            if not unchanged:
                for offset, piece in iter_chunks(shard.archive, self._chunk_bytes):
                    yield pb.PublicShardChunk(chunk=pb.BlobChunk(kind=pb.BLOB_KIND_PUBLIC_SHARD, offset=offset,
                                                                 data=piece))
                metrics.PUBLIC_SHARD_BYTES.inc(len(shard.archive))
        except CoordinatorError as exc:
            code = status_for(exc)
            await context.abort(code, str(exc), self._refused("DownloadPublicShard", exc, context, caller))
        finally:
            if acquired:
                self._download_slots.release()
            metrics.RPC_DURATION.labels("DownloadPublicShard", code.name).observe(time.perf_counter() - started)

    async def VerifyPublicCopy(self, request: pb.VerifyPublicCopyRequest,
                               context: grpc.aio.ServicerContext) -> pb.VerifyPublicCopyResponse:
        caller = Caller()

        async def body() -> pb.VerifyPublicCopyResponse:
            device = await self._device(context, caller)
            check_claim(request.device_id, device.id)
            if self._public_set is None:
                return copy_check_to_proto(None)
            check = await asyncio.to_thread(self._public_set.verify_copy, device, fingerprints_from_proto(request))
            return copy_check_to_proto(check)
        return await self._call("VerifyPublicCopy", context, body, caller)

    async def UploadUpdate(self, request_iterator: AsyncIterator[pb.UploadMessage],
                           context: grpc.aio.ServicerContext) -> pb.UploadResponse:
        caller = Caller()

        async def body() -> pb.UploadResponse:
            device = await self._device(context, caller)  # one request per stream, however many chunks
            if self._upload_streams[device.id] >= self._max_streams_per_device:
                raise ResourceLimitError(
                    "upload_streams", f"device {device.id} already has {self._upload_streams[device.id]} upload "
                    f"stream(s) open, the most one device may (max_upload_streams_per_device)", retry_after_s=5.0)
            self._upload_streams[device.id] += 1
            metrics.UPLOAD_STREAMS.inc()
            try:
                return await self._receive(device, request_iterator.__aiter__(), caller)
            finally:
                metrics.UPLOAD_STREAMS.dec()
                self._upload_streams[device.id] -= 1
                if not self._upload_streams[device.id]:
                    del self._upload_streams[device.id]
        return await self._call("UploadUpdate", context, body, caller)

    async def _next(self, messages: AsyncIterator[Any]) -> Any:
        """The stream's next message (None at its end), within the idle timeout."""
        try:
            return await asyncio.wait_for(anext(messages), self._upload_idle_s)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise IdleStreamError(f"the upload stream sent nothing for {self._upload_idle_s:g} s and was closed; "
                                  "resume it from the acknowledged offset") from None

    async def _receive(self, device: Device, messages: AsyncIterator[Any], caller: Caller) -> pb.UploadResponse:
        first = await self._next(messages)
        if first is None:
            raise self._uploads.malformed("empty upload stream: no header")
        if isinstance(first, MalformedMessage):
            raise self._uploads.malformed(first.refusal().args[0])
        if first.WhichOneof("part") != "header":
            raise self._uploads.malformed("the first message of an upload must be its header")
        header = upload_header_from_proto(first.header)
        caller.round_id = header.round_id
        # A slot is taken only once the header is in: a stream that sends nothing holds none.
        async with self._upload_slots:
            session = await asyncio.to_thread(self._uploads.open, device, header)
            caller.round_id = session.update.round_id  # async mode may redirect it to the open buffer
            while (message := await self._next(messages)) is not None:
                if isinstance(message, MalformedMessage):
                    raise self._uploads.malformed(message.refusal().args[0])
                if message.WhichOneof("part") != "chunk":
                    raise self._uploads.malformed("an upload carries exactly one header, first")
                await asyncio.to_thread(self._uploads.append, session, message.chunk.offset, message.chunk.data)
            update = await asyncio.to_thread(self._uploads.finish, session)
        offset = update.declared_size if update.state is UpdateState.ACCEPTED else session.offset
        return pb.UploadResponse(upload_id=update.upload_id, state=_UPLOAD_STATE[update.state],
                                 acknowledged_offset=offset)

    async def GetUploadStatus(self, request: pb.UploadStatusRequest,
                              context: grpc.aio.ServicerContext) -> pb.UploadStatusResponse:
        caller = Caller()

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
        caller = Caller(round_id=request.round_id)

        async def body() -> pb.ReportMetricsResponse:
            device = await self._device(context, caller)
            check_claim(request.device_id, device.id)
            await self._light(self._rounds.record_report, device, request.round_id, dict(request.metrics))
            return pb.ReportMetricsResponse()
        return await self._call("ReportMetrics", context, body, caller)


_HANDLERS = {  # (client streams, server streams) -> the grpc handler kind
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _serialize(message: Any) -> bytes:
    """A response message's wire bytes; a response already encoded (a cached download chunk) goes as it is."""
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())


def add_fleet_service(servicer: FleetServicer, server: grpc.aio.Server) -> None:
    """Serves every method of ``mlecs.v1.Fleet`` on ``server``, as the generated ``add_FleetServicer_to_server``
    does, except that responses may also be already encoded messages (``bytes``). The handler table is built
    from the proto's descriptor, so it cannot drift from the contract."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Fleet"].methods:
        streams = (method.client_streaming, method.server_streaming)
        request = message_factory.GetMessageClass(method.input_type)
        handler = getattr(servicer, method.name)
        if streams == (False, False):
            handler = servicer.refusing_malformed(method.name, handler)
        # Streaming methods check each message themselves (a ``MalformedMessage`` where a message should be).
        handlers[method.name] = _HANDLERS[streams](handler, request_deserializer=tolerant_deserializer(request),
                                                   response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(FLEET_SERVICE, handlers),))
    server.add_registered_method_handlers(FLEET_SERVICE, handlers)
