"""docker-compose.yml's topology run as local processes: each service of our images becomes the process its
container would run (entrypoint + command, image ENV + service environment), named volumes become
directories, container paths are rewritten into them, and service names become loopback ports. Postgres and
Redis are this machine's (a fresh database, a fresh key prefix); Prometheus and Grafana are left to
tests/deploy's Prometheus test. So certs -> migrate -> coordinator -> bootstrap -> three agents run exactly
the scripts, settings and agent configs the compose file gives them, mutual TLS and enrolment tokens included,
and the agents read the dataset directories the fleet-data service exported.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from mlecs.fleet.admin_client import AdminClient
from tests.deploy import compose_topology as topo

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis]

SCRIPTS = topo.ROOT / "deploy" / "docker" / "compose"
BIN = Path(sys.executable).parent
# Test-speed federation: the compose file's, with one round of the tiny backbone and one public epoch.
FAST = {"target_rounds": 1, "public_epochs": 1, "cloud_epochs": 1, "model": {"backbone": "tiny"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(data: dict[str, Any]) -> str:
    """Just enough TOML for agent and federation configs (scalars, lists, one level of tables)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)
    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += [f"[{k}]", *(f"{kk} = {value(vv)}" for kk, vv in v.items())]
    return "\n".join(lines) + "\n"


