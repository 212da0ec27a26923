"""The composition root: the ports wired into the services, once, for each kind of coordinator process.

``build_services`` is the whole coordinator (devices, rounds, uploads, the admin API's services);
``build_heartbeat_services`` only what the heartbeat process answers heartbeats with (credentials, presence,
refusals), without the learning side's data or the round machinery; ``build_worker_services`` what a cloud
worker runs jobs with.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from server.config import CoordinatorSettings
from server.domain.errors import UnavailableError
from server.learning.anchors import CloudTuner
from server.learning.global_model import GlobalEvaluator
from server.learning.task_data import TaskData
from server.persistence.blobs import FileBlobStore
from server.persistence.database import create_engine_for, migrate
from server.persistence.job_queue import JobQueue, create_huey
from server.persistence.presence import create_presence_store
from server.persistence.revocations import create_revocation_feed
from server.persistence.sql_store import SqlStore
from server.services.admin_tokens import AdminTokenService
from server.services.aggregation import RoundAccumulators
from server.services.audit import AuditService
from server.services.cloud_work import CloudWork
from server.services.context import ServiceContext
from server.services.devices import DeviceService
from server.services.federations import FederationService
from server.services.inspection import RoundInspectionService
from server.services.locks import RoundLocks
from server.services.observations import observe_dependencies
from server.services.public_set import PublicSetService
from server.services.refusals import RefusalRecorder
from server.services.rounds import RoundService
from server.services.uploads import UploadService
from server.services.versions import VersionService
from server.transport.admin_api import AdminServices


def build_context(settings: CoordinatorSettings, task_data: TaskData | None = None, *,
                  migrate_database: bool = True) -> ServiceContext:
    """The ports: the database (migrated unless told not to), the blob store, presence, revocations, and the
    learning side over ``task_data`` (None: a process that never evaluates or tunes, which reads no data)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url()
    if migrate_database:
        migrate(url)
    data = task_data or TaskData(settings.data_dir, settings.eval_setting)  # lazy: nothing is read until used
    return ServiceContext(
        settings=settings,
        store=SqlStore(create_engine_for(url)),
        blobs=FileBlobStore(settings.blob_dir),
        presence=create_presence_store(settings.redis_url, settings.redis_prefix, settings.presence_flush_interval_s),
        evaluator=GlobalEvaluator(data),
        cloud=CloudTuner(data),
        revocations=create_revocation_feed(settings.redis_url, settings.redis_prefix),
    )


@dataclass
class Services:
    ctx: ServiceContext
    federations: FederationService
    devices: DeviceService
    rounds: RoundService
    uploads: UploadService
    versions: VersionService
    refusals: RefusalRecorder
    admin_tokens: AdminTokenService
    audit: AuditService
    inspection: RoundInspectionService
    public_set: PublicSetService
    jobs: JobQueue
    cloud_work: CloudWork

    def admin_services(self) -> AdminServices:
        """What the admin API calls."""
        return AdminServices(self.federations, self.rounds, self.devices, self.versions, self.health,
                             tokens=self.admin_tokens, audit=self.audit, inspection=self.inspection)

    def health(self) -> dict[str, bool]:
        """Whether the database and the presence store answer. Only the database decides readiness:
        it is the source of truth, and without Redis devices still upload and rounds still commit."""
        try:
            self.ctx.store.list_federations()
            database = True
        except UnavailableError:
            database = False
        presence = self.ctx.presence.ping()
        observe_dependencies(database=database, redis=presence)
        return {"ready": database, "database": database, "presence": presence}


def build_services(settings: CoordinatorSettings, wake: asyncio.Event | None = None,
                   loop: asyncio.AbstractEventLoop | None = None, *, changed: asyncio.Event | None = None,
                   migrate_database: bool = True) -> Services:
    """Migrates the database (unless told not to) and wires every service. On ``loop``: ``wake`` is set when
    an update is accepted, ``changed`` when an admin action changed what devices are told (a round
    launched, a federation paused, resumed or stopped)."""
    task_data = TaskData(settings.data_dir, settings.eval_setting, settings.task_data)
    ctx = build_context(settings, task_data, migrate_database=migrate_database)
    locks = RoundLocks()
    accumulators = RoundAccumulators()  # running sums of the rounds this replica accepts updates for

    def on_accepted(_round_id: str) -> None:
        if wake is not None and loop is not None:
            loop.call_soon_threadsafe(wake.set)

    def on_change() -> None:
        if changed is not None and loop is not None:
            loop.call_soon_threadsafe(changed.set)

    federations = FederationService(ctx, on_change)
    jobs = JobQueue(create_huey(ctx.settings.resolved_database_url()))
    cloud_work = CloudWork(ctx, jobs)
    return Services(
        ctx=ctx,
        federations=federations,
        devices=DeviceService(ctx, federations),
        rounds=RoundService(ctx, federations, locks, accumulators, on_change, cloud=cloud_work),
        uploads=UploadService(ctx, locks, on_accepted, accumulators),
        versions=VersionService(ctx, federations),
        refusals=RefusalRecorder(ctx.store, record_interval_s=settings.refusal_record_interval_s),
        admin_tokens=AdminTokenService(ctx.store),
        audit=AuditService(ctx.store),
        inspection=RoundInspectionService(ctx),
        public_set=PublicSetService(ctx, task_data),
        jobs=jobs,
        cloud_work=cloud_work,
    )


@dataclass
class WorkerServices:
    """What a cloud worker needs: the ports (the learning side's data included) and the queue it serves."""

    ctx: ServiceContext
    jobs: JobQueue
    cloud_work: CloudWork


def build_worker_services(settings: CoordinatorSettings) -> WorkerServices:
    """A worker's services, on a database a coordinator has migrated already."""
    task_data = TaskData(settings.data_dir, settings.eval_setting, settings.task_data)
    ctx = build_context(settings, task_data, migrate_database=False)
    jobs = JobQueue(create_huey(settings.resolved_database_url()))
    cloud_work = CloudWork(ctx, jobs)
    jobs.serve_with(cloud_work.run)
    return WorkerServices(ctx, jobs, cloud_work)


@dataclass
class HeartbeatServices:
    """What the heartbeat process needs: credentials and presence (``devices``) and the refusal record."""

    ctx: ServiceContext
    devices: DeviceService
    refusals: RefusalRecorder


def build_heartbeat_services(settings: CoordinatorSettings) -> HeartbeatServices:
    """The heartbeat process's services, on a database the coordinator has migrated already."""
    ctx = build_context(settings, migrate_database=False)
    return HeartbeatServices(
        ctx=ctx,
        devices=DeviceService(ctx, FederationService(ctx)),
        refusals=RefusalRecorder(ctx.store, record_interval_s=settings.refusal_record_interval_s),
    )
