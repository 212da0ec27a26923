"""The agent's gRPC transport to the coordinator. Protobuf does not leave this module."""

from __future__ import annotations

import json
import threading
import time

import grpc

from edge_agent.config import TlsMaterial
from edge_agent.errors import AgentError, CoordinatorUnavailable, CredentialRejected, RequestRefused
from edge_agent.tasks import GlobalVersion, PublicCopyCheck, PublicShard, Stop, TrainTask, UploadRequest, Wait
from mlecs import wire
from mlecs.datasets.public_shard import MAX_SHARD_BYTES, SampleFingerprint
from mlecs.endpoints import with_port
from mlecs.proto.v1 import fleet_pb2 as pb
from mlecs.proto.v1 import fleet_pb2_grpc

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.ABORTED}
_HEARTBEAT_FALLBACK = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED}
"""Failures of the heartbeat port after which the beat is sent to the coordinator's address instead."""
AGENT_VERSION = "0.3.0"
"""What the agent tells the coordinator at enrolment: the wire features it speaks (0.2: modality names;
0.3: public shards and copy checks)."""
TASK_WAIT_S = 10
"""How long a task poll may be held by the coordinator (also bounds how long SIGTERM waits for it)."""
_UPLOAD_STATE = {pb.UPLOAD_STATE_PARTIAL: "partial", pb.UPLOAD_STATE_ACCEPTED: "accepted",
                 pb.UPLOAD_STATE_REJECTED: "rejected"}


def translate(exc: grpc.RpcError) -> AgentError:
    """Maps a gRPC failure to the agent's error tree, once, at this boundary."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    message = f"{code.name}: {detail}"
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (detail or ""):
        return RequestRefused(message)  # gRPC's message size limit: the same message fails every time
    if code in _RETRYABLE:
        return CoordinatorUnavailable(message, retry_after_s=_retry_after_s(exc))
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return CredentialRejected(message)
    # PERMISSION_DENIED (revoked, not invited, acting as another device) is not cured by enrolling again.
    return RequestRefused(message)


def _retry_after_s(exc: grpc.RpcError) -> float:
    """The coordinator's ``retry-after-ms`` hint (sent with RESOURCE_EXHAUSTED when over the rate limit), or 0."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == "retry-after-ms":
            try:
                return max(0.0, min(float(value) / 1000, 300.0))
            except (TypeError, ValueError):
                return 0.0
    return 0.0


