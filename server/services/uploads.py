"""Receiving updates: resumable staging, validation, and durable acceptance.

An update is acknowledged as accepted only after its bytes are in the content store and its row says
ACCEPTED; until then the device can resume from ``staged_size`` (the acknowledged offset).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from mlecs.aggregation.robust import AggregationError, update_norm
from mlecs.codec import (
    MAX_HEADER_BYTES,
    CodecError,
    CodecKind,
    NonFiniteValuesError,
    decode_tensors,
    peek_header,
    sha256_hex,
)
from mlecs.tensor_names import FUSED_TENSOR, owning_modality
from server import metrics
from server.domain.errors import (
    AlreadyAcceptedError,
    ConflictError,
    InvalidRequestError,
    LateUpdateError,
    NotFoundError,
    PermissionDeniedError,
    ResourceLimitError,
    UpdateRejectedError,
)
from server.domain.models import (
    Device,
    FederationConfig,
    Round,
    Update,
    UpdateState,
    reported_metrics_problem,
    utcnow,
)
from server.domain.scheduling import could_close
from server.learning.global_model import adapter_schema, client_agreements, fused_dim
from server.services import staging
from server.services.aggregation import RoundAccumulators, version_staleness
from server.services.context import ServiceContext
from server.services.locks import RoundLocks
from server.services.rounds import RoundService

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_UPLOAD_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_PRECISION = {CodecKind.INT8.value: 0, CodecKind.FP16.value: 1, CodecKind.FP32.value: 2}
"""Codecs by precision: an update may use the federation's upload codec or a more precise one."""


@dataclass(frozen=True)
class UploadHeader:
    round_id: str
    device_id: str
    upload_id: str
    codec: str
    total_size: int
    sha256: str
    modalities: frozenset[str]
    public_samples: int
    private_samples: int
    resume_offset: int
    base_version_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    fused_sample_ids: list[int] = field(default_factory=list)


@dataclass
class UploadSession:
    update: Update
    offset: int
    federation_id: str | None = None
    """Known when the upload was opened in this stream; a resumed one looks it up when it completes."""


@lru_cache(maxsize=16)
def _schema(model_key: str) -> dict[str, tuple[int, ...]]:
    return adapter_schema(json.loads(model_key))


HEADER_BYTES_PER_TENSOR = 512
"""Bytes an update's codec header may spend per tensor the schema has: an entry of a long name and four
dimensions takes about 150."""
MAX_SAMPLE_COUNT = 2**31 - 1
"""The most samples an upload may report per kind: what the database's integer columns hold."""


