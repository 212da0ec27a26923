"""The coordinator under load: its backing stores, its process, its resource use and the admin calls made to it.

Errors: ``LoadBenchmarkError`` (the coordinator or a store it needs misbehaved; the message says how, and
includes the tail of the coordinator's log where there is one). Not retryable as such.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil

from benchmarks.load_report import Samples, parse_prometheus

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
"""Maintenance database through which a fresh benchmark database is created and dropped."""
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
MIB = 1024 * 1024


class LoadBenchmarkError(RuntimeError):
    """The coordinator, or a store it needs, did not behave as the benchmark requires."""


@dataclass(frozen=True)
class BackingStores:
    """What the coordinator keeps its state in for one run."""

    database_url: str | None
    """None: the embedded SQLite file under the coordinator's state directory."""
    redis_url: str | None
    """None: presence kept inside the coordinator process."""
    redis_prefix: str

    @property
    def database(self) -> str:
        return "sqlite" if self.database_url is None else urlsplit(self.database_url).scheme.split("+")[0]

    @property
    def database_name(self) -> str | None:
        return None if self.database_url is None else urlsplit(self.database_url).path.lstrip("/") or None

    @property
    def presence(self) -> str:
        return "memory" if self.redis_url is None else "redis"


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def _create_postgres_database(server_url: str) -> str:
    """Creates an empty database on the server of ``server_url`` and returns its URL."""
    import psycopg

    name = f"mlecs_load_{uuid.uuid4().hex[:12]}"
    # CREATE/DROP DATABASE cannot run inside a transaction.
    with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return _with_database(server_url, name)


def _drop_postgres_database(server_url: str, url: str) -> None:
    import psycopg

    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _redis_answers(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


def _delete_redis_keys(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start:start + 1000])
    finally:
        client.close()


@contextmanager
def backing_stores(database_url: str | None, redis_url: str | None, embedded: bool,
                   note: Callable[[str], None]) -> Iterator[BackingStores]:
    """The stores of one run, cleaned up afterwards.

    An explicit URL is used as given: a Redis that does not answer is an error, and a database that does not
    makes the coordinator fail to start. Without one: a fresh PostgreSQL database on the local
    server, dropped afterwards, and the local Redis under a unique key prefix, whose keys are deleted
    afterwards; an unreachable default falls back to the embedded store, with a note saying so.
    """
    prefix = f"mlecs_load_{uuid.uuid4().hex[:12]}"
    if embedded:
        yield BackingStores(None, None, prefix)
        return
    chosen_redis = redis_url or DEFAULT_REDIS_URL
    if not _redis_answers(chosen_redis):
        if redis_url:
            raise LoadBenchmarkError(f"Redis at {redis_url} does not answer")
        note(f"note: Redis at {DEFAULT_REDIS_URL} does not answer; presence stays inside the coordinator")
        chosen_redis = ""
    try:
        with _database(database_url, note) as chosen_database:
            yield BackingStores(chosen_database, chosen_redis or None, prefix)
    finally:
        if chosen_redis:
            _delete_redis_keys(chosen_redis, prefix)