class CoordinatorClient:
    """The coordinator over gRPC: mutual TLS with ``tls`` (this device's certificate), plaintext without."""

    def __init__(self, address: str, timeout_s: float = 30.0, max_message_bytes: int = 8 * 1024 * 1024,
                 task_wait_s: int = TASK_WAIT_S, tls: TlsMaterial | None = None) -> None:
        options: list[tuple[str, str | int]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # With several replica addresses, spread calls and skip a replica that is down.
            ("grpc.lb_policy_name", "round_robin"),
            # Reconnect attempts at most 2 s apart (gRPC's default grows to 2 minutes): a coordinator back
            # from a restart is found within about a second (``wait_until_reachable``).
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if tls is not None and tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        self._address = address
        self._options = options
        self._credentials = None if tls is None else grpc.ssl_channel_credentials(tls.ca_pem, tls.key_pem,
                                                                                 tls.cert_pem)
        self._channel = self._open(address)
        self._stub = fleet_pb2_grpc.FleetStub(self._channel)
        # Counts the times the connection became ready: a retry waits for the next one (the coordinator back).
        self._reconnected = threading.Condition()
        self._ready_count = 0
        self._channel.subscribe(self._on_connectivity, try_to_connect=True)
        # Heartbeats go where the coordinator says (a port of their own, apart from transfers), on a
        # connection of their own: a heartbeat must not queue behind this device's upload either.
        self._heartbeat_port = 0
        self._heartbeat_channel: grpc.Channel | None = None
        self._heartbeat_stub: fleet_pb2_grpc.FleetStub | None = None
        self._timeout = timeout_s
        self._task_wait_s = max(0, min(task_wait_s, int(timeout_s) - 5))
        self._metadata: tuple[tuple[str, str], ...] = ()

    def _open(self, target: str) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(target, options=self._options)
        return grpc.secure_channel(target, self._credentials, options=self._options)

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY:
            with self._reconnected:
                self._ready_count += 1
                self._reconnected.notify_all()

    def wait_until_reachable(self, timeout_s: float, stop: threading.Event) -> None:
        """Waits before retrying a call the coordinator could not serve: ``timeout_s``, or less when the
        connection comes back meanwhile (a restarted coordinator is retried as soon as it listens; one that
        answered "unavailable" over a live connection is given the whole wait). Returns when ``stop`` is set."""
        deadline = time.monotonic() + timeout_s
        with self._reconnected:
            seen = self._ready_count
            while not stop.is_set() and self._ready_count == seen and (left := deadline - time.monotonic()) > 0:
                self._reconnected.wait(min(left, 0.1))

    def close(self) -> None:
        self._channel.unsubscribe(self._on_connectivity)
        self._channel.close()
        if self._heartbeat_channel is not None:
            self._heartbeat_channel.close()

    def _use_heartbeat_port(self, port: int) -> None:
        """Sends later heartbeats to ``port`` on the coordinator's host(s) (0: the coordinator's address)."""
        if port == self._heartbeat_port:
            return
        if self._heartbeat_channel is not None:
            self._heartbeat_channel.close()
        self._heartbeat_channel = self._heartbeat_stub = None
        self._heartbeat_port = port
        target = with_port(self._address, port) if port else None
        if target is not None:
            self._heartbeat_channel = self._open(target)
            self._heartbeat_stub = fleet_pb2_grpc.FleetStub(self._heartbeat_channel)

    def authenticate(self, device_id: str, secret: str) -> None:
        self._metadata = wire.credential(device_id, secret)

    def enrol(self, federation: str, device_name: str, modalities: list[str],
              enrolment_token: str = "") -> tuple[str, str, int]:
        """Returns (device id, secret, heartbeat interval)."""
        try:
            reply = self._stub.Enrol(wire.enrol_request(federation, device_name, modalities,
                                                        enrolment_token=enrolment_token, agent_version=AGENT_VERSION),
                                     timeout=self._timeout)
        except grpc.RpcError as exc:
            raise translate(exc) from exc
        self._use_heartbeat_port(reply.heartbeat_port)
        return reply.device_id, reply.device_secret, reply.heartbeat_interval_s

    def heartbeat(self, device_id: str) -> int:
        """One heartbeat; returns the interval to the next. Sent to the heartbeat port the coordinator named,
        or to its address when it named none or that port does not answer (its reply names the port again)."""
        request = pb.HeartbeatRequest(device_id=device_id)
        reply = None
        if self._heartbeat_stub is not None:
            try:
                reply = self._heartbeat_stub.Heartbeat(request, timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() not in _HEARTBEAT_FALLBACK:
                    raise translate(exc) from exc
        if reply is None:
            try:
                reply = self._stub.Heartbeat(request, timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                raise translate(exc) from exc
        self._use_heartbeat_port(reply.heartbeat_port)
        return reply.next_heartbeat_s

    def get_task(self, device_id: str) -> TrainTask | Wait | Stop:
        try:
            # Long poll: the coordinator answers as soon as a round opens, or after wait_s with "ask again".
            reply = self._stub.GetTask(pb.GetTaskRequest(device_id=device_id, wait_s=self._task_wait_s),
                                       timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise translate(exc) from exc
        kind = reply.WhichOneof("task")
        if kind == "train":
            t, c = reply.train, reply.train.config
            return TrainTask(
                round_id=t.round_id, round_number=t.round_number, version_id=t.global_version_id,
                public_epochs=c.public_epochs, private_epochs=c.private_epochs, batch_size=c.batch_size,
                learning_rate=c.learning_rate, upload_codec=wire.CODEC_NAME.get(c.upload_codec, "fp16"),
                max_chunk_bytes=c.max_chunk_bytes or 256 * 1024, seed=c.seed,
                model=json.loads(c.model_config_json or "{}"),
                ccl_weight=c.ccl_weight, ccl_temperature=c.ccl_temperature or 0.1,
                seccl_weight=c.seccl_weight, seccl_temperature=c.seccl_temperature or 0.1,
                fused_upload_samples=c.fused_upload_samples,
                upload_stage="public" if c.upload_stage == pb.UPLOAD_STAGE_PUBLIC else "private",
                personal_epochs=c.personal_epochs)
        if kind == "stop":
            return Stop(reply.stop.reason)
        return Wait(max(reply.wait.retry_after_s, 0), reply.wait.reason)

    def download_global(self, device_id: str, version_id: str = "") -> GlobalVersion:
        """Downloads a global version; checks sizes and sha256 before returning it."""
        import hashlib

        adapter, anchors = bytearray(), bytearray()
        header = None
        try:
            for message in self._stub.DownloadGlobal(
                    pb.DownloadGlobalRequest(device_id=device_id, version_id=version_id),
                    timeout=self._timeout * 4, metadata=self._metadata):
                if message.WhichOneof("part") == "header":
                    header = message.header
                    continue
                target = adapter if message.chunk.kind == pb.BLOB_KIND_ADAPTER else anchors
                if message.chunk.offset != len(target):
                    raise RequestRefused("download chunks arrived out of order")
                target.extend(message.chunk.data)
        except grpc.RpcError as exc:
            raise translate(exc) from exc
        if header is None:
            raise RequestRefused("download stream carried no header")
        if len(adapter) != header.adapter_size or hashlib.sha256(adapter).hexdigest() != header.adapter_sha256:
            raise CoordinatorUnavailable("global adapter arrived incomplete or corrupted; retrying")
        if len(anchors) != header.anchors_size or (
                anchors and hashlib.sha256(anchors).hexdigest() != header.anchors_sha256):
            raise CoordinatorUnavailable("anchors arrived incomplete or corrupted; retrying")
        return GlobalVersion(header.version_id, header.round_number, bytes(adapter), bytes(anchors))

    def download_public_shard(self, device_id: str, cached_sha256: str = "") -> PublicShard:
        """This device's public shard; checks its size and sha256. A coordinator that predates public shards
        answers as one that holds none."""
        import hashlib

        archive = bytearray()
        header = None
        try:
            for message in self._stub.DownloadPublicShard(
                    pb.PublicShardRequest(device_id=device_id, cached_sha256=cached_sha256),
                    timeout=self._timeout * 4, metadata=self._metadata):
                if message.WhichOneof("part") == "header":
                    header = message.header
                    if header.size > MAX_SHARD_BYTES:
                        raise RequestRefused(f"the public shard is {header.size} bytes, over the {MAX_SHARD_BYTES} "
                                             "an agent accepts")
                    continue
                if message.chunk.offset != len(archive):
                    raise RequestRefused("public shard chunks arrived out of order")
                archive.extend(message.chunk.data)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                return PublicShard(held=False)
            raise translate(exc) from exc
        if header is None:
            raise RequestRefused("public shard stream carried no header")
        if not header.held:
            return PublicShard(held=False)
        if header.unchanged:
            return PublicShard(True, header.sha256, header.samples, None)
        if len(archive) != header.size or hashlib.sha256(archive).hexdigest() != header.sha256:
            raise CoordinatorUnavailable("public shard arrived incomplete or corrupted; retrying")
        return PublicShard(True, header.sha256, header.samples, bytes(archive))

    def verify_public_copy(self, device_id: str, samples: list[SampleFingerprint]) -> PublicCopyCheck:
        """The coordinator's check of this device's own public-set copy, sent in batches of 5,000 samples."""
        verified, mismatches = 0, list[tuple[str, str]]()
        for start in range(0, max(len(samples), 1), 5000):
            request = pb.VerifyPublicCopyRequest(device_id=device_id, samples=[
                pb.PublicSampleDigest(id=s.id, label=s.label, file_sha256=dict(s.files))
                for s in samples[start:start + 5000]])
            try:
                reply = self._stub.VerifyPublicCopy(request, timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                    return PublicCopyCheck(held=False)
                raise translate(exc) from exc
            if not reply.held:
                return PublicCopyCheck(held=False)
            verified += reply.verified
            mismatches.extend((m.id, m.reason) for m in reply.mismatches)
        return PublicCopyCheck(True, verified, mismatches)

    def upload_status(self, device_id: str, round_id: str, upload_id: str) -> tuple[str, int]:
        try:
            reply = self._stub.GetUploadStatus(pb.UploadStatusRequest(
                device_id=device_id, round_id=round_id, upload_id=upload_id),
                timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise translate(exc) from exc
        return _UPLOAD_STATE.get(reply.state, "partial"), reply.acknowledged_offset

    def upload(self, request: UploadRequest, payload: bytes, resume_offset: int, chunk_bytes: int) -> tuple[str, int]:
        """Streams ``payload[resume_offset:]``; returns (state, acknowledged offset)."""
        header = wire.upload_header(
            round_id=request.round_id, device_id=request.device_id, upload_id=request.upload_id,
            codec=request.codec, total_size=len(payload), sha256=request.sha256, modalities=request.modalities,
            public_samples=request.public_samples, private_samples=request.private_samples,
            resume_offset=resume_offset, base_version_id=request.base_version_id, metrics=request.metrics,
            fused_sample_ids=request.fused_sample_ids)
        try:
            reply = self._stub.UploadUpdate(wire.upload_messages(header, payload, chunk_bytes),
                                            timeout=self._timeout * 4, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise translate(exc) from exc
        return _UPLOAD_STATE.get(reply.state, "partial"), reply.acknowledged_offset

    def report_metrics(self, device_id: str, round_id: str, metrics: dict[str, float]) -> None:
        try:
            self._stub.ReportMetrics(pb.ReportMetricsRequest(device_id=device_id, round_id=round_id,
                                                             metrics=metrics),
                                     timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise translate(exc) from exc
