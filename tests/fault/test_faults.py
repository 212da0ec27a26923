"""Fault proof: the federation completes through crashes and outages, and the database accounts for
every update a device was told is accepted (``check_accounting``).

Everything runs as separate processes on the real PostgreSQL and Redis: coordinator replicas
(``python -m server serve``) and devices (``tests.fault.device``, or the real agent where it matters).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from mlecs.datasets.export_avmnist import export_avmnist
from server.domain.models import CloudState
from server.domain.rounds import RoundState
from server.persistence.database import create_engine_for
from tests.fault.cluster import Cluster, Process, check_accounting, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.fault]

MODALITY_SETS = ["audio,image", "image", "audio"]
RECOVERY_TARGET_S = 3.0
"""Issue 19's target for a coordinator's recovery (restart to the next accepted upload)."""


@pytest.fixture
def cluster(make_postgres_database: Callable[[], str], redis_prefix: str, tmp_path: Path) -> Iterator[Cluster]:
    from tests.conftest import REDIS_URL

    made = Cluster(database_url=make_postgres_database(), redis_url=REDIS_URL, redis_prefix=redis_prefix,
                   root=tmp_path)
    try:
        yield made
    finally:
        made.shutdown()


def _fleet(cluster: Cluster, federation: str, count: int, coordinator: str | None = None,
           train_s: float = 0.3) -> None:
    for i in range(count):
        cluster.add_device(f"dev-{i}", federation, MODALITY_SETS[i % 3], coordinator=coordinator, train_s=train_s)


def _collecting(cluster: Cluster, federation: str, min_accepted: int = 1, timeout_s: float = 120) -> None:
    """Waits until a round is collecting with some updates accepted: the middle of a round."""
    try:
        wait_until(lambda: cluster.round_in_state(federation, RoundState.COLLECTING, min_accepted), timeout_s,
                   "a round collecting updates", interval_s=0.02)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()}") from None


def test_sigkill_of_the_coordinator_while_collecting_loses_no_acknowledged_update(cluster: Cluster) -> None:
    replica = cluster.add_replica()
    cluster.create_federation("f", target_rounds=4, min_updates=4)
    _fleet(cluster, "f", 4, train_s=0.5)
    cluster.wait_for_rounds("f", 1)
    _collecting(cluster, "f")
    replica.process.kill()
    time.sleep(1)
    replica.start()  # same ports: the devices reconnect by themselves
    cluster.wait_for_rounds("f", 4)
    counts = check_accounting(cluster, "f", 4)
    assert counts["acknowledged"] >= 12  # most of the 16 updates were acknowledged to a device


def test_a_coordinator_killed_mid_round_accepts_uploads_again_soon_after_its_restart(cluster: Cluster) -> None:
    """Recovery time, reported (printed, in ``recovery.json``, and as a warning over the target): from starting
    the killed coordinator again to the next update it accepts. The devices retry as soon as their connection
    comes back, the upload path loads no model, and the restarted replica (same replica id) takes its lease
    back at once. Nothing acknowledged is lost or doubled."""
    replica = cluster.add_replica()
    cluster.create_federation("f", target_rounds=3, min_updates=4)
    _fleet(cluster, "f", 4, train_s=0.5)
    cluster.wait_for_rounds("f", 1)
    _collecting(cluster, "f")
    replica.process.kill()
    time.sleep(3)  # long enough for the devices' retries to back off
    restarted = datetime.now(UTC)
    replica.start()
    serving_s = (datetime.now(UTC) - restarted).total_seconds()  # process start to /readyz answering

    def first_accepted_since_restart() -> datetime | None:
        with cluster.store() as store:
            fed = store.find_federation_by_name("f")
            assert fed is not None
            times = [u.accepted_at for r in store.list_rounds(fed.id) for u in store.list_updates(r.id)
                     if u.accepted_at is not None and u.accepted_at > restarted]
        return min(times, default=None)

    accepted = wait_until(first_accepted_since_restart, 60, "an update accepted after the restart", interval_s=0.1)
    recovery_s = (accepted - restarted).total_seconds()
    report = {"recovery_s": round(recovery_s, 3), "serving_s": round(serving_s, 3), "devices": 4,
              "killed": "collecting"}
    (cluster.root / "recovery.json").write_text(json.dumps(report))
    print(f"coordinator recovery: {recovery_s:.2f} s from restart to the next accepted upload "
          f"(serving after {serving_s:.2f} s)")
    if recovery_s > RECOVERY_TARGET_S:  # a timing, so reported rather than failed on (a busy machine is slower)
        warnings.warn(f"coordinator recovery took {recovery_s:.2f} s, over the {RECOVERY_TARGET_S:g} s target: "
                      f"{report}", stacklevel=1)
    cluster.wait_for_rounds("f", 3)
    check_accounting(cluster, "f", 3)


def test_sigkill_of_the_coordinator_while_aggregating_commits_the_round_exactly_once(cluster: Cluster) -> None:
    # The weighted median over a larger adapter (spilled to disk, reduced in blocks) makes aggregation long
    # enough to be caught in the act; the cloud's work is no longer part of it.
    replica = cluster.add_replica(robust_block_bytes=str(1024 * 1024))
    cluster.create_federation("f", target_rounds=3, min_updates=3, robust_rule="median",
                              model={"backbone": "tiny", "feature_dim": 512, "fused_dim": 2048},
                              max_chunk_bytes=1024 * 1024)
    _fleet(cluster, "f", 3)
    cluster.wait_for_rounds("f", 1)
    try:
        aggregating = wait_until(lambda: cluster.round_in_state("f", RoundState.AGGREGATING), 120,
                                 "a round aggregating", interval_s=0.01)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()}") from None
    replica.process.kill()
    assert cluster.round_in_state("f", RoundState.AGGREGATING).id == aggregating.id  # killed mid-aggregation
    replica.start()
    cluster.wait_for_rounds("f", 3, timeout_s=300)
    check_accounting(cluster, "f", 3)


def test_a_postgres_restart_mid_round_only_delays_the_federation(cluster: Cluster) -> None:
    cluster.add_replica()
    cluster.create_federation("f", target_rounds=4, min_updates=3)
    _fleet(cluster, "f", 3, train_s=0.5)
    cluster.wait_for_rounds("f", 1)
    _collecting(cluster, "f")
    version = next(iter(Path("/etc/postgresql").iterdir())).name
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True,
                   timeout=120)
    cluster.wait_for_rounds("f", 4)
    check_accounting(cluster, "f", 4)


def test_a_redis_restart_mid_round_only_delays_the_federation(cluster: Cluster) -> None:
    cluster.add_replica()
    cluster.create_federation("f", target_rounds=4, min_updates=3)
    _fleet(cluster, "f", 3, train_s=0.5)
    cluster.wait_for_rounds("f", 1)
    _collecting(cluster, "f")
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], check=False, timeout=30)
    time.sleep(2)  # devices keep calling; presence is down, the database still decides
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379", "--save", ""],
                   check=True, timeout=30)
    cluster.wait_for_rounds("f", 4)
    check_accounting(cluster, "f", 4)


def test_ten_percent_of_the_devices_vanishing_each_round_does_not_stall_the_federation(cluster: Cluster) -> None:
    cluster.add_replica()
    # 10 devices, 8 wanted per round (10 invited with over-selection), 5 enough once the rest are gone.
    cluster.create_federation("f", target_rounds=4, min_updates=5, clients_per_round=8, overselect=0.25,
                              round_deadline_s=60)
    # Paused until the whole fleet is live: else the scheduler may open round 1 with the first 5 devices
    # up, and losing one of those 5 fails that round for quorum, which is not what this test is about.
    with cluster.admin as admin:
        assert admin.post("/v1/federations/f/pause").status_code == 200
        _fleet(cluster, "f", 10, train_s=0.5)
        wait_until(lambda: sum(d["online"] for d in admin.get("/v1/federations/f/devices").json()) == 10, 120,
                   "all 10 devices online")
        assert admin.post("/v1/federations/f/resume").status_code == 200
    rng = random.Random(7)
    vanished: list[str] = []
    for round_number in range(1, 5):
        wait_until(lambda n=round_number: any(r.number == n for r in cluster.rounds("f")), 120, f"round {round_number}")
        victim = rng.choice([name for name, p in cluster.devices.items() if p.alive()])
        cluster.devices[victim].kill()
        vanished.append(victim)
        cluster.wait_for_rounds("f", round_number)
    counts = check_accounting(cluster, "f", 4)
    assert len(vanished) == 4 and counts["committed"] == 4
    stragglers = [r.metrics.get("stragglers", 0) for r in cluster.rounds("f")]
    assert sum(stragglers) >= 1  # someone was given up on rather than waited for until the deadline


def test_two_replicas_serve_one_fleet_and_survive_losing_the_lease_holder(cluster: Cluster) -> None:
    first = cluster.add_replica()
    second = cluster.add_replica()
    both = f"ipv4:{first.address},{second.address}"
    cluster.create_federation("f", target_rounds=5, min_updates=4)
    _fleet(cluster, "f", 4, coordinator=both, train_s=0.5)
    cluster.wait_for_rounds("f", 2)
    _collecting(cluster, "f")
    engine = create_engine_for(cluster.database_url)
    try:
        with engine.connect() as connection:
            holder = connection.execute(text("SELECT holder FROM leases WHERE name LIKE 'federation:%'")).scalar_one()
    finally:
        engine.dispose()
    victim = next(r for r in cluster.replicas if r.process.name == holder)
    victim.process.kill()
    cluster.wait_for_rounds("f", 5)
    check_accounting(cluster, "f", 5)
    survivor = next(r for r in cluster.replicas if r is not victim)
    assert "driving federation f" in survivor.process.log_path.read_text()


def test_async_buffers_take_stale_updates_within_the_bound_and_count_each_once(cluster: Cluster) -> None:
    cluster.add_replica()
    cluster.create_federation("f", mode="async", async_buffer=3, max_staleness=8, target_rounds=10, min_updates=1)
    _fleet(cluster, "f", 3, train_s=0.3)
    cluster.add_device("slow", "f", "audio,image", train_s=1.5)  # its updates arrive a few versions late
    cluster.wait_for_rounds("f", 10)
    check_accounting(cluster, "f", 10)
    committed = [r for r in cluster.rounds("f") if r.state is RoundState.COMMITTED]
    assert all(r.metrics["participants"] >= 3 for r in committed)
    assert max(r.metrics["staleness_max"] for r in committed) >= 1
    assert any(e["device"] == "slow" and e["event"] == "accepted" for e in cluster.journal())


def test_the_real_agent_killed_mid_upload_resumes_the_same_update_after_a_restart(cluster: Cluster) -> None:
    # The agent reads its own dataset directory, as on a real device; the coordinator holds the public set.
    fleet_data = cluster.root / "fleet-data"
    export_avmnist(fleet_data, devices=3)
    cluster.add_replica(task_data=json.dumps({"avmnist": str(fleet_data)}))
    # 1 KiB chunks stretch the upload over a few hundred acknowledged writes: time to kill it halfway.
    cluster.create_federation("f", task="avmnist", target_rounds=2, min_updates=1, max_chunk_bytes=1024,
                              public_epochs=1, private_epochs=1)
    state = cluster.root / "agent-state"
    config = cluster.root / "agent.toml"
    config.write_text(f'coordinator = "{cluster.replicas[0].address}"\nfederation = "f"\ndevice_name = "edge-real"\n'
                      f'state_dir = "{state}"\nallow_plaintext = true\n'
                      f'[data]\ndataset = "{fleet_data / "device-0"}"\ntask = "avmnist"\n')
    agent = Process("agent", [sys.executable, "-m", "edge_agent", "--config", str(config)],
                    {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, cluster.root)
    cluster.devices["agent"] = agent
    agent.start()
    staging = cluster.root / "coordinator" / "blobs" / "staging"

    def halfway() -> bool:
        return (state / "pending.json").exists() and any(f.stat().st_size > 0 for f in staging.glob("*"))

    try:
        wait_until(halfway, 300, "the agent to be half way through an upload", interval_s=0.005)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()}") from None
    agent.kill()
    pending = json.loads((state / "pending.json").read_text())
    with cluster.store() as store:
        fed = store.find_federation_by_name("f")
        assert fed is not None
        device = store.list_devices(fed.id)[0]
        update = store.find_update_by_upload(device.id, pending["upload_id"])
        assert update is not None and update.state.value == "partial"  # killed before the end
        staged = next(staging.glob("*")).stat().st_size
        assert 0 < staged < pending["size"]

    agent.start()  # the same state directory: it finds its pending update and resumes it
    cluster.wait_for_rounds("f", 2, timeout_s=300)
    told = agent.log_path.read_text()
    assert f"update for round {pending['round_id']} accepted" in told
    assert "public shard downloaded" in told and "public shard cached in" in told  # fetched once, then reused
    acknowledged = [("edge-real", pending["upload_id"])]
    check_accounting(cluster, "f", 2, acknowledged=acknowledged)
    with cluster.store() as store:
        round_updates = store.list_updates(pending["round_id"])
        assert [u.upload_id for u in round_updates] == [pending["upload_id"]]  # resumed, not sent anew


def test_a_cloud_worker_killed_mid_job_loses_nothing_and_the_job_runs_again(cluster: Cluster) -> None:
    """The coordinator runs no cloud jobs; a worker process does. It is SIGKILLed while it tunes the cloud on
    version 1: the queue lost that job, the version still owes it, the coordinator queues it again after
    ``cloud_job_timeout_s``, and a new worker does it once. With ``anchors = "wait"`` round 2 opens only then."""
    cluster.add_replica(worker_inprocess="false", cloud_job_timeout_s="4")
    first = cluster.add_worker()
    cluster.create_federation("f", target_rounds=2, min_updates=3, server_learning=True, anchors="wait",
                              cloud_epochs=15, fused_upload_samples=8)
    _fleet(cluster, "f", 3)
    cluster.wait_for_rounds("f", 1)

    def version_1_running() -> Any:
        with cluster.store() as store:
            versions = store.list_versions(store.find_federation_by_name("f").id)  # type: ignore[union-attr]
        return next((v for v in versions if v.round_number == 1 and v.cloud_attempts >= 1
                     and v.cloud_state is CloudState.PENDING), None)

    wait_until(version_1_running, 60, "the worker to start version 1's cloud job", interval_s=0.02)
    first.kill()
    killed_at = datetime.now(UTC)
    cluster.add_worker()
    cluster.wait_for_rounds("f", 2, timeout_s=240)

    with cluster.store() as store:
        federation = store.find_federation_by_name("f")
        assert federation is not None
        versions = {v.round_number: v for v in store.list_versions(federation.id)}
        rounds = {r.number: r for r in store.list_rounds(federation.id)}
    one = versions[1]
    assert one.cloud_state is CloudState.DONE and one.cloud_attempts == 2, (one, cluster.logs())
    assert one.anchors_key is not None and one.generated_anchors is not None
    assert one.anchors_key == one.generated_anchors.key  # waited for: its own anchors
    assert "accuracy" in one.metrics and "global_accuracy" in rounds[1].metrics
    assert rounds[2].opened_at is not None and one.cloud_finished_at is not None
    assert rounds[2].opened_at >= one.cloud_finished_at  # round 2 waited for them
    assert "queued again" in cluster.replicas[0].process.log_path.read_text()
    print(f"version 1's cloud work done {(one.cloud_finished_at - killed_at).total_seconds():.1f} s after its worker "
          "was killed (cloud_job_timeout_s = 4)")