@contextmanager
def _database(database_url: str | None, note: Callable[[str], None]) -> Iterator[str | None]:
    if database_url:
        yield database_url
        return
    import psycopg

    try:
        url = _create_postgres_database(DEFAULT_POSTGRES_URL)
    except psycopg.OperationalError as exc:
        note(f"note: PostgreSQL at {DEFAULT_POSTGRES_URL} is unreachable ({str(exc).strip()}); "
             "the coordinator uses its embedded SQLite database")
        yield None
        return
    try:
        yield url
    finally:
        _drop_postgres_database(DEFAULT_POSTGRES_URL, url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RssSampler:
    """Samples the resident set size of some processes (summed) in a background thread and keeps the largest
    value seen."""

    def __init__(self, pids: list[int], interval_s: float = 0.1) -> None:
        self._processes = [psutil.Process(pid) for pid in pids]
        self._interval = interval_s
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self._peak / MIB

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._peak = max(self._peak, sum(p.memory_info().rss for p in self._processes))
            except psutil.Error:
                return
            self._stop.wait(self._interval)


@dataclass(frozen=True)
class CpuUse:
    coordinator_s: float
    devices_s: float
    stores_s: float
    """PostgreSQL's backends serving the benchmark's database and its shared writers (WAL, checkpoints), and
    Redis: the shared parts are counted whole, though other clients may have used them too."""
    other_s: float
    """Busy CPU seconds of the whole machine minus all of the above and this process."""


_POSTGRES_WRITERS = ("walwriter", "checkpointer", "background writer")


def _cpu_seconds(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()  # the process itself: children excluded
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


class CpuAccount:
    """CPU seconds used since construction by the coordinator, its stores, the device processes and the rest."""

    def __init__(self, coordinator_pids: list[int], device_pids: list[int], database_name: str | None) -> None:
        self._coordinator = [psutil.Process(pid) for pid in coordinator_pids]
        self._devices = [psutil.Process(pid) for pid in device_pids]
        self._me = psutil.Process()
        self._database_name = database_name
        self._stores_start = self._stores()
        self._start = self._sample()

    def _stores(self) -> dict[int, float]:
        """pid -> CPU seconds of Redis and of the PostgreSQL backends connected to our database."""
        found = {}
        for process in psutil.process_iter(["name", "cmdline"]):
            name, cmdline = process.info["name"] or "", " ".join(process.info["cmdline"] or ())
            # A backend's title reads "postgres: <cluster>: <user> <database> <client> <state>".
            ours = name == "redis-server" or (name == "postgres" and (
                any(writer in cmdline for writer in _POSTGRES_WRITERS)
                or (self._database_name is not None and f" {self._database_name} " in cmdline)))
            if ours:
                found[process.pid] = _cpu_seconds(process)
        return found

    def _sample(self) -> tuple[float, float, float, float]:
        machine = psutil.cpu_times()
        # Guest time is already inside user time, and steal is the hypervisor's: neither is counted.
        busy = sum(float(getattr(machine, name, 0.0)) for name in ("user", "nice", "system", "irq", "softirq"))
        return (sum(_cpu_seconds(p) for p in self._coordinator), sum(_cpu_seconds(p) for p in self._devices),
                _cpu_seconds(self._me), busy)

    def used(self) -> CpuUse:
        now, stores_now = self._sample(), self._stores()
        coordinator, devices, me, busy = (b - a for a, b in zip(self._start, now, strict=True))
        stores = sum(value - self._stores_start.get(pid, 0.0) for pid, value in stores_now.items())
        return CpuUse(coordinator_s=coordinator, devices_s=devices, stores_s=stores,
                      other_s=max(0.0, busy - coordinator - devices - stores - me))


class CoordinatorProcess:
    """``python -m server serve`` in a subprocess on free ports, its log kept in its state directory."""

    def __init__(self, state_dir: Path, stores: BackingStores, heartbeat_s: int, presence_ttl_s: float,
                 heartbeat_process: bool = True, extra_env: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        # The heartbeat process shares presence with the coordinator through Redis: none without it.
        self.heartbeat_process = heartbeat_process and bool(stores.redis_url)
        self.stores = stores
        self.grpc_port = free_port()
        self.heartbeat_metrics_port = free_port()
        self.admin_port = free_port()
        self.log_path = state_dir / "coordinator.log"
        self._env = {
            **os.environ,
            "MLECS_STATE_DIR": str(state_dir),
            "MLECS_GRPC_PORT": str(self.grpc_port),
            "MLECS_ADMIN_PORT": str(self.admin_port),
            "MLECS_REDIS_PREFIX": stores.redis_prefix,
            "MLECS_LOG_LEVEL": "WARNING",
            "MLECS_HEARTBEAT_INTERVAL_S": str(heartbeat_s),
            "MLECS_PRESENCE_TTL_S": str(presence_ttl_s),
            # Benchmark mode: plaintext and enrolment without tokens, so the simulated devices measure the
            # coordinator's work, not TLS handshakes or token issuing (logged loudly by the coordinator).
            "MLECS_ALLOW_PLAINTEXT": "true",
            "MLECS_OPEN_ENROLMENT": "true",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            **(extra_env or {}),
        }
        for key, value in (("MLECS_DATABASE_URL", stores.database_url), ("MLECS_REDIS_URL", stores.redis_url),
                           ("MLECS_HEARTBEAT_PORT", "0" if self.heartbeat_process else None),
                           ("MLECS_HEARTBEAT_METRICS_PORT",
                            str(self.heartbeat_metrics_port) if self.heartbeat_process else None)):
            if value:
                self._env[key] = value
            else:  # an unset URL selects the embedded store; one inherited from our environment must not leak in
                self._env.pop(key, None)
        self._process: subprocess.Popen[bytes] | None = None
        self.admin_token = ""
        """An admin-scope token for the admin API, made by ``start`` (``mlecs-coordinator tokens create``)."""

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise LoadBenchmarkError("the coordinator was not started")
        return self._process.pid

    def start(self, timeout_s: float = 180.0) -> None:
        """Makes an admin token (migrating the database), starts the coordinator and waits until its admin API
        answers /healthz."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        made = subprocess.run([sys.executable, "-m", "server", "tokens", "create", "--name", "load-benchmark",
                               "--scope", "admin", "--expires-in-days", "1", "--quiet"],
                              env=self._env, capture_output=True, text=True, timeout=timeout_s, check=False)
        if made.returncode != 0 or not made.stdout.strip():
            raise LoadBenchmarkError(f"could not create an admin token (exit code {made.returncode}):\n"
                                     f"{made.stderr[-2000:]}")
        self.admin_token = made.stdout.strip()
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen([sys.executable, "-m", "server", "serve"], env=self._env,
                                             stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.admin_url, timeout=5) as client:
            while True:
                if self._process.poll() is not None:
                    raise LoadBenchmarkError(f"the coordinator exited with code {self._process.returncode} while "
                                             f"starting:\n{self.log_tail()}")
                try:
                    if client.get("/healthz").status_code == 200 and self._heartbeats_ready(client):
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise LoadBenchmarkError(f"the coordinator did not answer /healthz within {timeout_s:.0f} s:\n"
                                             f"{self.log_tail()}")
                time.sleep(0.2)

    def _heartbeats_ready(self, client: httpx.Client) -> bool:
        """Whether devices would be told a heartbeat port now (always true without a heartbeat process):
        devices enrolled before it serves would heartbeat on the device port until their next reply."""
        if not self.heartbeat_process:
            return True
        for line in client.get("/metrics").text.splitlines():
            if line.startswith("mlecs_heartbeat_port "):
                return float(line.split()[1]) > 0
        return False

    def heartbeat_metrics(self) -> Samples:
        """The heartbeat process's Prometheus samples (empty without one, or if it does not answer)."""
        if not self.heartbeat_process:
            return {}
        try:
            reply = httpx.get(f"http://127.0.0.1:{self.heartbeat_metrics_port}/metrics", timeout=10)
        except httpx.TransportError:
            return {}
        return parse_prometheus(reply.text) if reply.status_code == 200 else {}

    def heartbeat_process_pids(self) -> list[int]:
        return [pid for pid in self.pids if pid != self.pid]

    @property
    def pids(self) -> list[int]:
        """The coordinator and its child processes (the heartbeat process)."""
        return [self.pid, *(child.pid for child in psutil.Process(self.pid).children(recursive=True))]

    def rss_mib(self) -> float:
        """Resident memory of the coordinator and its children, summed."""
        return sum(float(psutil.Process(pid).memory_info().rss) for pid in self.pids) / MIB

    def peak_rss_mib(self) -> float:
        """The high-water marks of resident memory (VmHWM) of the coordinator and its children, summed: an
        upper bound of their peak together."""
        return sum(self.peak_rss_by_process_mib().values())

    def peak_rss_by_process_mib(self) -> dict[int, float]:
        """pid -> high-water mark of resident memory (VmHWM) since it started."""
        peaks = {}
        for pid in self.pids:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks[pid] = int(line.split()[1]) / 1024  # reported in kB
                    break
            else:
                raise LoadBenchmarkError(f"/proc/{pid}/status has no VmHWM line")
        return peaks

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful stop), then SIGKILL if it lingers; returns the exit code."""
        if self._process is None or self._process.poll() is not None:
            return None if self._process is None else self._process.returncode
        self._process.send_signal(signal.SIGTERM)
        try:
            return self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            return self._process.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no coordinator log)"


class AdminClient:
    """The few admin API calls the benchmark makes; a refusal raises LoadBenchmarkError with the API's detail."""

    def __init__(self, base_url: str, token: str) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=120, headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self._http.close()

    def _json(self, method: str, path: str, expected: int, **kwargs: Any) -> Any:
        reply = self._request(method, path, **kwargs)
        if reply.status_code != expected:
            raise LoadBenchmarkError(f"{method} {path} answered {reply.status_code}: {reply.text[:2000]}")
        return reply.json()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call; a read (GET) that loses its connection is sent again, up to 3 times: on a saturated machine
        the server may close a kept-alive connection just as the next poll reuses it."""
        for attempt in range(3):
            try:
                return self._http.request(method, path, **kwargs)
            except httpx.TransportError:
                if method != "GET" or attempt == 2:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")

    def create_federation(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._json("POST", "/v1/federations", 201, json={"name": name, "config": config})
        return result

    def online_devices(self, federation: str) -> int:
        devices = self._json("GET", f"/v1/federations/{federation}/devices", 200)
        return sum(1 for d in devices if d["online"])

    def wait_online(self, federation: str, count: int, timeout_s: float) -> int:
        """Waits until at least ``count`` devices are online; returns how many are."""
        deadline = time.monotonic() + timeout_s
        while (online := self.online_devices(federation)) < count:
            if time.monotonic() > deadline:
                raise LoadBenchmarkError(f"only {online} of {count} devices online after {timeout_s:.0f} s")
            time.sleep(0.25)
        return online

    def metrics(self) -> Samples:
        """The coordinator's Prometheus samples (empty if /metrics does not answer)."""
        reply = self._http.get("/metrics")
        return parse_prometheus(reply.text) if reply.status_code == 200 else {}

    def start_round(self, federation: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("POST", f"/v1/federations/{federation}/rounds", 201)
        return result

    def wait_round(self, round_id: str, timeout_s: float, poll_s: float = 0.02) -> dict[str, Any]:
        """Polls a round until it is committed or failed; a round still running at the timeout is returned as is."""
        deadline = time.monotonic() + timeout_s
        while True:
            body: dict[str, Any] = self._json("GET", f"/v1/rounds/{round_id}", 200)
            if body["state"] in ("committed", "failed") or time.monotonic() > deadline:
                return body
            time.sleep(poll_s)
