"""The durable queue cloud jobs travel on: huey, with its storage in the coordinator's own database.

huey keeps its queue in PostgreSQL (``PostgresHuey``, psycopg 3, woken by LISTEN/NOTIFY) when the coordinator
runs on PostgreSQL, and in an SQLite file beside the embedded database otherwise, so a deployment gains no
new service and ``mlecs fleet`` needs nothing installed. huey takes a job off the queue when a worker starts
it; a worker that dies mid-job loses that copy, which is why the versions themselves record the work they owe
(``server.services.cloud_work`` puts a stale job on the queue again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from huey import Huey, MemoryHuey, PostgresHuey, SqliteHuey
from huey.consumer import Consumer
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

QUEUE_NAME = "mlecs-cloud"
TABLE_PREFIX = "mlecs_jobs"
_SCHEMA_LOCK = 0x6D6C6563_6A6F6273 & 0x7FFFFFFFFFFFFFFF
"""The advisory lock key held while huey creates its tables ("mlecjobs")."""
RETRIES = 2
"""Quick retries of a job that raised (a database hiccup), 2 s then 4 s later, before the version's attempts
decide (``cloud_job_attempts``)."""


def jobs_file(database_url: str) -> Path | None:
    """The SQLite file of the embedded queue: beside the SQLite database (None for an in-memory one)."""
    database = make_url(database_url).database
    if not database or database == ":memory:":
        return None
    path = Path(database)
    return path.with_name(f"{path.stem}-jobs.sqlite")


def create_huey(database_url: str) -> Huey:
    """huey on the coordinator's database: PostgreSQL (its own ``mlecs_jobs_*`` tables) or an SQLite file."""
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        # huey creates its tables if they do not exist; coordinators and workers starting together on a fresh
        # database would race on that (PostgreSQL's CREATE TABLE IF NOT EXISTS is not safe concurrently).
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
            try:
                return PostgresHuey(QUEUE_NAME, dsn=dsn, table_prefix=TABLE_PREFIX, results=False, utc=True)
            finally:
                connection.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))
    if url.get_backend_name() != "sqlite":
        raise ValueError(f"no job queue for a {url.get_backend_name()} database (PostgreSQL or SQLite)")
    path = jobs_file(database_url)
    if path is None:
        return MemoryHuey(QUEUE_NAME, results=False, utc=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteHuey(QUEUE_NAME, filename=str(path), results=False, utc=True)


class _EmbeddedConsumer(Consumer):  # type: ignore[misc]
    """A consumer inside another process (the coordinator): it leaves that process's signal handlers alone."""

    def _set_signal_handlers(self) -> None:
        pass


class JobQueue:
    """The cloud job on huey. Every process registers the job (to put it on the queue); a worker also sets what
    running it does (``serve_with``)."""

    def __init__(self, huey: Huey) -> None:
        self.huey = huey
        self._runner: Callable[[str], None] | None = None
        self._task = huey.task(retries=RETRIES, retry_delay=2, retry_backoff=2, name="cloud_work")(self._run)

    def _run(self, version_id: str) -> None:
        if self._runner is None:
            raise RuntimeError("this process puts cloud jobs on the queue but runs none (no worker here)")
        self._runner(version_id)

    def enqueue(self, version_id: str) -> None:
        self._task(version_id)

    def depth(self) -> int:
        """Jobs waiting: queued now, or scheduled for a retry."""
        return int(self.huey.pending_count()) + int(self.huey.scheduled_count())

    def serve_with(self, runner: Callable[[str], None]) -> None:
        self._runner = runner

    def consumer(self, workers: int, *, embedded: bool) -> Any:
        """A huey consumer of ``workers`` threads; ``embedded``: one that starts inside another process and
        is stopped by it (``stop(graceful=True)``), not by signals."""
        options: dict[str, Any] = {"workers": workers, "worker_type": "thread", "periodic": False,
                                   "initial_delay": 0.1, "max_delay": 1.0}
        if embedded:
            return _EmbeddedConsumer(self.huey, **options)
        # SIGTERM (what Kubernetes and compose send) lets running jobs finish; a second one, or SIGINT, does not.
        return self.huey.create_consumer(graceful_signal="TERM", **options)

    def close(self) -> None:
        self.huey.storage.close()
