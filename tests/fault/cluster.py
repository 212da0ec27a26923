"""Separate processes for the fault tests: coordinator replicas and devices, on the real PostgreSQL and
Redis, with ways to break each of them and a check of the database against what devices were told."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from server.domain.models import UpdateState
from server.domain.rounds import RoundState
from server.persistence.sql_store import SqlStore
from server.services.admin_tokens import AdminTokenService
from tests.integration.coordinator_harness import free_port

REPO = Path(__file__).resolve().parents[2]


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class Process:
    """A child process with its output in a log file that a failing test can show."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        self.popen = subprocess.Popen(self.argv, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye, like a power cut."""
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- {self.name} ---\n" + "\n".join(text.splitlines()[-lines:])


@dataclass
class Replica:
    process: Process
    grpc_port: int
    admin_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> None:
        self.process.start()
        wait_until(lambda: self.healthy() or not self.process.alive(), 90, f"{self.process.name} to start")
        if not self.process.alive():
            raise RuntimeError(f"{self.process.name} exited at start\n{self.process.log_tail()}")


@dataclass
class Cluster:
    """Coordinator replicas sharing one database, Redis prefix and blob directory, plus devices."""

    database_url: str
    redis_url: str
    redis_prefix: str
    root: Path
    replicas: list[Replica] = field(default_factory=list)
    devices: dict[str, Process] = field(default_factory=dict)
    workers: list[Process] = field(default_factory=list)
    admin_token: str | None = None

    def _env(self, **settings: str) -> dict[str, str]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "MLECS_DATABASE_URL": self.database_url, "MLECS_REDIS_URL": self.redis_url,
               "MLECS_REDIS_PREFIX": self.redis_prefix, "MLECS_STATE_DIR": str(self.root / "coordinator"),
               "MLECS_HEARTBEAT_INTERVAL_S": "1", "MLECS_PRESENCE_TTL_S": "3", "MLECS_SCHEDULER_INTERVAL_S": "0.2",
               "MLECS_LEASE_TTL_S": "3", "MLECS_LOG_LEVEL": "INFO",
               # Fault tests break things on purpose, not identity: the explicit development mode.
               "MLECS_ALLOW_PLAINTEXT": "true", "MLECS_OPEN_ENROLMENT": "true"}
        env.update({f"MLECS_{k.upper()}": v for k, v in settings.items()})
        return env

    def add_worker(self, **settings: str) -> Process:
        """A cloud worker (``python -m server worker``) on the cluster's database and blob directory."""
        worker = Process(f"worker-{len(self.workers)}", [sys.executable, "-m", "server", "worker"],
                         self._env(worker_metrics_port=str(free_port()), **settings), self.root)
        worker.start()
        self.workers.append(worker)
        return worker

    def add_replica(self, **settings: str) -> Replica:
        name = f"coordinator-{len(self.replicas)}"
        grpc_port, admin_port = free_port(), free_port()
        env = self._env(grpc_port=str(grpc_port), admin_port=str(admin_port), replica_id=name, **settings)
        replica = Replica(Process(name, [sys.executable, "-m", "server", "serve"], env, self.root), grpc_port,
                          admin_port)
        replica.start()
        self.replicas.append(replica)
        return replica

    @property
    def admin(self) -> httpx.Client:
        """An admin API client on a live replica, with an admin token (made once, on the shared database, by the
        service behind `mlecs-coordinator tokens create`; a replica has migrated the database by then)."""
        if self.admin_token is None:
            with self.store() as store:
                self.admin_token = AdminTokenService(store).create("fault-tests", ["admin"], None, "tests").plaintext
        live = next((r for r in self.replicas if r.process.alive()), self.replicas[0])
        return httpx.Client(base_url=f"http://127.0.0.1:{live.admin_port}", timeout=60,
                            headers={"Authorization": f"Bearer {self.admin_token}"})

    def create_federation(self, name: str, **config: Any) -> dict[str, Any]:
        body = {"model": {"backbone": "tiny"}, "server_learning": False, "fused_upload_samples": 0,
                "max_chunk_bytes": 16 * 1024, "round_deadline_s": 60} | config
        with self.admin as admin:
            response = admin.post("/v1/federations", json={"name": name, "config": body})
        assert response.status_code == 201, response.text
        return dict(response.json())

    def add_device(self, name: str, federation: str, modalities: str, coordinator: str | None = None,
                   train_s: float = 0.3) -> Process:
        target = coordinator or self.replicas[0].address
        argv = [sys.executable, "-m", "tests.fault.device", "--coordinator", target, "--federation", federation,
                "--name", name, "--modalities", modalities, "--state-dir", str(self.root / "devices" / name),
                "--journal", str(self.journal_path), "--train-s", str(train_s)]
        device = Process(name, argv, {**os.environ, "OMP_NUM_THREADS": "1"}, self.root)
        device.start()
        self.devices[name] = device
        return device

    @property
    def journal_path(self) -> Path:
        return self.root / "journal.jsonl"

    def journal(self) -> list[dict[str, str]]:
        if not self.journal_path.exists():
            return []
        return [json.loads(line) for line in self.journal_path.read_text().splitlines() if line.strip()]

    def logs(self) -> str:
        processes = [r.process for r in self.replicas] + self.workers + list(self.devices.values())
        return "\n".join(p.log_tail() for p in processes)

    def shutdown(self) -> None:
        for process in list(self.devices.values()) + self.workers + [r.process for r in self.replicas]:
            process.kill()

    # ---- reading the truth from the database ---------------------------------------------------

    @contextmanager
    def store(self) -> Iterator[SqlStore]:
        store = SqlStore.from_url(self.database_url)
        try:
            yield store
        finally:
            store.close()

    def rounds(self, federation: str) -> list[Any]:
        with self.store() as store:
            found = store.find_federation_by_name(federation)
            return [] if found is None else store.list_rounds(found.id)

    def committed(self, federation: str) -> int:
        return sum(r.state is RoundState.COMMITTED for r in self.rounds(federation))

    def wait_for_rounds(self, federation: str, committed: int, timeout_s: float = 180) -> None:
        try:
            wait_until(lambda: self.committed(federation) >= committed, timeout_s,
                       f"{committed} committed rounds of {federation}", interval_s=0.2)
        except TimeoutError as exc:
            seen = [(r.number, r.state.value, r.failure_reason) for r in self.rounds(federation)]
            raise AssertionError(f"{exc}\nrounds: {seen}\n{self.logs()}") from None

    def round_in_state(self, federation: str, state: RoundState, min_accepted: int = 0) -> Any:
        """The latest round if it is in ``state`` with at least ``min_accepted`` accepted updates, else None."""
        with self.store() as store:
            found = store.find_federation_by_name(federation)
            latest = None if found is None else store.latest_round(found.id)
            if latest is None or latest.state is not state:
                return None
            accepted = sum(u.state is UpdateState.ACCEPTED for u in store.list_updates(latest.id))
            return latest if accepted >= min_accepted else None


