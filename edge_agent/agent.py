"""The agent daemon's lifecycle: enrol, heartbeat, take tasks, train, upload (resumably), until told to stop."""

from __future__ import annotations

import logging
import random
import threading
import uuid
from collections.abc import Callable
from typing import TypeVar

from edge_agent.config import AgentSettings
from edge_agent.errors import CoordinatorUnavailable, CredentialRejected, RequestRefused
from edge_agent.state import AgentState, Identity, PendingUpload
from edge_agent.tasks import Coordinator, Stop, TrainTask, UploadRequest, Wait
from edge_agent.trainer import AmtTrainer, LocalData, TrainingInterrupted, load_local_data
from mlecs.codec import CodecKind, decode_tensors, encode_tensors, sha256_hex

log = logging.getLogger("mlecs.agent")
T = TypeVar("T")


class Agent:
    """``run()`` blocks until the coordinator says stop or ``shutdown()`` is called (SIGTERM)."""

    def __init__(self, settings: AgentSettings, client: Coordinator, data: LocalData | None = None) -> None:
        """``data``: the device's data when already loaded (else ``run`` reads it from ``settings``)."""
        self.settings = settings
        self._client = client
        self._state = AgentState(settings.state_dir)
        self._stop = threading.Event()
        self._identity: Identity | None = None
        self._heartbeat_s = 5
        self._data: LocalData | None = data
        self._refused_rounds: set[str] = set()

    def shutdown(self) -> None:
        self._stop.set()

    # ---- helpers ---------------------------------------------------------------------------

    def _retry(self, call: Callable[[], T], what: str) -> T:
        """Retries a call while the coordinator is unavailable, with jittered exponential backoff."""
        delay = 0.5
        while True:
            try:
                return call()
            except CoordinatorUnavailable as exc:
                if self._stop.is_set():
                    raise
                wait = max(delay * random.uniform(0.5, 1.5), exc.retry_after_s)  # at least as long as asked
                log.warning("%s: coordinator unavailable (%s); retrying in %.1fs", what, exc, wait)
                if exc.retry_after_s:
                    self._stop.wait(wait)  # asked to come back later: a reconnection does not change that
                else:
                    self._client.wait_until_reachable(wait, self._stop)
                delay = min(delay * 2, self.settings.max_backoff_s)
            except CredentialRejected:
                if self._identity is None:
                    raise
                log.warning("%s: credential refused; enrolling again", what)
                self._state.forget_identity()
                self._identity = None
                self._enrol()

    def _enrol(self) -> Identity:
        s = self.settings
        identity = self._state.load_identity(s.coordinator, s.federation)
        if identity is None:
            token = s.enrolment_token_value()
            device_id, secret, interval = self._retry(
                lambda: self._client.enrol(s.federation, s.device_name, self._modalities(), token), "enrol")
            identity = Identity(s.coordinator, s.federation, device_id, secret)
            self._state.save_identity(identity)
            self._heartbeat_s = interval or self._heartbeat_s
            log.info("enrolled in %s as %s (%s)", s.federation, s.device_name, device_id)
        self._client.authenticate(identity.device_id, identity.device_secret)
        self._identity = identity
        return identity

    def _modalities(self) -> list[str]:
        """The modalities this device trains on: those its data holds (of the configured ones)."""
        assert self._data is not None
        return sorted(self._data.modalities)

    def _device_id(self) -> str:
        assert self._identity is not None
        return self._identity.device_id

    def _heartbeats(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            try:
                self._heartbeat_s = self._client.heartbeat(self._device_id()) or self._heartbeat_s
            except (CoordinatorUnavailable, CredentialRejected, RequestRefused) as exc:
                log.debug("heartbeat failed: %s", exc)

    # ---- main loop -------------------------------------------------------------------------

    def run(self) -> None:
        if self._data is None:
            self._data = load_local_data(self.settings)
        self._enrol()
        self._data = self._with_public_set(self._data)
        beat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        beat.start()
        try:
            while not self._stop.is_set():
                pending = self._state.load_pending()
                if pending is not None:
                    self._upload(*pending)
                    continue
                task = self._retry(lambda: self._client.get_task(self._device_id()), "get task")
                if isinstance(task, Stop):
                    log.info("coordinator says stop: %s", task.reason)
                    return
                if isinstance(task, Wait):
                    self._stop.wait(task.seconds)
                    continue
                if task.round_id in self._refused_rounds:
                    # The coordinator offers a round whose update it refused: training it again would be
                    # refused again, so wait for the next round (or the round to close) instead.
                    self._stop.wait(self._heartbeat_s)
                    continue
                self._train(task)
        except CoordinatorUnavailable:
            if not self._stop.is_set():
                raise
        finally:
            self._stop.set()
            self._client.close()
            log.info("agent stopped")

    def _with_public_set(self, data: LocalData) -> LocalData:
        """With a dataset directory: the coordinator's public shard for this device, or the device's own copy
        with only the samples the coordinator recognises (partition mode computes its shard itself)."""
        from edge_agent.public_set import checked_copy, downloaded_shard

        if data.task is None:
            return data
        copy = self.settings.data.public
        if copy is not None:
            return checked_copy(data, copy, lambda samples: self._retry(
                lambda: self._client.verify_public_copy(self._device_id(), samples), "verify public copy"))
        return downloaded_shard(data, self.settings.state_dir, lambda cached: self._retry(
            lambda: self._client.download_public_shard(self._device_id(), cached), "download public shard"))

    def _train(self, task: TrainTask) -> None:
        assert self._data is not None
        version = self._retry(lambda: self._client.download_global(self._device_id(), task.version_id),
                              "download global")
        trainer = AmtTrainer(self._data, self._state.personal_model_path)
        anchors = decode_tensors(version.anchors) if version.anchors else {}
        try:
            outcome = trainer.run(task, decode_tensors(version.adapter), anchors, self._stop.is_set)
        except TrainingInterrupted:
            log.info("training of round %d interrupted by shutdown", task.round_number)
            return
        payload = encode_tensors(outcome.tensors, CodecKind(task.upload_codec))
        pending = PendingUpload(
            round_id=task.round_id, upload_id=uuid.uuid4().hex, base_version_id=version.version_id,
            codec=task.upload_codec, sha256=sha256_hex(payload), size=len(payload),
            public_samples=outcome.public_samples, private_samples=outcome.private_samples,
            metrics=outcome.metrics | {"chunk_bytes": float(task.max_chunk_bytes)},
            fused_sample_ids=outcome.fused_sample_ids)
        # Durable before the first byte leaves: a crash mid-upload resumes this exact update.
        self._state.save_pending(pending, payload)
        self._upload(pending, payload)

    def _upload(self, pending: PendingUpload, payload: bytes) -> None:
        request = UploadRequest(
            round_id=pending.round_id, device_id=self._device_id(), upload_id=pending.upload_id,
            codec=pending.codec, sha256=pending.sha256, modalities=self._modalities(),
            public_samples=pending.public_samples, private_samples=pending.private_samples,
            base_version_id=pending.base_version_id,
            metrics={k: v for k, v in pending.metrics.items() if k != "chunk_bytes"},
            fused_sample_ids=list(pending.fused_sample_ids))
        chunk = int(pending.metrics.get("chunk_bytes", 256 * 1024))
        try:
            _, offset = self._retry(lambda: self._client.upload_status(
                self._device_id(), pending.round_id, pending.upload_id), "upload status")
            while not self._stop.is_set():
                state, offset = self._retry(
                    lambda off=offset: self._client.upload(request, payload, off, chunk), "upload")  # type: ignore[misc]
                if state == "accepted":
                    log.info("update for round %s accepted (%d bytes)", pending.round_id, len(payload))
                    self._state.clear_pending()
                    self._report(pending)
                    return
                if state == "rejected":
                    log.error("update for round %s was rejected; dropping it", pending.round_id)
                    self._state.clear_pending()
                    return
        except RequestRefused as exc:
            # The round closed or the update is invalid: nothing to resume, the next task supersedes it.
            log.warning("upload for round %s refused: %s; waiting for the next round", pending.round_id, exc)
            self._state.clear_pending()
            self._refused_rounds = {pending.round_id}

    def _report(self, pending: PendingUpload) -> None:
        try:
            self._client.report_metrics(self._device_id(), pending.round_id,
                                        {k: v for k, v in pending.metrics.items() if k != "chunk_bytes"})
        except (CoordinatorUnavailable, RequestRefused) as exc:
            log.warning("could not report metrics: %s", exc)
