"""The cloud job queue (huey on the coordinator's database), on SQLite and PostgreSQL: a job put on the queue by
one process's JobQueue is run by a consumer, queue depth counts it until then, and processes starting together
on a fresh PostgreSQL database create huey's tables without tripping over each other."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from server.persistence.job_queue import JobQueue, create_huey, jobs_file


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'coordinator.db'}"
    make: Callable[[], str] = request.getfixturevalue("make_postgres_database")
    return make()


def test_a_job_queued_by_one_process_is_run_by_a_consumer_and_counted_until_then(database_url: str) -> None:
    producer = JobQueue(create_huey(database_url))  # the coordinator's side: it only queues
    producer.enqueue("version-1")
    producer.enqueue("version-2")
    assert producer.depth() == 2

    ran: list[str] = []
    worker = JobQueue(create_huey(database_url))  # a worker's side, on the same database
    worker.serve_with(ran.append)
    consumer = worker.consumer(1, embedded=True)
    consumer.start()
    try:
        deadline = time.monotonic() + 20
        while len(ran) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        consumer.stop(graceful=True)
    assert ran == ["version-1", "version-2"]
    assert producer.depth() == 0
    producer.close()
    worker.close()


def test_a_job_that_raises_is_retried(database_url: str) -> None:
    queue = JobQueue(create_huey(database_url))
    attempts: list[float] = []

    def flaky(version_id: str) -> None:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise RuntimeError("the database blinked")

    queue.serve_with(flaky)
    queue.enqueue("version-1")
    consumer = queue.consumer(1, embedded=True)
    consumer.start()
    try:
        deadline = time.monotonic() + 30
        while len(attempts) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        consumer.stop(graceful=True)
    assert len(attempts) == 2 and attempts[1] - attempts[0] >= 1.5  # retried after its delay
    queue.close()


def test_the_embedded_queue_lives_beside_the_embedded_database(tmp_path: Path) -> None:
    assert jobs_file(f"sqlite:///{tmp_path / 'coordinator.db'}") == tmp_path / "coordinator-jobs.sqlite"
    assert jobs_file("sqlite://") is None  # in memory: a queue in memory too
    with pytest.raises(ValueError, match="mysql"):
        create_huey("mysql://u@h/db")


@pytest.mark.postgres
def test_processes_starting_together_on_a_fresh_database_all_get_the_queue(make_postgres_database) -> None:
    url = make_postgres_database()
    failures: list[BaseException] = []
    made: list[JobQueue] = []

    def start() -> None:
        try:
            made.append(JobQueue(create_huey(url)))
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert all(queue.depth() == 0 for queue in made)
    for queue in made:
        queue.close()
