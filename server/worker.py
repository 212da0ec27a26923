"""The cloud worker role (``mlecs-coordinator worker``): runs the cloud jobs coordinators put on the queue.

Same package and settings as the coordinator, scaled apart from it: coordinator replicas serve devices and
commit rounds; workers tune the cloud model, generate anchors and evaluate versions (``server.services
.cloud_work``). A worker reads the database and blob store the coordinators write, and the public set and
test split (``MLECS_DATA_DIR``, ``MLECS_TASK_DATA``). SIGTERM stops it after the jobs it is running; SIGINT, a
second SIGTERM or SIGKILL stops it at once, and the coordinator queues those jobs again.
"""

from __future__ import annotations

import logging
import threading

from server import metrics
from server.composition import build_worker_services
from server.config import CoordinatorSettings
from server.persistence.database import current_revision, head_revision

log = logging.getLogger("mlecs.worker")

DEPTH_INTERVAL_S = 5.0


def run_worker(settings: CoordinatorSettings) -> None:
    """Serves cloud jobs until SIGTERM or SIGINT."""
    url = settings.resolved_database_url()
    try:
        revision = current_revision(url)
    except Exception as exc:  # unreachable, or no database file where MLECS_STATE_DIR points
        raise RuntimeError(f"cannot read the coordinator's database ({type(exc).__name__}): set MLECS_DATABASE_URL "
                           "(or MLECS_STATE_DIR, for the embedded one) to the coordinator's, and migrate it") from exc
    if revision != head_revision():
        raise RuntimeError("the database is not migrated to this version's schema: run `mlecs-coordinator "
                           "migrate` (or start a coordinator, which migrates it) before starting workers")
    services = build_worker_services(settings)
    if settings.worker_metrics_port:
        metrics.serve_http(settings.admin_host, settings.worker_metrics_port)
    stop = threading.Event()

    def observe_depth() -> None:
        while not stop.wait(DEPTH_INTERVAL_S):
            try:
                metrics.CLOUD_QUEUE_DEPTH.set(services.jobs.depth())
            except Exception as exc:  # a gauge is not worth the worker
                log.debug("queue depth not read: %s", exc)

    threading.Thread(target=observe_depth, name="queue-depth", daemon=True).start()
    consumer = services.jobs.consumer(settings.cloud_workers, embedded=False)
    log.info("cloud worker serving the job queue with %d thread(s)", settings.cloud_workers)
    try:
        consumer.run()  # returns after SIGTERM (once running jobs finished) or SIGINT
    finally:
        stop.set()
        services.jobs.close()
        services.ctx.presence.close()
        services.ctx.revocations.close()