class UploadService:
    def __init__(self, ctx: ServiceContext, locks: RoundLocks,
                 on_accepted: Callable[[str], None] = lambda round_id: None,
                 accumulators: RoundAccumulators | None = None) -> None:
        self._ctx = ctx
        self._locks = locks
        self._accumulators = accumulators or RoundAccumulators()
        self._on_accepted = on_accepted
        self._anchor_guard = threading.Lock()
        self._anchor_cache: dict[str, dict[str, np.ndarray]] = {}
        # A federation's config never changes once stored: remembering it spares every upload three reads.
        self._configs: dict[str, FederationConfig] = {}

    def open(self, device: Device, header: UploadHeader) -> UploadSession:
        """Starts or resumes an upload; returns the session and the offset the bytes must continue from."""
        store = self._ctx.store
        if header.device_id != device.id:
            raise PermissionDeniedError("a device may upload only as itself")
        if not _UPLOAD_ID.match(header.upload_id):
            raise InvalidRequestError("upload_id must be 8-64 characters of letters, digits, '-' or '_'")
        # The upload id is the idempotency key: a retry finds its update in whichever round it landed.
        view = store.upload_view(device.id, header.upload_id, header.round_id)
        if view.existing is not None:
            return self._resume(view.existing, header)
        round_ = self._target_round(device, header.round_id, view.round)
        config = self._config(round_.federation_id)
        self._check_header(header)
        self._check_modalities(device, header.modalities)
        self._check_codec(config, header.codec)
        self._check_base(config, round_, header.base_version_id)
        limit = config.fused_upload_samples
        if len(header.fused_sample_ids) > limit or len(set(header.fused_sample_ids)) != len(header.fused_sample_ids):
            raise InvalidRequestError(f"fused_sample_ids must be at most {limit} distinct public sample ids")
        if header.resume_offset != 0:
            raise InvalidRequestError("a new upload must start at offset 0")
        self._make_room(device, round_, header.total_size)
        update = Update(
            round_id=round_.id, device_id=device.id, upload_id=header.upload_id, codec=header.codec,
            declared_size=header.total_size, sha256=header.sha256, modalities=header.modalities,
            public_samples=header.public_samples, private_samples=header.private_samples,
            base_version_id=header.base_version_id, metrics=dict(header.metrics),
            fused_sample_ids=list(header.fused_sample_ids),
        )
        try:
            store.add_update(update)
        except AlreadyAcceptedError:
            raise AlreadyAcceptedError(f"an update from this device for round {round_.number} was already "
                                       "accepted") from None
        if not store.get_round(round_.id).state.accepts_uploads:
            # The round closed between the check above and the row: its expiry may have missed the row.
            staging.retire(self._ctx, update, "expired")
            raise LateUpdateError(f"round {round_.number} closed while the upload started; take the next task")
        return UploadSession(update=update, offset=0, federation_id=round_.federation_id)

    def _make_room(self, device: Device, round_: Round, size: int) -> None:
        """Bounds what unfinished uploads hold: a device keeps at most ``max_partial_uploads_per_device`` in a
        round (a new one retires its oldest), and this replica stages at most ``max_staged_bytes``."""
        settings = self._ctx.settings
        partials = self._ctx.store.device_partials(round_.id, device.id)
        for oldest in partials[:max(0, len(partials) - settings.max_partial_uploads_per_device + 1)]:
            staging.retire(self._ctx, oldest, "superseded")
        staged, limit = self._ctx.blobs.staged_bytes(), settings.max_staged_bytes
        if staged + size > limit:
            self._count_rejection("staging_full")
            raise ResourceLimitError(
                "staging_full", f"the coordinator is staging {staged} bytes of unfinished uploads; {size} more "
                f"would pass its limit of {limit} (max_staged_bytes): retry later", retry_after_s=30.0)

    def _target_round(self, device: Device, round_id: str, named: Round | None) -> Round:
        """The round an update for ``round_id`` (``named``, as read) goes to: that round, or in async mode
        the open buffer."""
        store = self._ctx.store
        if named is None:
            raise NotFoundError(f"round {round_id!r} not found")
        round_ = named
        if round_.federation_id != device.federation_id:
            raise PermissionDeniedError(f"device was not invited to round {round_.number}")
        federation_id = round_.federation_id
        config = self._config(federation_id)
        if not round_.state.accepts_uploads and config.mode == "async":
            latest = store.latest_round(federation_id)
            if latest is not None and latest.state.accepts_uploads:
                round_ = latest  # the buffer the device trained for closed: the open one takes the update
        if not RoundService.may_contribute(config, round_, device):
            raise PermissionDeniedError(f"device was not invited to round {round_.number}")
        if not round_.state.accepts_uploads:
            self._count_rejection("late")
            raise LateUpdateError(f"round {round_.number} is {round_.state}: the update arrived too late and "
                                  "was not counted; take the next task")
        return round_

    def _config(self, federation_id: str) -> FederationConfig:
        config = self._configs.get(federation_id)
        if config is None:
            config = self._configs[federation_id] = self._ctx.store.get_federation(federation_id).config
        return config

    def _check_base(self, config: FederationConfig, round_: Round, base_version_id: str) -> None:
        """Sync: the update must start from the round's version. Async: at most max_staleness versions old."""
        if config.mode == "sync":
            if base_version_id != round_.base_version_id:
                self._count_rejection("stale_base")
                raise UpdateRejectedError("stale_base", "the update was trained from another global version")
            return
        order = [v.id for v in self._ctx.store.list_versions(round_.federation_id)]
        if base_version_id not in order:
            self._count_rejection("stale_base")
            raise UpdateRejectedError("stale_base", f"base version {base_version_id!r} is not of this federation")
        staleness = order.index(round_.base_version_id or order[-1]) - order.index(base_version_id)
        if staleness > config.max_staleness:
            self._count_rejection("too_stale")
            raise UpdateRejectedError(
                "too_stale", f"the update is {staleness} versions old; this federation accepts at most "
                f"{config.max_staleness}: download the current version and train again")

    def _resume(self, update: Update, header: UploadHeader) -> UploadSession:
        if (update.sha256, update.declared_size, update.codec) != (header.sha256, header.total_size, header.codec):
            raise ConflictError("this upload_id was used for different content; choose a new upload_id")
        if update.state is UpdateState.ACCEPTED:
            return UploadSession(update=update, offset=update.declared_size)
        if update.state is UpdateState.REJECTED:
            raise ConflictError(f"this upload was rejected ({update.rejection_reason}); send a new one")
        staged = self._ctx.blobs.staged_size(update.id)
        if header.resume_offset > staged:
            raise InvalidRequestError(
                f"resume_offset {header.resume_offset} is beyond the acknowledged offset {staged}")
        return UploadSession(update=update, offset=header.resume_offset)

    def _check_header(self, header: UploadHeader) -> None:
        limit = self._ctx.settings.max_upload_bytes
        if header.total_size > limit:
            # Refused before a byte is staged; INVALID_ARGUMENT, since sending it again cannot succeed.
            self._count_rejection("upload_too_large")
            raise UpdateRejectedError("upload_too_large",
                                      f"total_size {header.total_size} is over this coordinator's limit of {limit} "
                                      "bytes (max_upload_bytes)")
        problems = []
        if header.codec not in {c.value for c in CodecKind}:
            problems.append(f"unknown codec {header.codec!r}")
        if header.total_size <= 0:
            problems.append(f"total_size must be 1..{limit} bytes")
        if not _SHA256.match(header.sha256):
            problems.append("sha256 must be 64 lowercase hex digits")
        if not header.modalities:
            problems.append("modalities must not be empty")
        if header.public_samples + header.private_samples <= 0:
            # A device without a copy of the public set learns on private data alone: either count will do.
            problems.append("public_samples + private_samples must be > 0")
        for name in ("public_samples", "private_samples"):
            if getattr(header, name) > MAX_SAMPLE_COUNT:
                problems.append(f"{name} must be at most {MAX_SAMPLE_COUNT}")
        metrics_problem = reported_metrics_problem(header.metrics)
        if metrics_problem:
            problems.append(metrics_problem)
        if problems:
            raise InvalidRequestError("invalid upload header: " + "; ".join(problems))

    def _check_modalities(self, device: Device, claimed: frozenset[str]) -> None:
        """An update may cover the modalities the device enrolled with, or fewer (a sensor can fail), never
        more: MMA weighs an update by its modality count and lists it among each modality's participants."""
        extra = sorted(claimed - device.modalities)
        if extra:
            self._count_rejection("modalities")
            raise UpdateRejectedError(
                "modalities", f"the update claims {', '.join(extra)}, which this device did not enrol with "
                f"(enrolled: {', '.join(sorted(device.modalities))}); enrol a device with those modalities")

    def _check_codec(self, config: FederationConfig, codec: str) -> None:
        """The federation's upload codec or a more precise one: a device may not lower the precision asked for."""
        wanted = config.upload_codec
        if _PRECISION[codec] < _PRECISION[wanted]:
            self._count_rejection("codec")
            raise UpdateRejectedError("codec", f"codec {codec} is less precise than this federation's upload "
                                               f"codec {wanted}")

    def append(self, session: UploadSession, offset: int, data: bytes) -> int:
        """Stages one chunk durably; returns the new acknowledged offset.

        A refused chunk stages nothing: the bytes acknowledged before it stay, and the upload can resume there.
        """
        update = session.update
        if update.state is UpdateState.ACCEPTED:
            return session.offset  # a replay of an accepted upload: idempotent, the bytes are not needed
        if update.state is not UpdateState.PARTIAL:
            raise ConflictError(f"upload is already {update.state}")
        if offset != session.offset:
            self._count_rejection("chunk_offset")
            raise UpdateRejectedError("chunk_offset", f"chunk offset {offset} does not continue at the "
                                                      f"acknowledged offset {session.offset}")
        if not data:
            raise self.malformed("empty chunk")
        if offset + len(data) > update.declared_size:
            self._count_rejection("size")
            raise UpdateRejectedError(
                "size", f"chunk ends at {offset + len(data)}, beyond the declared size {update.declared_size}")
        session.offset = self._ctx.blobs.append_staged(update.id, offset, data)
        metrics.UPLOAD_BYTES.inc(len(data))
        return session.offset

    def finish(self, session: UploadSession) -> Update:
        """Called at the end of a stream: accepts a complete upload, or records progress of a partial one."""
        update = session.update
        if update.state is not UpdateState.PARTIAL:
            return update
        staged = self._ctx.blobs.staged_size(update.id)
        if staged < update.declared_size:
            update.received_bytes = staged
            self._ctx.store.save_update(update)
            staging.observe_staging(self._ctx)
            return update
        data = self._ctx.blobs.read_staged(update.id)
        if session.federation_id is None:
            session.federation_id = self._ctx.store.get_round(update.round_id).federation_id
        try:
            tensors = self._validate(update, data, self._config(session.federation_id))
        except UpdateRejectedError as exc:
            update.state = UpdateState.REJECTED
            update.rejection_reason = exc.reason
            self._ctx.store.save_update(update)
            self._ctx.blobs.discard_staged(update.id)
            self._count_rejection(exc.reason)
            raise
        return self._accept(update, tensors)

    def _accept(self, update: Update, tensors: dict[str, np.ndarray]) -> Update:
        """Makes the update durable (blob, then its row in the same transaction that checks the round is
        still open); only then does the device hear "accepted"."""
        store = self._ctx.store
        with self._locks(update.round_id):
            update.blob_key = self._ctx.blobs.promote_staged(update.id, verified_key=update.sha256)
            update.state = UpdateState.ACCEPTED
            update.received_bytes = update.declared_size
            update.accepted_at = utcnow()
            try:
                acceptance = store.accept_update(update)
            except LateUpdateError:
                update.state, update.rejection_reason, update.accepted_at = UpdateState.REJECTED, "late", None
                store.save_update(update)
                self._count_rejection("late")
                raise
        metrics.UPDATES.labels("accepted").inc()
        metrics.UPDATE_WIRE_BYTES.inc(update.declared_size)
        metrics.UPDATE_RAW_BYTES.inc(sum(4 * t.size for t in tensors.values()))
        round_ = acceptance.round
        self._pre_aggregate(round_, update, tensors)
        # The scheduler runs now only if this update may let the round close; a tick per update cost a
        # 32-device round 7 needless ticks (about 0.2 s of CPU). Deadlines are watched by the periodic tick.
        if could_close(accepted=acceptance.accepted, target=round_.update_target,
                       min_updates=self._config(round_.federation_id).min_updates):
            self._on_accepted(update.round_id)
        return update

    def _pre_aggregate(self, round_: Round, update: Update, tensors: dict[str, np.ndarray]) -> None:
        """Adds the accepted update to its round's running sums while it is still decoded."""
        store, blobs = self._ctx.store, self._ctx.blobs
        config = self._config(round_.federation_id)
        if config.robust_rule != "none":
            return  # robust rules need every update at once: the commit spills and reduces them
        staleness = 0
        if config.mode == "async":
            versions = [v.id for v in store.list_versions(round_.federation_id)]
            staleness = version_staleness(versions, round_.base_version_id, update.base_version_id)

        def base() -> dict[str, np.ndarray]:
            assert round_.base_version_id is not None
            return decode_tensors(blobs.get(store.get_version(round_.base_version_id).adapter_key))

        self._accumulators.add(round_.id, config, base, update, tensors, staleness)

    def _validate(self, update: Update, data: bytes, config: FederationConfig) -> dict[str, np.ndarray]:
        """Checks an upload's bytes against its header and the federation's schema; returns its tensors."""
        if len(data) != update.declared_size:
            raise UpdateRejectedError("size", f"received {len(data)} bytes, declared {update.declared_size}")
        if sha256_hex(data) != update.sha256:
            raise UpdateRejectedError("checksum", "sha256 of the received bytes differs from the header")
        # Names and shapes are checked from the header, before the payload is inflated; a header listing
        # more tensors than the schema has (and the fused features) is refused before its entries are parsed.
        schema = _schema(json.dumps(config.model, sort_keys=True))
        expected = len(schema) + 1
        try:
            header = peek_header(data, max_tensors=expected, max_header_bytes=HEADER_BYTES_PER_TENSOR * expected)
        except CodecError as exc:
            raise UpdateRejectedError("codec", str(exc)) from exc
        if header.codec.value != update.codec:
            raise UpdateRejectedError("codec", "payload codec differs from the header")
        if not header.tensors:
            raise UpdateRejectedError("schema", "the update holds no tensors")
        # peek_header has already refused a payload larger than its tensors (the codec accepts only the
        # encoder's layout), so a small upload cannot inflate to gigabytes.
        fused_shape = (len(update.fused_sample_ids), fused_dim(config.model))
        if update.fused_sample_ids and FUSED_TENSOR not in {entry.name for entry in header.tensors}:
            raise UpdateRejectedError("schema", f"fused_sample_ids were declared but {FUSED_TENSOR!r} is missing")
        for entry in header.tensors:
            if entry.name == FUSED_TENSOR:
                if tuple(entry.shape) != fused_shape or not update.fused_sample_ids:
                    raise UpdateRejectedError(
                        "schema", f"tensor {FUSED_TENSOR!r} has shape {tuple(entry.shape)}, expected {fused_shape} "
                        "(one row per declared fused_sample_id)")
                continue
            if entry.name not in schema:
                raise UpdateRejectedError("schema", f"unexpected tensor {entry.name!r}")
            if tuple(entry.shape) != tuple(schema[entry.name]):
                raise UpdateRejectedError(
                    "schema", f"tensor {entry.name!r} has shape {tuple(entry.shape)}, "
                    f"expected {tuple(schema[entry.name])}")
            owner = owning_modality(entry.name)
            if owner is not None and owner not in update.modalities:
                raise UpdateRejectedError("schema", f"tensor {entry.name!r} belongs to a modality the device lacks")
        try:
            # The payload itself: checksummed frame, consistent, finite; never inflated past what the header
            # (checked against the schema above) says it holds.
            tensors = decode_tensors(data, max_decoded_bytes=header.payload_bytes + 4 + MAX_HEADER_BYTES)
        except NonFiniteValuesError as exc:
            raise UpdateRejectedError("non_finite", str(exc)) from exc
        except CodecError as exc:
            raise UpdateRejectedError("codec", str(exc)) from exc
        self._check_norm(config.max_update_norm, tensors)
        if FUSED_TENSOR in tensors:
            # Scored now, while the payload is decoded anyway, so aggregation can weigh without decoding twice.
            ids = np.asarray(update.fused_sample_ids, dtype=np.int64)
            update.anchor_agreement = client_agreements(self._anchors(update.base_version_id),
                                                        [(ids, tensors[FUSED_TENSOR])])[0]
        return tensors

    @staticmethod
    def _check_norm(bound: float, tensors: dict[str, np.ndarray]) -> None:
        """Refuses an update whose delta (all adapter tensors, not the fused features) is longer than ``bound``."""
        if not bound:
            return
        try:
            norm = update_norm({name: t for name, t in tensors.items() if name != FUSED_TENSOR})
        except AggregationError as exc:
            raise UpdateRejectedError("norm_bound", str(exc)) from exc
        if norm > bound:
            raise UpdateRejectedError("norm_bound", f"the update's L2 norm {norm:.6g} is over this federation's "
                                                    f"max_update_norm {bound:g}")

    def _anchors(self, version_id: str | None) -> dict[str, np.ndarray]:
        """The decoded anchor set of a version (cached: every update of a round shares it)."""
        if version_id is None:
            return {}
        with self._anchor_guard:
            if version_id in self._anchor_cache:
                return self._anchor_cache[version_id]
        version = self._ctx.store.get_version(version_id)
        anchors = decode_tensors(self._ctx.blobs.get(version.anchors_key)) if version.anchors_key else {}
        with self._anchor_guard:
            self._anchor_cache[version_id] = anchors
            while len(self._anchor_cache) > 4:
                self._anchor_cache.pop(next(iter(self._anchor_cache)))
        return anchors

    def status(self, device: Device, round_id: str, upload_id: str) -> tuple[UpdateState, int]:
        """The state of an upload and how many bytes of it are durably acknowledged."""
        update = self._ctx.store.find_update_by_upload(device.id, upload_id)
        if update is None:
            return UpdateState.PARTIAL, 0
        if update.state is UpdateState.ACCEPTED:
            return update.state, update.declared_size
        if update.state is UpdateState.REJECTED:
            return update.state, 0
        return update.state, self._ctx.blobs.staged_size(update.id)

    def malformed(self, detail: str) -> UpdateRejectedError:
        """The error for an upload stream that breaks the protocol (no header first, two headers, an empty
        chunk), counted like every other rejection."""
        self._count_rejection("malformed")
        return UpdateRejectedError("malformed", detail)

    @staticmethod
    def _count_rejection(reason: str) -> None:
        metrics.UPDATES.labels("rejected").inc()
        metrics.UPDATE_REJECTIONS.labels(reason).inc()
