"""Receiving updates: transport -> staging -> checks -> acceptance -> aggregation.

``open`` checks the header (``server.services.upload_checks``) and starts or resumes the upload; ``append``
stages each chunk durably; ``finish`` checks the complete bytes, accepts the update durably (its blob, then
its row, in the transaction that checks the round still takes uploads) and adds it to the round's running
sums. An update is acknowledged as accepted only after all that; until then the device can resume from
``staged_size`` (the acknowledged offset).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from mlecs.codec import decode_tensors, peek_header
from mlecs.tensor_names import FUSED_TENSOR
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
from server.domain.federation_config import FederationConfig
from server.domain.models import Device, Round, Update, UpdateState, utcnow
from server.domain.scheduling import could_close
from server.learning.global_model import client_agreements, fused_dim
from server.services import staging
from server.services.aggregation import RoundAccumulators, version_staleness
from server.services.context import ServiceContext
from server.services.locks import RoundLocks
from server.services.rounds import RoundService
from server.services.upload_checks import (
    UPLOAD_ID,
    Schema,
    UploadHeader,
    check_codec,
    check_fused_ids,
    check_header,
    check_modalities,
    check_payload,
)

log = logging.getLogger(__name__)

@dataclass
class UploadSession:
    update: Update
    offset: int
    federation_id: str | None = None
    """Known when the upload was opened in this stream; a resumed one looks it up when it completes."""


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
        self._schemas: dict[str, Schema] = {}

    def open(self, device: Device, header: UploadHeader) -> UploadSession:
        """Starts or resumes an upload; returns the session and the offset the bytes must continue from."""
        store = self._ctx.store
        if header.device_id != device.id:
            raise PermissionDeniedError("a device may upload only as itself")
        if not UPLOAD_ID.match(header.upload_id):
            raise InvalidRequestError("upload_id must be 8-64 characters of letters, digits, '-' or '_'")
        # The upload id is the idempotency key: a retry finds its update in whichever round it landed.
        view = store.upload_view(device.id, header.upload_id, header.round_id)
        if view.existing is not None:
            return self._resume(view.existing, header)
        round_ = self._target_round(device, header.round_id, view.round)
        config = self._config(round_.federation_id)
        with self._counted():
            check_header(header, self._ctx.settings.max_upload_bytes)
            check_modalities(header.modalities, device.modalities)
            check_codec(header.codec, config.upload_codec)
            self._check_base(config, round_, header.base_version_id)
            check_fused_ids(header.fused_sample_ids, config.fused_upload_samples)
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
                raise UpdateRejectedError("stale_base", "the update was trained from another global version")
            return
        order = [v.id for v in self._ctx.store.list_versions(round_.federation_id)]
        if base_version_id not in order:
            raise UpdateRejectedError("stale_base", f"base version {base_version_id!r} is not of this federation")
        staleness = order.index(round_.base_version_id or order[-1]) - order.index(base_version_id)
        if staleness > config.max_staleness:
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
        config = self._config(session.federation_id)
        try:
            tensors = check_payload(update, data, self._schema(session.federation_id, config),
                                    config.max_update_norm)
        except UpdateRejectedError as exc:
            update.state = UpdateState.REJECTED
            update.rejection_reason = exc.reason
            self._ctx.store.save_update(update)
            self._ctx.blobs.discard_staged(update.id)
            self._count_rejection(exc.reason)
            raise
        self._score_fused(update, tensors)
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

    def _schema(self, federation_id: str, config: FederationConfig) -> Schema:
        """What the federation's updates may hold: the tensors of its global adapter (every version has the
        same), read from the current version's codec header. No model is built, so the first upload after a
        restart does not wait for torch."""
        schema = self._schemas.get(federation_id)
        if schema is None:
            store = self._ctx.store
            version_id = store.get_federation(federation_id).current_version_id
            if version_id is None:
                raise UpdateRejectedError("schema", "the federation has no global version to check updates against")
            adapter = self._ctx.blobs.get(store.get_version(version_id).adapter_key)
            schema = self._schemas[federation_id] = Schema(peek_header(adapter).shapes, fused_dim(config.model))
        return schema

    def _score_fused(self, update: Update, tensors: dict[str, np.ndarray]) -> None:
        """MMA's noise term: how well the update's fused features agree with the anchors it trained against.
        Scored now, while the payload is decoded anyway, so aggregation can weigh without decoding twice."""
        if FUSED_TENSOR in tensors:
            ids = np.asarray(update.fused_sample_ids, dtype=np.int64)
            update.anchor_agreement = client_agreements(self._anchors(update.base_version_id),
                                                        [(ids, tensors[FUSED_TENSOR])])[0]

    def _anchors(self, version_id: str | None) -> dict[str, np.ndarray]:
        """The decoded anchor set of a version (cached: every update of a round shares it)."""
        if version_id is None:
            return {}
        with self._anchor_guard:
            if version_id in self._anchor_cache:
                return self._anchor_cache[version_id]
        version = self._ctx.store.get_version(version_id)
        if version.anchors_key is None:  # not generated yet: no round trains on such a version
            return {}
        anchors = decode_tensors(self._ctx.blobs.get(version.anchors_key))
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

    @contextmanager
    def _counted(self) -> Iterator[None]:
        """Counts a rejection raised inside (the checks are pure; counting is the service's)."""
        try:
            yield
        except UpdateRejectedError as exc:
            self._count_rejection(exc.reason)
            raise
