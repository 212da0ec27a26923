"""The cloud's work on each new version, off the round's path: tuning the cloud model on the public set,
generating the anchors devices align to, and evaluating the version.

A round commits once its aggregate is stored (``RoundService``); the version then owes its cloud work
(``CloudState.PENDING``) and a job naming it goes on the durable queue (``server.persistence.job_queue``). A
worker (``mlecs-coordinator worker``, or a thread of the embedded coordinator) runs it:

* **Idempotent by version.** The outcome is written once (``finish_cloud_work``); a job for a version already
  settled does nothing, so a job run twice (redelivered while the first was still running) changes nothing.
* **Retried.** An attempt that raises is retried by the queue; each start counts against
  ``cloud_job_attempts``, after which the version is marked failed: it keeps the anchors it has (a federation
  that waits for anchors gets the newest ones there are) and has no evaluation.
* **Nothing lost.** The queue forgets a job whose worker died running it. The version still says it is owed,
  and a running job's worker says so every third of ``cloud_job_timeout_s``; the coordinator's scheduler puts
  a job on the queue again once the version went that long without being queued or heard of
  (``redeliver_stale``; a compare-and-set, so replicas do not both do it).

Which anchors a new version carries is the federation's ``anchors`` setting: ``latest`` gives it the newest
anchors the cloud has generated (from an earlier version while the worker tunes on this one), ``wait`` gives
it none until its own job generated them, and the scheduler opens no round on it until then.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Protocol

import numpy as np

from mlecs.codec import decode_tensors, sha256_hex
from server import metrics
from server.domain.models import BlobRef, CloudOutcome, CloudState, Federation, ModelVersion, utcnow
from server.services.context import ServiceContext
from server.services.leases import repeated_while_running

log = logging.getLogger(__name__)


class Enqueue(Protocol):
    def enqueue(self, version_id: str) -> None: ...


def encode_fused(fused: Sequence[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """The (public ids, fused z) of a round's kept updates, concatenated, as one .npz blob."""
    pairs = [(np.asarray(i, dtype=np.int64), np.asarray(z, dtype=np.float32)) for i, z in fused if len(i)]
    buffer = io.BytesIO()
    if pairs:
        np.savez(buffer, ids=np.concatenate([i for i, _ in pairs]), z=np.concatenate([z for _, z in pairs]))
    else:
        np.savez(buffer, ids=np.zeros(0, dtype=np.int64), z=np.zeros((0, 0), dtype=np.float32))
    return buffer.getvalue()


