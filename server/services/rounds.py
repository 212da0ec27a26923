"""Launching rounds, telling devices what to do, and driving rounds to commit or failure."""

from __future__ import annotations

import logging
import math
import random
import time
from datetime import timedelta

import numpy as np

from mlecs.aggregation import ClientUpdate, fedavg_weights, mma_weights, weighted_average_per_tensor
from mlecs.aggregation.lora_exact import average_lora_products
from mlecs.aggregation.quality import agreement_weights
from mlecs.codec import decode_tensors
from server import metrics
from server.domain.assignments import Assignment, StopAssignment, TrainAssignment, WaitAssignment
from server.domain.errors import ConflictError, InvalidRequestError, PermissionDeniedError
from server.domain.models import (
    Device,
    DeviceReport,
    Federation,
    FederationState,
    Round,
    Update,
    UpdateState,
    utcnow,
)
from server.domain.rounds import RoundState, check_transition
from server.learning.global_model import FUSED_TENSOR, apply_delta, client_agreements, full_model_bytes
from server.services.context import ServiceContext
from server.services.federations import FederationService
from server.services.locks import RoundLocks

log = logging.getLogger(__name__)

WAIT_S = 2


def _accepted_blob(update: Update) -> str:
    if update.blob_key is None:  # accepted rows always carry their blob; anything else is corruption
        raise RuntimeError(f"accepted update {update.id} has no blob")
    return update.blob_key


