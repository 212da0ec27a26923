"""Opening rounds, telling devices what to do, and driving rounds to commit or failure.

Scheduling is per federation (``FederationConfig.mode``):

* ``sync``: a round invites devices (over-selected), commits once its target of updates arrived, or
  once the quorum is met and the missing devices are offline, or at the deadline with the quorum; it
  fails at the deadline without one. Uploads after the round closed are refused as late.
* ``async``: a round is a buffer that any eligible device feeds; every ``async_buffer`` accepted updates
  are aggregated with staleness discounts (FedBuff) and the next buffer opens at once.

With several replicas, each federation is driven by whichever replica holds its lease; the lease's
fencing token is checked in the transactions that move or commit a round (``server.domain.ports``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta

import numpy as np

from mlecs.codec import decode_tensors
from server import metrics
from server.domain.assignments import Assignment, StopAssignment, TrainAssignment, WaitAssignment, WorkMarker
from server.domain.errors import (
    ConflictError,
    InvalidRequestError,
    LeaseLostError,
    PermissionDeniedError,
    UnavailableError,
)
from server.domain.federation_config import FederationConfig
from server.domain.models import (
    CloudState,
    Device,
    DeviceReport,
    Federation,
    FederationState,
    Fence,
    Round,
    Update,
    UpdateState,
    reported_metrics_problem,
    utcnow,
)
from server.domain.rounds import RoundState, check_transition
from server.domain.scheduling import Action, Decision, decide, invitation_count, select_participants
from server.learning.global_model import full_model_bytes
from server.services import staging
from server.services.aggregation import RoundAccumulators, aggregate, version_staleness
from server.services.cloud_work import CloudWork
from server.services.context import ServiceContext
from server.services.federations import FederationService
from server.services.leases import lease_kept
from server.services.locks import RoundLocks
from server.services.observations import observe_round

log = logging.getLogger(__name__)

WAIT_S = 2


def _accepted_blob(update: Update) -> str:
    if update.blob_key is None:  # accepted rows always carry their blob; anything else is corruption
        raise RuntimeError(f"accepted update {update.id} has no blob")
    return update.blob_key


def federation_lease(federation_id: str) -> str:
    return f"federation:{federation_id}"


class RoundService:
    def __init__(self, ctx: ServiceContext, federations: FederationService, locks: RoundLocks,
                 accumulators: RoundAccumulators | None = None, on_change: Callable[[], None] = lambda: None, *,
                 cloud: CloudWork | None = None) -> None:
        self._ctx = ctx
        self._cloud = cloud or CloudWork(ctx, queue=None)
        self._on_change = on_change  # told after an admin launch, so that held task polls hear of it at once
        self._federations = federations
        self._locks = locks
        self._accumulators = accumulators or RoundAccumulators()
        self._fences: dict[str, Fence] = {}

    # ---- admin side -------------------------------------------------------------------------

    def start(self, federation_ref: str) -> Round:
        """Opens the next round now (admin launch); ConflictError says why it cannot."""
        round_ = self._open_next(self._federations.get(federation_ref))
        self._on_change()
        return round_

    def get(self, round_id: str) -> Round:
        return self._ctx.store.get_round(round_id)

    def list_for(self, federation_ref: str) -> list[Round]:
        return self._ctx.store.list_rounds(self._federations.get(federation_ref).id)

    def _open_next(self, federation: Federation) -> Round:
        store = self._ctx.store
        if federation.state is FederationState.PAUSED:
            raise ConflictError(f"federation {federation.name!r} is paused; resume it to open rounds")
        if federation.state is not FederationState.ACTIVE:
            raise ConflictError(f"federation {federation.name!r} is {federation.state}; start a new one")
        latest = store.latest_round(federation.id)
        if latest is not None and not latest.state.is_terminal:
            raise ConflictError(f"round {latest.number} is still {latest.state}; wait for it to finish")
        config = federation.config
        if federation.current_version_id is not None:
            current = store.get_version(federation.current_version_id)
            if current.anchors_key is None:
                raise ConflictError(f"federation {federation.name!r} waits for the anchors of version "
                                    f"{current.round_number} (anchors = \"wait\"): its cloud job is "
                                    f"{current.cloud_state} after {current.cloud_attempts} attempt(s)")
        devices = [d for d in store.list_devices(federation.id) if not d.revoked and config.eligible(d.modalities)]
        online = self._ctx.presence.online(d.id for d in devices)
        live = [(d.id, frozenset(d.modalities)) for d in devices if d.id in online]
        if len(live) < config.min_updates:
            raise ConflictError(
                f"{len(live)} live eligible device(s) but the quorum is {config.min_updates}; "
                "start agents, lower min_updates or widen eligible_modality_sets")
        number = 1 if latest is None else latest.number + 1
        if config.mode == "async":
            participants, target = sorted(d for d, _ in live), config.async_buffer
        else:
            invite, target = invitation_count(len(live), config.clients_per_round, config.overselect)
            participants = select_participants(live, invite, seed=config.seed * 100_003 + number)
        round_ = Round(federation_id=federation.id, number=number, participants=participants,
                       target_updates=target, base_version_id=federation.current_version_id)
        round_.state = check_transition(round_.state, RoundState.OPEN)
        round_.opened_at = utcnow()
        round_.deadline_at = round_.opened_at + timedelta(seconds=config.round_deadline_s)
        store.add_round(round_)  # a unique (federation, number) index: two replicas cannot both open it
        metrics.ROUND_PARTICIPANTS.labels(federation.name, "invited").set(len(participants))
        metrics.ROUND_PARTICIPANTS.labels(federation.name, "target").set(target)
        log.info("round %d of %s opened (%s): %d participant(s), target %d", number, federation.name,
                 config.mode, len(participants), target)
        return round_

    # ---- device side ------------------------------------------------------------------------

    def assignment_for(self, device: Device) -> Assignment:
        """Train the open round the device may join, wait, or stop when the federation has."""
        view = self._ctx.store.task_view(device.federation_id, device.id)
        federation, latest = view.federation, view.latest_round
        if federation.state is FederationState.STOPPED:
            return StopAssignment(reason=f"federation {federation.name} stopped")
        if federation.state is FederationState.COMPLETED:
            return StopAssignment(reason=f"federation {federation.name} completed its "
                                         f"{federation.config.target_rounds} rounds")
        if federation.state is FederationState.PAUSED:
            return WaitAssignment(WAIT_S, f"federation {federation.name} paused")
        if latest is None or not latest.state.accepts_uploads:
            return WaitAssignment(WAIT_S, "no open round")
        if not self.may_contribute(federation.config, latest, device):
            return WaitAssignment(WAIT_S, f"not a participant of round {latest.number}")
        if view.accepted:
            return WaitAssignment(WAIT_S, f"update for round {latest.number} already accepted")
        return TrainAssignment(round=latest, config=federation.config)

    @staticmethod
    def may_contribute(config: FederationConfig, round_: Round, device: Device) -> bool:
        """Sync rounds take updates from their invited devices; async buffers from any eligible device."""
        if round_.federation_id != device.federation_id:
            return False
        if config.mode == "async":
            return not device.revoked and config.eligible(frozenset(device.modalities))
        return device.id in round_.participants

    def record_report(self, device: Device, round_id: str, values: dict[str, float]) -> None:
        """Stores metrics a device reports for a round it took part in."""
        store = self._ctx.store
        round_ = store.get_round(round_id)
        contributed = bool(store.accepted_devices(round_id, device.id))
        if round_.federation_id != device.federation_id or not (contributed or device.id in round_.participants):
            raise PermissionDeniedError(f"device did not take part in round {round_.number}")
        problem = reported_metrics_problem(values)
        if problem:
            raise InvalidRequestError(problem)
        store.add_device_report(DeviceReport(round_id=round_id, device_id=device.id, metrics=values))

    # ---- scheduler side ---------------------------------------------------------------------

    def advance_all(self) -> None:
        """One scheduler tick, federation after federation: ``survey``, then ``drive_one`` for each. The
        coordinator drives federations side by side instead (``server.background.FederationDrivers``), so that
        one federation's aggregation never holds another's round."""
        for federation in self.survey():
            self.drive_one(federation)

    def survey(self) -> list[Federation]:
        """The start of a scheduler tick: refreshes the round gauges, drops the running sums of rounds that
        finished, and returns the federations to drive."""
        store = self._ctx.store
        unfinished = store.list_unfinished_rounds()
        self._accumulators.keep_only({r.id for r in unfinished})
        for state in (s for s in RoundState if not s.is_terminal):
            metrics.ROUNDS_IN_STATE.labels(state.value).set(sum(r.state is state for r in unfinished))
        return store.list_federations()

    def drive_one(self, federation: Federation) -> None:
        """Moves the federation's unfinished round on by one decision and opens the next round when the
        federation wants one, if this replica holds (or wins) its lease. Raises UnavailableError only."""
        try:
            self._drive(federation)
        except LeaseLostError as exc:
            log.warning("stopped driving %s: %s", federation.name, exc)
            self._fences.pop(federation.id, None)
        except UnavailableError:
            raise
        except Exception:  # one broken federation must not stall the others
            log.exception("could not advance the rounds of %s", federation.name)

    def activity_marker(self) -> WorkMarker:
        """The rounds taking uploads and the federations paused or stopped, whichever replica changed them;
        held long polls wake when it has news (``WorkMarker.has_news_since``)."""
        store = self._ctx.store
        open_rounds = frozenset(r.id for r in store.list_unfinished_rounds() if r.state.accepts_uploads)
        halted = frozenset(f"{f.id}:{f.state.value}" for f in store.list_federations()
                           if f.state is not FederationState.ACTIVE)
        return WorkMarker(open_rounds, halted)

    def release_leases(self) -> None:
        """Hands this replica's leases back (at shutdown) so another replica takes over at once."""
        for fence in list(self._fences.values()):
            try:
                self._ctx.store.release_lease(fence)
            except UnavailableError as exc:
                log.warning("could not release lease %s: %s", fence.lease, exc)
        self._fences.clear()

    def _drive(self, federation: Federation) -> None:
        store = self._ctx.store
        latest = store.latest_round(federation.id)
        unfinished = latest is not None and not latest.state.is_terminal
        if not unfinished and not self._wants_next(federation):
            if self._target_reached(federation):
                self._complete(federation)
            return
        settings = self._ctx.settings
        # A lease this process does not hold yet may be its own from before a restart (the replica id is stable
        # per host and port): it is taken back at once, with a new token, instead of waiting for it to expire.
        fence = store.acquire_lease(federation_lease(federation.id), settings.replica_id, settings.lease_ttl_s,
                                    reclaim=federation.id not in self._fences)
        if fence is None:
            self._fences.pop(federation.id, None)
            return  # another replica drives this federation
        if self._fences.get(federation.id) != fence:
            log.info("driving federation %s (lease token %d)", federation.name, fence.token)
        self._fences[federation.id] = fence
        metrics.LEASES_HELD.set(len(self._fences))
        if unfinished:
            assert latest is not None
            latest = self.advance(latest.id, fence)
        if latest is None or latest.state.is_terminal:
            federation = store.get_federation(federation.id)
            if self._target_reached(federation):
                self._complete(federation)
            elif self._wants_next(federation):
                try:
                    self._open_next(federation)
                except ConflictError as exc:
                    log.debug("next round of %s not opened yet: %s", federation.name, exc)

    def _target_reached(self, federation: Federation) -> bool:
        """Whether an active federation with a ``target_rounds`` has committed that many rounds."""
        target = federation.config.target_rounds
        if federation.state is not FederationState.ACTIVE or target == 0:
            return False
        return sum(r.state is RoundState.COMMITTED for r in self._ctx.store.list_rounds(federation.id)) >= target

    def _complete(self, federation: Federation) -> None:
        """Ends a federation that reached its target: its devices are told to stop at their next poll."""
        try:
            self._ctx.store.set_federation_state(federation.id, FederationState.COMPLETED)
        except ConflictError:
            return  # stopped meanwhile, or completed by another replica
        log.info("federation %s completed its %d rounds; its devices are told to stop", federation.name,
                 federation.config.target_rounds)
        self._on_change()

    def _wants_next(self, federation: Federation) -> bool:
        """Whether the scheduler opens rounds by itself: async buffers always, sync up to target_rounds."""
        config = federation.config
        if federation.state is not FederationState.ACTIVE:
            return False
        if config.mode == "sync" and config.target_rounds == 0:
            return False
        if config.target_rounds == 0:
            return True
        committed = sum(r.state is RoundState.COMMITTED for r in self._ctx.store.list_rounds(federation.id))
        return committed < config.target_rounds

    def advance(self, round_id: str, fence: Fence | None = None) -> Round:
        """Commits, fails or leaves the round as it is, by the rules of ``server.domain.scheduling``. A round
        that closes takes its unfinished uploads with it (``staging.expire_partials``)."""
        store = self._ctx.store
        with self._locks(round_id):
            round_ = store.get_round(round_id)
            federation = store.get_federation(round_.federation_id)
            if round_.state.is_terminal:
                return round_
            if federation.state is FederationState.STOPPED:
                return self._fail(round_, "federation stopped", fence)
            if round_.state is not RoundState.AGGREGATING:  # AGGREGATING: an interrupted attempt, redo it
                decision = self._decide(federation, round_)
                if decision.action is Action.WAIT:
                    return round_
                if decision.action is Action.FAIL:
                    return self._fail(round_, decision.reason, fence)
                log.info("round %d of %s closes: %s", round_.number, federation.name, decision.reason)
                if round_.state is RoundState.OPEN:
                    round_.state = check_transition(round_.state, RoundState.COLLECTING)
                round_.state = check_transition(round_.state, RoundState.AGGREGATING)
                store.save_round(round_, fence)
            # Listed after the round stopped taking uploads: no acceptance can slip in after this read.
            accepted = [u for u in store.list_updates(round_.id) if u.state is UpdateState.ACCEPTED]
            try:
                if fence is None:
                    return self._commit(federation, round_, accepted, None)
                with lease_kept(store, fence, self._ctx.settings.lease_ttl_s):
                    return self._commit(federation, round_, accepted, fence)
            except (LeaseLostError, UnavailableError):
                raise  # not the round's fault: whoever holds the lease next retries the aggregation
            except Exception as exc:
                log.exception("aggregation of round %d failed", round_.number)
                return self._fail(round_, f"aggregation failed: {exc}", fence)

    def _decide(self, federation: Federation, round_: Round) -> Decision:
        store, config = self._ctx.store, federation.config
        accepted = store.accepted_devices(round_.id)
        past_deadline = round_.deadline_at is not None and utcnow() >= round_.deadline_at
        pending_online: int | None = None
        if config.mode == "sync":
            missing = [d for d in round_.participants if d not in accepted]
            try:
                pending_online = len(self._ctx.presence.online(missing))
            except UnavailableError:
                pending_online = None  # without presence we cannot tell who is gone: keep waiting
        target = round_.update_target
        return decide(accepted=len(accepted), target=target, min_updates=config.min_updates,
                      past_deadline=past_deadline, pending_online=pending_online)

    def _fail(self, round_: Round, reason: str, fence: Fence | None) -> Round:
        round_.state = check_transition(round_.state, RoundState.FAILED)
        round_.failure_reason = reason
        round_.closed_at = utcnow()
        self._ctx.store.save_round(round_, fence)
        metrics.ROUNDS.labels("failed").inc()
        log.warning("round %d failed: %s", round_.number, reason)
        staging.expire_partials(self._ctx, round_)
        return round_

    def _staleness(self, round_: Round, updates: list[Update]) -> list[int]:
        """Versions between each update's base and the round's (0 for every update of a sync round)."""
        versions = [v.id for v in self._ctx.store.list_versions(round_.federation_id)]
        return [version_staleness(versions, round_.base_version_id, u.base_version_id) for u in updates]

    def _commit(self, federation: Federation, round_: Round, accepted: list[Update], fence: Fence | None) -> Round:
        started = time.perf_counter()
        store, blobs = self._ctx.store, self._ctx.blobs
        assert round_.base_version_id is not None
        base_version = store.get_version(round_.base_version_id)
        config = federation.config
        base = decode_tensors(blobs.get(base_version.adapter_key))
        staleness = self._staleness(round_, accepted)
        settings = self._ctx.settings
        result = aggregate(config, base, accepted, staleness, lambda u: blobs.get(_accepted_blob(u)),
                           accumulator=self._accumulators.take(round_.id), spill_dir=settings.state_dir / "spill",
                           block_bytes=settings.robust_block_bytes)
        # The cloud's work (tuning, anchors, evaluation) is the version's job, run by a worker after the commit.
        version = self._federations.store_version(federation.id, round_.number, result.tensors, anchors=None)
        self._cloud.prepare(federation, version, result.fused, base_version)

        round_.metrics = self._round_metrics(federation, round_, accepted)
        if any(u.anchor_agreement is not None for u in accepted):
            round_.metrics["anchor_agreement_mean"] = float(np.mean(
                [u.anchor_agreement for u in accepted if u.anchor_agreement is not None]))
            round_.metrics["quality_weight_min"] = float(min(result.quality))
        if config.max_weight_ratio:
            round_.metrics["weight_capped"] = float(len(result.capped_devices))
            if result.capped_devices:
                log.warning("round %d: sample counts of %s capped at %g times the round's median",
                            round_.number, ", ".join(result.capped_devices), config.max_weight_ratio)
        if config.robust_rule != "none":
            round_.metrics["robust_excluded"] = float(len(result.excluded_devices))
            # Capped: a score is infinite when most updates coincide, and JSON columns take no infinity.
            round_.metrics["anomaly_score_max"] = min(max(result.anomaly_scores.values(), default=0.0), 1e6)
            # The direction check's view: below 0 some update pointed away from the median (a sign flip).
            round_.metrics["centre_cosine_min"] = min(result.centre_cosines.values(), default=1.0)
            if result.excluded_devices:
                log.warning("round %d: left out %d outlier update(s) from %s", round_.number,
                            len(result.excluded_devices), ", ".join(result.excluded_devices))
        if config.mode == "async":
            round_.metrics["staleness_mean"] = float(np.mean(staleness)) if staleness else 0.0
            round_.metrics["staleness_max"] = float(max(staleness, default=0))
        round_.version_id = version.id
        round_.state = check_transition(round_.state, RoundState.COMMITTED)
        round_.closed_at = utcnow()
        store.commit_round(round_, version, fence)  # one transaction, refused if the lease moved on
        federation.current_version_id = version.id
        self._cloud.enqueue(version)

        self._observe_commit(federation.name, round_, accepted, time.perf_counter() - started)
        observe_round(federation.name, config, accepted, staleness)
        log.info("round %d of %s committed from %d update(s)%s", round_.number, federation.name, len(accepted),
                 "; its cloud work is queued" if version.cloud_state is CloudState.PENDING else "")
        staging.expire_partials(self._ctx, round_)
        return round_

    @staticmethod
    def _observe_commit(federation: str, round_: Round, accepted: list[Update], seconds: float) -> None:
        metrics.ROUNDS.labels("committed").inc()
        metrics.AGGREGATION_SECONDS.observe(seconds)
        if round_.opened_at is not None and round_.closed_at is not None:
            metrics.ROUND_DURATION.observe((round_.closed_at - round_.opened_at).total_seconds())
        metrics.ROUND_PARTICIPANTS.labels(federation, "accepted").set(len(accepted))
        metrics.ROUND_PARTICIPANTS.labels(federation, "stragglers").set(round_.metrics.get("stragglers", 0))
        if "client_accuracy_mean" in round_.metrics:
            metrics.CLIENT_ACCURACY.labels(federation).set(round_.metrics["client_accuracy_mean"])

    def _round_metrics(self, federation: Federation, round_: Round, accepted: list[Update]) -> dict[str, float]:
        """What the commit knows of the round; the version's evaluation joins it when its cloud job is done."""
        sizes = [u.declared_size for u in accepted]
        per_client = float(np.mean(sizes)) if sizes else 0.0
        contributors = {u.device_id for u in accepted}
        out = {
            "participants": float(len(accepted)),
            "invited": float(len(round_.participants)),
            "target": float(round_.target_updates or len(round_.participants)),
            "upload_bytes_per_client": per_client,
            "upload_ratio": per_client / full_model_bytes(federation.config.model),
        }
        if federation.config.mode == "sync":
            out["stragglers"] = float(sum(d not in contributors for d in round_.participants))
        personal = [u.metrics["personal_accuracy"] for u in accepted if "personal_accuracy" in u.metrics]
        if personal:
            out["client_accuracy_mean"] = float(np.mean(personal))
        if round_.opened_at is not None:
            out["wall_s"] = (utcnow() - round_.opened_at).total_seconds()
        return out