def decode_fused(data: bytes) -> list[tuple[np.ndarray, np.ndarray]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        ids, z = arrays["ids"], arrays["z"]
    return [(ids, z)] if len(ids) else []


def round_metrics_of(evaluation: dict[str, float]) -> dict[str, float]:
    """A version's evaluation as its round's metrics: ``global_accuracy``, ``global_<metric>``, ``cloud_*``."""
    out = {"global_accuracy": evaluation["accuracy"]} if "accuracy" in evaluation else {}
    out.update({(k if k.startswith("cloud_") else f"global_{k}"): v for k, v in evaluation.items() if k != "accuracy"})
    return out


class CloudWork:
    """Both sides of the cloud job: the coordinator's (``prepare``, ``enqueue``, ``redeliver_stale``) and the
    worker's (``run``)."""

    def __init__(self, ctx: ServiceContext, queue: Enqueue | None) -> None:
        self._ctx = ctx
        self._queue = queue

    # ---- coordinator side -------------------------------------------------------------------

    def prepare(self, federation: Federation, version: ModelVersion,
                fused: Sequence[tuple[np.ndarray, np.ndarray]], base: ModelVersion) -> None:
        """Sets a version about to be committed up for its cloud work, and chooses the anchors it carries."""
        config = federation.config
        if not config.server_learning:  # text anchors only: the same for every version
            version.anchors_key, version.anchors_sha256, version.anchors_size = (
                base.anchors_key, base.anchors_sha256, base.anchors_size)
            version.generated_anchors = base.generated_anchors
            return
        version.cloud_state = CloudState.PENDING
        version.cloud_enqueued_at = utcnow()
        version.fused_key = self._ctx.blobs.put(encode_fused(fused))
        if config.anchors == "wait":
            return  # the job sets them; no round opens on this version before
        newest = self._ctx.store.newest_generated_anchors(federation.id)
        if newest is None and base.anchors_key is not None:  # versions from before the cloud work moved off
            newest = BlobRef(base.anchors_key, base.anchors_sha256 or "", base.anchors_size)
        if newest is not None:
            version.anchors_key, version.anchors_sha256, version.anchors_size = newest.key, newest.sha256, newest.size

    def enqueue(self, version: ModelVersion) -> None:
        """Puts a committed version's job on the queue. A failure here loses nothing: the version records
        that it is owed, and ``redeliver_stale`` queues it later."""
        if version.cloud_state is not CloudState.PENDING or self._queue is None:
            return
        try:
            self._queue.enqueue(version.id)
        except Exception:
            log.exception("could not queue the cloud job of version %s; it is queued again within %.0f s",
                          version.id, self._ctx.settings.cloud_job_timeout_s)

    def redeliver_stale(self) -> int:
        """Queues again every owed job neither queued nor reported running for ``cloud_job_timeout_s``;
        returns how many."""
        store, settings = self._ctx.store, self._ctx.settings
        owed = store.owed_cloud_work()
        metrics.CLOUD_WORK_OWED.set(len(owed))
        if self._queue is None or not owed:
            return 0
        now = utcnow()
        cutoff = now - timedelta(seconds=settings.cloud_job_timeout_s)
        redelivered = 0
        for version in owed:
            if version.cloud_enqueued_at is not None and version.cloud_enqueued_at > cutoff:
                continue
            if not store.claim_redelivery(version.id, now, cutoff):
                continue  # another replica did it
            log.warning("cloud job of version %s (round %d) neither queued nor reported running for %.0f s: "
                        "queued again", version.id, version.round_number, settings.cloud_job_timeout_s)
            metrics.CLOUD_REDELIVERIES.inc()
            self.enqueue(version)
            redelivered += 1
        return redelivered

    # ---- worker side ------------------------------------------------------------------------

    def run(self, version_id: str) -> None:
        """Runs the version's cloud work unless it is settled; raises to have the queue retry an attempt."""
        store, settings = self._ctx.store, self._ctx.settings
        version = store.start_cloud_attempt(version_id)
        if version.cloud_state.is_settled:
            metrics.CLOUD_JOBS.labels("skipped").inc()
            log.info("cloud job of version %s skipped: already %s", version_id, version.cloud_state)
            return
        federation = store.get_federation(version.federation_id)
        started = time.perf_counter()
        try:
            with self._still_running(version_id):
                outcome = self._work(federation, version)
        except Exception as exc:
            seconds = time.perf_counter() - started
            if version.cloud_attempts < settings.cloud_job_attempts:
                metrics.CLOUD_JOBS.labels("retried").inc()
                metrics.CLOUD_JOB_SECONDS.labels("retried").observe(seconds)
                log.warning("cloud job of version %s, attempt %d of %d, failed: %s", version_id,
                            version.cloud_attempts, settings.cloud_job_attempts, exc)
                raise
            log.exception("cloud job of version %s failed %d times; the version keeps the anchors it has and is "
                          "not evaluated", version_id, version.cloud_attempts)
            outcome = CloudOutcome(CloudState.FAILED, error=f"{type(exc).__name__}: {exc}",
                                   anchors_if_unset=self._fallback_anchors(federation.id))
        seconds = time.perf_counter() - started
        if not store.finish_cloud_work(version_id, outcome):
            metrics.CLOUD_JOBS.labels("skipped").inc()
            log.info("cloud job of version %s: another worker finished it first", version_id)
            return
        label = outcome.state.value
        metrics.CLOUD_JOBS.labels(label).inc()
        metrics.CLOUD_JOB_SECONDS.labels(label).observe(seconds)
        if outcome.state is CloudState.DONE:
            self._observe_evaluation(federation.name, outcome.version_metrics)
            log.info("cloud work of %s round %d done in %.2f s: accuracy %.4f", federation.name,
                     version.round_number, seconds, outcome.version_metrics.get("accuracy", float("nan")))

    def _still_running(self, version_id: str) -> AbstractContextManager[None]:
        """Tells the store, every third of ``cloud_job_timeout_s``, that the job is running: only a job whose
        worker went silent is redelivered, however long the job itself takes."""
        def beat() -> bool:
            try:
                self._ctx.store.touch_cloud_work(version_id, utcnow())
            except Exception as exc:  # the job goes on; at worst it is redelivered and runs twice
                log.warning("could not report the cloud job of version %s as running: %s", version_id, exc)
            return True

        return repeated_while_running(self._ctx.settings.cloud_job_timeout_s / 3, beat,
                                      f"cloud-job-{version_id[:8]}")

    def _work(self, federation: Federation, version: ModelVersion) -> CloudOutcome:
        config, blobs = federation.config, self._ctx.blobs
        tensors = decode_tensors(blobs.get(version.adapter_key))
        fused = decode_fused(blobs.get(version.fused_key)) if version.fused_key else []
        cloud = self._ctx.cloud.run_round(config, tensors, fused, seed=config.seed * 1_000_003 + version.round_number)
        evaluation = self._ctx.evaluator.evaluate(config, tensors) | cloud.metrics
        key = blobs.put(cloud.anchors)
        generated = BlobRef(key, sha256_hex(cloud.anchors), len(cloud.anchors))
        return CloudOutcome(CloudState.DONE, generated_anchors=generated, anchors_if_unset=generated,
                            version_metrics=evaluation, round_metrics=round_metrics_of(evaluation))

    def _fallback_anchors(self, federation_id: str) -> BlobRef | None:
        return self._ctx.store.newest_generated_anchors(federation_id)

    @staticmethod
    def _observe_evaluation(federation: str, evaluation: dict[str, float]) -> None:
        # "all", "cloud", and one series per modality alone (accuracy_<modality>: whatever the task names).
        labels = {"accuracy": "all", "cloud_accuracy": "cloud"} | {
            key: key.removeprefix("accuracy_") for key in evaluation if key.startswith("accuracy_")}
        for key, label in labels.items():
            if key in evaluation:
                metrics.GLOBAL_ACCURACY.labels(federation, label).set(evaluation[key])