class RoundService:
    def __init__(self, ctx: ServiceContext, federations: FederationService, locks: RoundLocks) -> None:
        self._ctx = ctx
        self._federations = federations
        self._locks = locks

    # ---- admin side -------------------------------------------------------------------------

    def start(self, federation_ref: str) -> Round:
        """Creates the next round, invites live devices and opens it for training."""
        store = self._ctx.store
        federation = self._federations.get(federation_ref)
        if federation.state is not FederationState.ACTIVE:
            raise ConflictError(f"federation {federation.name!r} is {federation.state}; start a new one")
        latest = store.latest_round(federation.id)
        if latest is not None and not latest.state.is_terminal:
            raise ConflictError(f"round {latest.number} is still {latest.state}; wait for it to finish")
        devices = [d for d in store.list_devices(federation.id) if not d.revoked]
        online = self._ctx.presence.online(d.id for d in devices)
        eligible = sorted(d.id for d in devices if d.id in online)
        config = federation.config
        if len(eligible) < config.min_updates:
            raise ConflictError(
                f"{len(eligible)} live device(s) but the quorum is {config.min_updates}; "
                "start agents or lower min_updates"
            )
        number = 1 if latest is None else latest.number + 1
        if config.clients_per_round and config.clients_per_round < len(eligible):
            eligible = sorted(random.Random(config.seed * 100_003 + number).sample(eligible, config.clients_per_round))
        round_ = Round(federation_id=federation.id, number=number, participants=eligible,
                       base_version_id=federation.current_version_id)
        store.add_round(round_)
        round_.state = check_transition(round_.state, RoundState.OPEN)
        round_.opened_at = utcnow()
        round_.deadline_at = round_.opened_at + timedelta(seconds=config.round_deadline_s)
        store.save_round(round_)
        metrics.ROUND_PARTICIPANTS.labels("invited").set(len(eligible))
        log.info("round %d of %s opened with %d participant(s)", number, federation.name, len(eligible))
        return round_

    def get(self, round_id: str) -> Round:
        return self._ctx.store.get_round(round_id)

    def list_for(self, federation_ref: str) -> list[Round]:
        return self._ctx.store.list_rounds(self._federations.get(federation_ref).id)

    # ---- device side ------------------------------------------------------------------------

    def assignment_for(self, device: Device) -> Assignment:
        """Train the open round the device was invited to, wait, or stop when the federation has."""
        store = self._ctx.store
        federation = store.get_federation(device.federation_id)
        if federation.state is FederationState.STOPPED:
            return StopAssignment(reason=f"federation {federation.name} stopped")
        latest = store.latest_round(federation.id)
        if latest is None or not latest.state.accepts_uploads:
            return WaitAssignment(WAIT_S, "no open round")
        if device.id not in latest.participants:
            return WaitAssignment(WAIT_S, f"not invited to round {latest.number}")
        done = any(u.device_id == device.id and u.state is UpdateState.ACCEPTED
                   for u in store.list_updates(latest.id))
        if done:
            return WaitAssignment(WAIT_S, f"update for round {latest.number} already accepted")
        return TrainAssignment(round=latest, config=federation.config)

    def record_report(self, device: Device, round_id: str, values: dict[str, float]) -> None:
        """Stores metrics a device reports for a round it took part in."""
        round_ = self._ctx.store.get_round(round_id)
        if round_.federation_id != device.federation_id or device.id not in round_.participants:
            raise PermissionDeniedError(f"device did not take part in round {round_.number}")
        if len(values) > 64 or any(len(k) > 64 or not math.isfinite(v) for k, v in values.items()):
            raise InvalidRequestError("metrics: at most 64 finite values with names of at most 64 characters")
        self._ctx.store.add_device_report(DeviceReport(round_id=round_id, device_id=device.id, metrics=values))

    # ---- scheduler side ---------------------------------------------------------------------

    def advance_all(self) -> None:
        """Moves every unfinished round on by one decision (commit, fail or keep waiting)."""
        for round_ in self._ctx.store.list_unfinished_rounds():
            try:
                self.advance(round_.id)
            except Exception:  # one broken round must not stall the others
                log.exception("could not advance round %s", round_.id)

    def advance(self, round_id: str) -> Round:
        store = self._ctx.store
        with self._locks(round_id):
            round_ = store.get_round(round_id)
            federation = store.get_federation(round_.federation_id)
            if round_.state.is_terminal:
                return round_
            if federation.state is FederationState.STOPPED:
                return self._fail(round_, "federation stopped")
            accepted = [u for u in store.list_updates(round_.id) if u.state is UpdateState.ACCEPTED]
            everyone = {u.device_id for u in accepted} >= set(round_.participants)
            past_deadline = round_.deadline_at is not None and utcnow() >= round_.deadline_at
            if round_.state is RoundState.AGGREGATING:
                pass  # a previous attempt was interrupted: aggregate again
            elif everyone or (past_deadline and len(accepted) >= federation.config.min_updates):
                if round_.state is RoundState.OPEN:
                    round_.state = check_transition(round_.state, RoundState.COLLECTING)
                round_.state = check_transition(round_.state, RoundState.AGGREGATING)
                store.save_round(round_)
            elif past_deadline:
                return self._fail(
                    round_, f"deadline passed with {len(accepted)} of {federation.config.min_updates} "
                    "required updates")
            else:
                return round_
            try:
                return self._commit(federation, round_, accepted)
            except Exception as exc:
                log.exception("aggregation of round %d failed", round_.number)
                return self._fail(round_, f"aggregation failed: {exc}")

    def _fail(self, round_: Round, reason: str) -> Round:
        round_.state = check_transition(round_.state, RoundState.FAILED)
        round_.failure_reason = reason
        round_.closed_at = utcnow()
        self._ctx.store.save_round(round_)
        metrics.ROUNDS.labels("failed").inc()
        log.warning("round %d failed: %s", round_.number, reason)
        return round_

    def _commit(self, federation: Federation, round_: Round, accepted: list[Update]) -> Round:
        started = time.perf_counter()
        store, blobs = self._ctx.store, self._ctx.blobs
        assert round_.base_version_id is not None
        base_version = store.get_version(round_.base_version_id)
        config = federation.config
        base = decode_tensors(blobs.get(base_version.adapter_key))
        base_anchors = decode_tensors(blobs.get(base_version.anchors_key)) if base_version.anchors_key else {}
        updates, fused = [], []
        for u in accepted:
            tensors_of_u = decode_tensors(blobs.get(_accepted_blob(u)))
            z = tensors_of_u.pop(FUSED_TENSOR, None)
            fused.append((np.asarray(u.fused_sample_ids, dtype=np.int64), z) if z is not None else None)
            updates.append(ClientUpdate(client_id=u.device_id, tensors=tensors_of_u,
                                        num_samples=max(u.public_samples, 1), modalities=frozenset(u.modalities)))
        agreements = client_agreements(base_anchors, fused)
        tensors, quality = self._aggregate(federation, base, updates, agreements)
        cloud = self._ctx.cloud.run_round(config, tensors, [f for f in fused if f is not None],
                                          seed=config.seed * 1_000_003 + round_.number)
        version = self._federations.store_version(federation.id, round_.number, tensors, anchors=cloud.anchors)
        version.metrics = self._ctx.evaluator.evaluate(config.model, config.seed, tensors) | cloud.metrics
        store.add_version(version)
        federation.current_version_id = version.id
        store.save_federation(federation)

        round_.metrics = self._round_metrics(federation, round_, accepted, version.metrics)
        known = [a for a in agreements if a is not None]
        if known:
            round_.metrics["anchor_agreement_mean"] = float(np.mean(known))
            round_.metrics["quality_weight_min"] = float(min(quality))
        round_.version_id = version.id
        round_.state = check_transition(round_.state, RoundState.COMMITTED)
        round_.closed_at = utcnow()
        store.save_round(round_)

        metrics.ROUNDS.labels("committed").inc()
        metrics.AGGREGATION_SECONDS.observe(time.perf_counter() - started)
        if round_.opened_at is not None:
            metrics.ROUND_DURATION.observe((round_.closed_at - round_.opened_at).total_seconds())
        metrics.ROUND_PARTICIPANTS.labels("accepted").set(len(accepted))
        for key, label in (("accuracy", "all"), ("accuracy_image", "image"), ("accuracy_audio", "audio"),
                           ("cloud_accuracy", "cloud")):
            if key in version.metrics:
                metrics.GLOBAL_ACCURACY.labels(label).set(version.metrics[key])
        if "client_accuracy_mean" in round_.metrics:
            metrics.CLIENT_ACCURACY.set(round_.metrics["client_accuracy_mean"])
        log.info("round %d committed: accuracy %.4f from %d update(s)", round_.number,
                 version.metrics.get("accuracy", float("nan")), len(accepted))
        return round_

    def _aggregate(self, federation: Federation, base: dict[str, np.ndarray], updates: list[ClientUpdate],
                   agreements: list[float | None]) -> tuple[dict[str, np.ndarray], list[float]]:
        """The new global tensors and each client's noise factor (1 where there was no evidence)."""
        config = federation.config
        # Peers with the same modality set are compared with each other (see agreement_weights).
        quality = agreement_weights(agreements, config.agreement_temperature,
                                    groups=[frozenset(u.modalities) for u in updates])
        if config.aggregation == "mma":
            weights = mma_weights(updates, quality=quality if any(a is not None for a in agreements) else None)
        else:
            weights = fedavg_weights(updates)
        tensors = apply_delta(base, weighted_average_per_tensor(updates, weights))
        if config.lora_mode == "exact":
            tensors.update(self._exact_lora(base, updates, weights))
        return tensors, quality

    @staticmethod
    def _exact_lora(base: dict[str, np.ndarray], updates: list[ClientUpdate],
                    weights: list[float]) -> dict[str, np.ndarray]:
        """LoRA factors from the average of the clients' full B·A products (updates carry deltas)."""
        full = [ClientUpdate(client_id=u.client_id, num_samples=u.num_samples, modalities=u.modalities,
                             tensors={n: base[n] + t for n, t in u.tensors.items() if n in base})
                for u in updates]
        return average_lora_products(full, weights)

    def _round_metrics(self, federation: Federation, round_: Round, accepted: list[Update],
                       evaluation: dict[str, float]) -> dict[str, float]:
        sizes = [u.declared_size for u in accepted]
        per_client = float(np.mean(sizes)) if sizes else 0.0
        out = {
            "participants": float(len(accepted)),
            "invited": float(len(round_.participants)),
            "global_accuracy": evaluation.get("accuracy", float("nan")),
            "upload_bytes_per_client": per_client,
            "upload_ratio": per_client / full_model_bytes(federation.config.model),
        }
        out.update({(k if k.startswith("cloud_") else f"global_{k}"): v
                    for k, v in evaluation.items() if k != "accuracy"})
        personal = [u.metrics["personal_accuracy"] for u in accepted if "personal_accuracy" in u.metrics]
        if personal:
            out["client_accuracy_mean"] = float(np.mean(personal))
        if round_.opened_at is not None:
            out["wall_s"] = (utcnow() - round_.opened_at).total_seconds()
        return out
