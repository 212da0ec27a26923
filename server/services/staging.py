"""Staged bytes of unfinished uploads: bounded per device and in total, and never left behind.

A partial upload lives as long as its round takes uploads. When the round closes (committed or
failed) its partial uploads expire: their staged bytes are deleted and their rows say ``rejected``
(reason ``expired``). A sweep removes what a crash or another replica left: staged files whose upload
is unknown, finished, or of a closed round.
"""

from __future__ import annotations

import logging

from server import metrics
from server.domain.models import Round, Update, UpdateState
from server.services.context import ServiceContext

log = logging.getLogger(__name__)

SWEEP_MIN_AGE_S = 300.0
"""The sweep leaves staged files written to within this long alone: an upload being received is never
swept, and a file whose row is being written has time to get it."""


def retire(ctx: ServiceContext, update: Update, reason: str) -> None:
    """Ends a partial upload without accepting it: its staged bytes go, its row says rejected (``reason``)."""
    ctx.blobs.discard_staged(update.id)
    update.state, update.rejection_reason = UpdateState.REJECTED, reason
    ctx.store.save_update(update)
    metrics.UPDATE_REJECTIONS.labels(reason).inc()


def expire_partials(ctx: ServiceContext, round_: Round) -> int:
    """Retires the partial uploads of a closed round; returns how many there were."""
    partial = [u for u in ctx.store.list_updates(round_.id) if u.state is UpdateState.PARTIAL]
    for update in partial:
        retire(ctx, update, "expired")
    if partial:
        log.info("round %d closed with %d unfinished upload(s): their staged bytes were deleted",
                 round_.number, len(partial))
    observe_staging(ctx)
    return len(partial)


def sweep(ctx: ServiceContext, min_age_s: float = SWEEP_MIN_AGE_S) -> int:
    """Deletes staged files no open upload owns (not written to for ``min_age_s``); returns their count."""
    store, blobs = ctx.store, ctx.blobs
    removed = 0
    for staging_id, _size, age_s in blobs.staged_uploads():
        if age_s < min_age_s:
            continue
        update = store.get_update(staging_id)
        if update is not None and update.state is UpdateState.PARTIAL:
            if not store.get_round(update.round_id).state.accepts_uploads:
                retire(ctx, update, "expired")
                removed += 1
            continue
        blobs.discard_staged(staging_id)  # no row, or a finished upload's leftover
        removed += 1
    if removed:
        log.warning("swept %d staged upload file(s) no open upload owned", removed)
    observe_staging(ctx)
    return removed


def observe_staging(ctx: ServiceContext) -> None:
    metrics.STAGED_BYTES.set(ctx.blobs.staged_bytes())