def check_accounting(cluster: Cluster, federation: str, committed_rounds: int,
                     acknowledged: list[tuple[str, str]] | None = None) -> dict[str, int]:
    """Every update a device was told is accepted is in the database, accepted, in a committed round,
    counted once; every round finished; exactly one version per committed round.

    ``acknowledged``: (device name, upload id) pairs; default: the journal's "accepted" lines.
    """
    if acknowledged is None:
        acknowledged = [(e["device"], e["upload_id"]) for e in cluster.journal() if e["event"] == "accepted"]
    with cluster.store() as store:
        fed = store.find_federation_by_name(federation)
        assert fed is not None
        devices = {d.name: d.id for d in store.list_devices(fed.id)}
        rounds = {r.id: r for r in store.list_rounds(fed.id)}
        stuck = [(r.number, r.state.value) for r in rounds.values() if not r.state.is_terminal]
        committed = [r for r in rounds.values() if r.state is RoundState.COMMITTED]
        assert len(committed) >= committed_rounds, f"only {len(committed)} committed; stuck: {stuck}"
        assert not stuck, f"rounds left unfinished: {stuck}"
        for name, upload_id in acknowledged:
            update = store.find_update_by_upload(devices[name], upload_id)
            assert update is not None, f"{name}'s acknowledged upload {upload_id} is not in the database"
            assert update.state is UpdateState.ACCEPTED, f"{name}'s acknowledged upload {upload_id} is {update.state}"
            owner = rounds[update.round_id]
            assert owner.state is RoundState.COMMITTED, (
                f"{name}'s acknowledged upload {upload_id} is in round {owner.number}, which {owner.state}: "
                f"{owner.failure_reason}")
        versions = store.list_versions(fed.id)
        by_round = [v.round_number for v in versions]
        assert sorted(by_round) == sorted([0] + [r.number for r in committed]), (
            f"versions {sorted(by_round)} do not match committed rounds {sorted(r.number for r in committed)}")
        total = 0
        for round_ in committed:
            accepted = [u for u in store.list_updates(round_.id) if u.state is UpdateState.ACCEPTED]
            assert len({u.device_id for u in accepted}) == len(accepted), f"round {round_.number}: a device twice"
            assert round_.metrics["participants"] == len(accepted), (
                f"round {round_.number} aggregated {round_.metrics['participants']} updates "
                f"but {len(accepted)} are accepted")
            assert round_.version_id in {v.id for v in versions}
            total += len(accepted)
        last = max(committed, key=lambda r: r.number)
        assert store.get_federation(fed.id).current_version_id == last.version_id
    return {"acknowledged": len(acknowledged), "accepted_in_committed_rounds": total, "committed": len(committed)}