class Topology:
    """Starts the compose services as processes, in compose's order, and stops them all at the end."""

    def __init__(self, tmp: Path, database_url: str, redis_prefix: str) -> None:
        self.compose = topo.load()
        self.tmp = tmp
        self.volumes = {name: tmp / "volumes" / name for name in self.compose["volumes"]}
        for directory in self.volumes.values():
            directory.mkdir(parents=True)
        self.ports = {("coordinator", 50051): _free_port(), ("coordinator", 50052): _free_port(),
                      ("coordinator", 9102): _free_port(), ("coordinator", 8080): _free_port(),
                      ("worker", 9103): _free_port()}
        self.database_url, self.redis_prefix = database_url, redis_prefix
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs = tmp / "logs"
        self.logs.mkdir()

    def root(self, name: str) -> Path:
        root = self.tmp / "roots" / name
        if not root.exists():
            topo.container_root(self.compose["services"][name], self.volumes, root)
        return root

    def _address(self, value: str) -> str:
        """service:port (in a URL or alone) -> 127.0.0.1:local port; the database and Redis -> this machine's."""
        if value.startswith("postgresql://"):
            return self.database_url
        if value.startswith("redis://redis:"):
            return "redis://127.0.0.1:6379/0"
        for (service, port), local in self.ports.items():
            value = value.replace(f"{service}:{port}", f"127.0.0.1:{local}")
        return value

    def env(self, name: str) -> dict[str, str]:
        service = self.compose["services"][name]
        image = topo.image_env(topo.dockerfile(service, self.compose))
        env = {**image, **topo.environment(service)}
        root = self.root(name)
        for key, value in env.items():
            if key == "MLECS_MIGRATIONS_DIR":
                env[key] = str(topo.ROOT / "migrations")  # the image copies ./migrations there
            elif key == "MLECS_TASK_DATA":  # JSON: task name -> a directory in the container
                env[key] = json.dumps({task: topo.in_root(root, path) for task, path in json.loads(value).items()})
            elif value.startswith("/"):  # a volume, a bind mount, or the container's own filesystem
                env[key] = topo.in_root(root, value)
            else:
                env[key] = self._address(value)
        if name == "coordinator":  # loopback ports instead of the container's
            env.update(MLECS_GRPC_HOST="127.0.0.1", MLECS_ADMIN_HOST="127.0.0.1",
                       MLECS_GRPC_PORT=str(self.ports[("coordinator", 50051)]),
                       MLECS_HEARTBEAT_PORT=str(self.ports[("coordinator", 50052)]),
                       MLECS_HEARTBEAT_METRICS_PORT=str(self.ports[("coordinator", 9102)]),
                       MLECS_ADMIN_PORT=str(self.ports[("coordinator", 8080)]))
        if name == "worker":
            env.update(MLECS_ADMIN_HOST="127.0.0.1", MLECS_WORKER_METRICS_PORT=str(self.ports[("worker", 9103)]))
        return {**topo.os_environ_without_mlecs(), **env, "MLECS_REDIS_PREFIX": self.redis_prefix,
                "MLECS_TLS_OWNER": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "PATH": f"{BIN}:{os.environ['PATH']}"}

    def argv(self, name: str) -> list[str]:
        service = self.compose["services"][name]
        argv = topo.argv(service, self.compose)
        if argv[0].endswith(".sh"):
            argv[0] = str(SCRIPTS / PurePosixPath(argv[0]).name)
        elif argv[0] in ("mlecs", "mlecs-coordinator", "mlecs-agent"):
            argv[0] = str(BIN / argv[0])
        root = self.root(name)
        argv = [topo.in_root(root, a) if a.startswith(("/etc/", "/srv/")) else a for a in argv]
        if name == "bootstrap":  # the compose federation config, sped up for a test
            config = tomllib.loads(Path(argv[2]).read_text()) | FAST
            (self.tmp / "federation.toml").write_text(_toml(config))
            argv[2] = str(self.tmp / "federation.toml")
        if "--config" in argv:  # an agent: its TOML with container paths and the coordinator's address mapped
            index = argv.index("--config") + 1
            config = tomllib.loads(Path(argv[index]).read_text())
            config["coordinator"] = self._address(config["coordinator"])
            config["tls"]["server_name"] = "coordinator"  # the name the certificate holds, as in compose
            for key in ("state_dir", "enrolment_token_file"):
                config[key] = topo.in_root(root, config[key])
            for key in ("dataset", "task"):
                config["data"][key] = topo.in_root(root, config["data"][key])
            for key in ("ca_file", "cert_file", "key_file"):
                config["tls"][key] = topo.in_root(root, config["tls"][key])
            argv[index] = str(self.tmp / f"{name}.toml")
            Path(argv[index]).write_text(_toml(config))
        return argv

    def start(self, name: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(self.argv(name), env=self.env(name), stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.tmp, start_new_session=True)
        self.procs[name] = proc
        return proc

    def run_to_completion(self, name: str, timeout_s: float = 180) -> None:
        code = self.start(name).wait(timeout=timeout_s)
        assert code == 0, f"one-shot {name} exited {code}:\n{self.log(name)}"

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-4000:]

    def wait_healthy(self, name: str, timeout_s: float = 180) -> None:
        """The compose healthcheck, run as the container would run it (against the mapped port)."""
        test = self.compose["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] == "python"
        argv = [sys.executable, *(self._address(a.replace("127.0.0.1:", f"{name}:")) for a in test[2:])]
        deadline = time.monotonic() + timeout_s
        while subprocess.run(argv, capture_output=True, timeout=30).returncode != 0:
            assert self.procs[name].poll() is None, f"{name} exited:\n{self.log(name)}"
            assert time.monotonic() < deadline, f"{name} not healthy:\n{self.log(name)}"
            time.sleep(0.5)

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def fleet(tmp_path: Path, make_postgres_database, redis_prefix: str) -> Iterator[Topology]:
    topology = Topology(tmp_path, make_postgres_database(), redis_prefix)
    try:
        yield topology
    finally:
        topology.close()
        for name in topology.procs:  # shown by pytest only when the test failed
            print(f"----- {name} (exit {topology.procs[name].returncode}) -----\n{topology.log(name)}")


def _admin_token(fleet: Topology) -> str:
    result = subprocess.run([str(BIN / "mlecs-coordinator"), "tokens", "create", "--name", "test", "--scope",
                             "operate", "--expires-in-days", "1", "--quiet"], env=fleet.env("coordinator"),
                            capture_output=True, text=True, timeout=120, cwd=fleet.tmp)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_compose_topology_as_processes_enrols_three_agents_over_mtls_and_commits_a_round(fleet):
    order = [n for n in topo.start_order(fleet.compose) if n not in ("postgres", "redis", "prometheus", "grafana")]
    agents = [n for n in order if n.startswith("agent-")]
    assert order[:6] == ["certs", "fleet-data", "migrate", "coordinator", "worker", "bootstrap"] and len(agents) == 3
    for name in order:
        if topo.is_one_shot(name, fleet.compose):
            run_s = 300 if name == "bootstrap" else 180
            fleet.run_to_completion(name, run_s)
        else:
            fleet.start(name)
            if any(dep.get("condition") == "service_healthy" and n == name
                   for s in fleet.compose["services"].values() for n, dep in (s.get("depends_on") or {}).items()):
                fleet.wait_healthy(name)  # something waits on it (the coordinator); agents are checked below
    tokens = {n: (fleet.root(n) / "etc/mlecs/tls/enrolment.token").read_text().strip() for n in agents}
    assert len(set(tokens.values())) == 3 and all(tokens.values()), "one enrolment token per agent"

    federation = fleet.compose["services"]["bootstrap"]["command"][0]
    admin = AdminClient(f"http://127.0.0.1:{fleet.ports[('coordinator', 8080)]}", _admin_token(fleet))
    deadline = time.monotonic() + 240
    committed: list[dict[str, Any]] = []
    while not committed:
        for name in agents:  # running, or told to stop (0) once the federation completed its target_rounds
            assert fleet.procs[name].poll() in (None, 0), f"{name} exited:\n{fleet.log(name)}"
        assert time.monotonic() < deadline, "no round committed:\n" + fleet.log("coordinator")
        time.sleep(1)
        committed = [r for r in admin.get(f"/v1/federations/{federation}/rounds") if r["state"] == "committed"]
    assert committed[0]["number"] == 1 and committed[0]["metrics"]["participants"] == 3
    # The coordinator runs no cloud jobs here: the worker service evaluates the version and makes its anchors.
    while (version := admin.get(f"/v1/versions/{committed[0]['version_id']}"))["cloud_state"] == "pending":
        assert fleet.procs["worker"].poll() is None, f"worker exited:\n{fleet.log('worker')}"
        assert time.monotonic() < deadline + 120, "cloud work not done:\n" + fleet.log("worker")
        time.sleep(1)
    assert version["cloud_state"] == "done" and 0 <= version["metrics"]["accuracy"] <= 1, version
    assert "cloud work of" in fleet.log("worker") and "cloud worker running" not in fleet.log("coordinator")
    fleet.wait_healthy("worker")  # its compose healthcheck: its /metrics answers
    for name in ("coordinator", *agents):  # neither side fell back to development mode
        assert "PLAINTEXT" not in fleet.log(name) and "OPEN ENROLMENT" not in fleet.log(name).upper(), name

    for name in agents:  # each agent's compose healthcheck (enrolled), run against its mapped state volume
        test = fleet.compose["services"][name]["healthcheck"]["test"]
        code = test[-1].replace("/var/lib/mlecs-agent", topo.in_root(fleet.root(name), "/var/lib/mlecs-agent"))
        assert subprocess.run([sys.executable, *test[2:-1], code], timeout=30).returncode == 0, name

    devices = admin.get(f"/v1/federations/{federation}/devices")
    assert len(devices) == 3 and len({tuple(sorted(d["modalities"])) for d in devices}) == 3
    # Bootstrap again (a second `docker compose up`): the federation is kept and no token is re-issued.
    fleet.run_to_completion("bootstrap")
    assert "exists" in fleet.log("bootstrap")
    assert tokens == {n: (fleet.root(n) / "etc/mlecs/tls/enrolment.token").read_text().strip() for n in agents}

    admin.post(f"/v1/federations/{federation}/stop")
    for name in agents:
        assert fleet.procs[name].wait(timeout=60) == 0, f"{name}:\n{fleet.log(name)}"
