"""A local federation: one coordinator and N agents as separate processes on loopback.

Used by ``mlecs fleet`` and by the end-to-end test. The coordinator and agents are started as
``python -m server`` / ``python -m edge_agent`` so this module imports neither.

Its agents read dataset directories, as real devices do: AV-MNIST is exported first (``mlecs data
export-avmnist``) into ``<workdir>/data`` and each agent gets its ``device-K`` folder; the coordinator gets
the public set and test split through ``MLECS_TASK_DATA``.

It runs the secure setup a newcomer should copy: a development CA and certificates in ``<workdir>/certs``
(``mlecs certs``), mutual TLS on the device port, and one one-time enrolment token per agent, made with
``mlecs-coordinator enrolment-tokens create`` and handed to the agent in a file. Its own admin calls use an
admin token made with ``mlecs-coordinator tokens create``, as an operator makes the first one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from mlecs.certs import CaLayout, CertificateError, init_directory, issue_device_files
from mlecs.fleet.admin_client import AdminApiError, AdminClient


class FleetError(Exception):
    """The local federation could not run; the message says what failed and where the logs are."""


@dataclass(frozen=True)
class FleetOptions:
    clients: int = 3
    rounds: int = 3
    database_url: str | None = None
    redis_url: str | None = None
    data_dir: Path | None = None
    setting: str = "canonical"
    aggregation: str = "mma"
    public_fraction: float = 0.2
    partition_scheme: str = "dirichlet"
    alpha: float = 0.5
    upload_stage: str = "private"
    public_epochs: int = 5
    private_epochs: int = 1
    personal_epochs: int = 1
    upload_codec: str = "fp16"
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    round_timeout_s: float = 600.0
    workdir: Path | None = None
    model_out: Path | None = None
    """Write the last global version here as a model directory (``mlecs predict --model``)."""
    dataset: Path | None = None
    """Run on these dataset directories (``mlecs data export-avmnist --out DIR``, or the same layout with any
    task: task.toml, public/, test/, device-0/ ...) instead of exporting AV-MNIST into the workdir."""


@dataclass
class RoundResult:
    round: int
    participants: int
    global_accuracy: float
    client_accuracy_mean: float
    cloud_accuracy: float
    upload_bytes_per_client: float
    upload_ratio: float
    wall_s: float
    state: str = "committed"
    failure_reason: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not (k == "failure_reason" and v is None)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LocalFleet:
    """Starts, drives and stops a local federation. Use as a context manager."""

    def __init__(self, options: FleetOptions, say: Callable[[str], None] = print) -> None:
        self.options = options
        self.say = say
        self._owns_workdir = options.workdir is None
        self.workdir = options.workdir.resolve() if options.workdir else Path(tempfile.mkdtemp(prefix="mlecs-fleet-"))
        self.logs = self.workdir / "logs"
        self._procs: list[tuple[str, subprocess.Popen[bytes], TextIO]] = []
        self.admin_port = _free_port()
        self.grpc_port = _free_port()
        self.admin = AdminClient(f"http://127.0.0.1:{self.admin_port}")
        self.federation = f"fleet-{int(time.time())}-{os.getpid()}"
        self.certs = CaLayout(self.workdir / "certs")
        self.data = options.dataset.resolve() if options.dataset else self.workdir / "data"  # agents run elsewhere
        self.task_name = ""
        self.device_modalities: dict[str, list[str]] = {}
        self._coordinator_env: dict[str, str] = {}

    def __enter__(self) -> LocalFleet:
        self.logs.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- processes -------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed in close()
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **env}, cwd=self.workdir)
        self._procs.append((name, proc, log))
        return proc

    def _check_alive(self) -> None:
        for name, proc, _ in self._procs:
            if proc.poll() not in (None, 0):
                raise FleetError(f"{name} exited with code {proc.returncode}; last log lines:\n"
                                 f"{_tail(self.logs / f'{name}.log')}\n(logs in {self.logs})")

    def export_data(self) -> None:
        """Writes AV-MNIST as the devices' and the coordinator's dataset directories under ``<workdir>/data``,
        or checks the directories given (``--data``)."""
        from mlecs.datasets.export_avmnist import export_avmnist

        o = self.options
        if o.dataset is not None:
            self._use_dataset(o.dataset)
            return
        try:
            summary = export_avmnist(self.data, o.clients, setting=o.setting,  # type: ignore[arg-type]
                                     seed=o.seed, scheme=o.partition_scheme,  # type: ignore[arg-type]
                                     alpha=o.alpha, public_fraction=o.public_fraction, data_dir=o.data_dir)
        except (OSError, ValueError) as exc:
            raise FleetError(f"could not export AV-MNIST to {self.data}: {exc}") from exc
        self.task_name, self.device_modalities = summary.task, summary.device_modalities
        self.say(f"exported AV-MNIST ({summary.task}) to {self.data}: public, test and {o.clients} device folders")

    def _use_dataset(self, root: Path) -> None:
        from mlecs.datasets import check_dataset
        from mlecs.tasks import TaskError, load_task

        try:
            task = load_task(root / "task.toml")
        except TaskError as exc:
            raise FleetError(f"{root} is not a fleet's data: {exc}") from exc
        for index in range(self.options.clients):
            report = check_dataset(root / f"device-{index}", task)
            if not report.usable:
                first = report.problems[0].describe() if report.problems else "no rows"
                raise FleetError(f"{root / f'device-{index}'} has no usable sample ({first}); "
                                 f"mlecs data check says more")
            self.device_modalities[f"device-{index}"] = sorted(
                m for m in task.modalities if any(counts.get(m) for counts in report.per_modality.values()))
        self.task_name = task.name
        self.say(f"using the dataset directories in {root} (task {task.name})")

    def start_coordinator(self) -> None:
        o = self.options
        if not self.task_name:
            self.export_data()
        env = {
            "MLECS_STATE_DIR": str(self.workdir / "coordinator"),
            "MLECS_GRPC_PORT": str(self.grpc_port),
            "MLECS_ADMIN_PORT": str(self.admin_port),
            "MLECS_EVAL_SETTING": o.setting,
            "MLECS_TASK_DATA": json.dumps({self.task_name: str(self.data)}),
            "OMP_NUM_THREADS": "2",
            "MLECS_TLS_CERT_FILE": str(self.certs.coordinator.cert),
            "MLECS_TLS_KEY_FILE": str(self.certs.coordinator.key),
            "MLECS_TLS_CLIENT_CA_FILE": str(self.certs.ca.cert),
        }
        if o.database_url:
            env["MLECS_DATABASE_URL"] = o.database_url
        if o.redis_url:
            env["MLECS_REDIS_URL"] = o.redis_url
        if o.data_dir:
            env["MLECS_DATA_DIR"] = str(o.data_dir)
        try:
            init_directory(self.certs.root, force=True)  # a fresh development CA for every run
        except CertificateError as exc:
            raise FleetError(f"could not create the development certificates: {exc}") from exc
        self._coordinator_env = env
        self.admin.token = self.admin_token()
        self._spawn("coordinator", ["server", "serve"], env)
        deadline = time.monotonic() + 120
        while not self.admin.healthy():
            self._check_alive()
            if time.monotonic() > deadline:
                raise FleetError(f"coordinator did not answer within 120 s (logs in {self.logs})")
            time.sleep(0.3)
        where = "Postgres" if o.database_url else "embedded SQLite"
        self.say(f"coordinator up (gRPC :{self.grpc_port}, admin http://127.0.0.1:{self.admin_port}, {where})")

    def create_federation(self) -> dict[str, Any]:
        o = self.options
        config = {
            "aggregation": o.aggregation, "min_updates": o.clients, "upload_stage": o.upload_stage,
            "public_epochs": o.public_epochs, "private_epochs": o.private_epochs,
            "personal_epochs": o.personal_epochs, "upload_codec": o.upload_codec, "seed": o.seed,
            "public_fraction": o.public_fraction,
            "round_deadline_s": o.round_timeout_s, "model": o.model,
            "task": (self.data / "task.toml").read_text(encoding="utf-8"),
            # Rounds here run one after another, each reported once evaluated: each round may as well train
            # against the anchors the cloud made from the version it starts from (the method's order).
            "anchors": "wait",
        }
        try:
            federation: dict[str, Any] = self.admin.post("/v1/federations", {"name": self.federation, "config": config})
        except AdminApiError as exc:
            raise FleetError(f"the coordinator refused the federation: {exc.detail}") from exc
        return federation

    def admin_token(self) -> str:
        """An admin-scope token for this run's admin calls, made as an operator makes the first one: with
        ``mlecs-coordinator tokens create`` on the coordinator's database (which it migrates first)."""
        result = subprocess.run(
            [sys.executable, "-m", "server", "tokens", "create", "--name", f"mlecs-fleet-{os.getpid()}",
             "--scope", "admin", "--expires-in-days", "1", "--quiet"],
            capture_output=True, text=True, env={**os.environ, **self._coordinator_env}, cwd=self.workdir,
            timeout=120, check=False)
        token = result.stdout.strip()
        if result.returncode != 0 or not token:
            raise FleetError(f"could not create an admin token (exit code {result.returncode}): "
                             f"{result.stderr.strip()[-2000:]}")
        return token

    def enrolment_tokens(self, device_names: list[str]) -> list[str]:
        """One one-time enrolment token per device name, from the coordinator's own command line."""
        result = subprocess.run(
            [sys.executable, "-m", "server", "enrolment-tokens", "create", "--federation", self.federation,
             "--ttl-hours", "1", "--quiet", *(arg for name in device_names for arg in ("--device-name", name))],
            capture_output=True, text=True, env={**os.environ, **self._coordinator_env}, cwd=self.workdir,
            timeout=120, check=False)
        tokens = result.stdout.split()
        if result.returncode != 0 or len(tokens) != len(device_names):
            raise FleetError(f"could not create enrolment tokens (exit code {result.returncode}): "
                             f"{result.stderr.strip()[-2000:]}")
        return tokens

    def start_agents(self) -> list[list[str]]:
        """Starts one agent per exported device folder; returns each one's modalities."""
        device_names = [f"edge-{index}" for index in range(self.options.clients)]
        tokens = self.enrolment_tokens(device_names)
        for index, device_name in enumerate(device_names):
            try:
                device_files = issue_device_files(self.certs.root, device_name, force=True)
            except CertificateError as exc:
                raise FleetError(f"could not issue the certificate of {device_name}: {exc}") from exc
            token_file = self.workdir / f"agent-{index}.token"
            token_file.touch(mode=0o600)
            token_file.write_text(tokens[index] + "\n")
            folder = self.data / f"device-{index}"
            lines = [
                f'coordinator = "127.0.0.1:{self.grpc_port}"',
                f'federation = "{self.federation}"',
                f'device_name = "{device_name}"',
                f'state_dir = "{self.workdir / f"agent-{index}"}"',
                "torch_threads = 1",
                f'enrolment_token_file = "{token_file}"',
                "[data]",
                f'dataset = "{folder}"',
                f'task = "{self.data / "task.toml"}"',
                "[tls]",
                f'ca_file = "{self.certs.ca.cert}"',
                f'cert_file = "{device_files.cert}"',
                f'key_file = "{device_files.key}"',
            ]
            path = self.workdir / f"agent-{index}.toml"
            path.write_text("\n".join(lines) + "\n")
            self._spawn(f"agent-{index}", ["edge_agent", "--config", str(path)],
                        {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
        return [self.device_modalities[f"device-{index}"] for index in range(self.options.clients)]

    def wait_for_devices(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            devices = self.admin.get(f"/v1/federations/{self.federation}/devices")
            online = sum(1 for d in devices if d["online"])
            if online >= self.options.clients:
                return
            self._check_alive()
            if time.monotonic() > deadline:
                raise FleetError(f"only {online} of {self.options.clients} agents enrolled (logs in {self.logs})")
            time.sleep(0.5)

    def run_round(self) -> RoundResult:
        started = time.monotonic()
        try:
            round_ = self.admin.post(f"/v1/federations/{self.federation}/rounds")
        except AdminApiError as exc:
            raise FleetError(f"could not start a round: {exc.detail}") from exc
        while round_["state"] not in ("committed", "failed"):
            self._check_alive()
            if time.monotonic() - started > self.options.round_timeout_s + 30:
                raise FleetError(f"round {round_['number']} did not finish (logs in {self.logs})")
            time.sleep(0.5)
            round_ = self.admin.get(f"/v1/rounds/{round_['id']}")
        if round_["state"] == "committed":
            round_ = self._evaluated(round_, started)
        m = round_["metrics"]
        return RoundResult(
            round=round_["number"], participants=int(m.get("participants", 0)),
            global_accuracy=m.get("global_accuracy", float("nan")),
            client_accuracy_mean=m.get("client_accuracy_mean", float("nan")),
            cloud_accuracy=m.get("cloud_accuracy", float("nan")),
            upload_bytes_per_client=m.get("upload_bytes_per_client", 0.0),
            upload_ratio=m.get("upload_ratio", 0.0),
            wall_s=m.get("wall_s", time.monotonic() - started),
            state=round_["state"], failure_reason=round_.get("failure_reason"))

    def _evaluated(self, round_: dict[str, Any], started: float) -> dict[str, Any]:
        """The committed round once the cloud worker evaluated its version (its accuracy joins the metrics)."""
        version_path = f"/v1/versions/{round_['version_id']}"
        while self.admin.get(version_path)["cloud_state"] == "pending":
            self._check_alive()
            if time.monotonic() - started > self.options.round_timeout_s + 30:
                raise FleetError(f"round {round_['number']} committed but its version was not evaluated "
                                 f"(logs in {self.logs})")
            time.sleep(0.25)
        return dict(self.admin.get(f"/v1/rounds/{round_['id']}"))

    def stop_federation(self, timeout_s: float = 60) -> None:
        """Stops the federation so agents exit by themselves (code 0), then stops the coordinator."""
        try:
            self.admin.post(f"/v1/federations/{self.federation}/stop")
        except (AdminApiError, OSError):
            return
        deadline = time.monotonic() + timeout_s
        for name, proc, _ in self._procs:
            if name.startswith("agent-"):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(1.0, deadline - time.monotonic()))

    def agent_exit_codes(self) -> dict[str, int | None]:
        """Each agent's exit code, or None while it still runs."""
        return {name: proc.poll() for name, proc, _ in self._procs if name.startswith("agent-")}

    def close(self) -> None:
        for _name, proc, _ in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for _name, proc, log in self._procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        self._procs.clear()
        if self._owns_workdir and os.environ.get("MLECS_KEEP_FLEET") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)


def run_fleet(options: FleetOptions, say: Callable[[str], None] = print,
              on_round: Callable[[RoundResult], None] | None = None) -> dict[str, Any]:
    """Runs a whole local federation and returns ``{"federation", "modalities", "rounds": [...]}``."""
    with LocalFleet(options, say) as fleet:
        fleet.start_coordinator()
        federation = fleet.create_federation()
        modality_sets = fleet.start_agents()
        say(f"federation {fleet.federation}: {options.clients} agents with modalities {modality_sets}")
        fleet.wait_for_devices()
        results = []
        for _ in range(options.rounds):
            result = fleet.run_round()
            results.append(result)
            if on_round:
                on_round(result)
            if result.state != "committed":
                break
        versions = fleet.admin.get(f"/v1/federations/{fleet.federation}/versions")
        if options.model_out is not None:
            from mlecs.model_export import export_version

            try:
                export_version(fleet.admin, versions[-1]["id"], options.model_out)
            except (ValueError, OSError) as exc:
                raise FleetError(f"could not export the model to {options.model_out}: {exc}") from exc
            say(f"wrote the last global version (round {versions[-1]['round_number']}) to {options.model_out}")
        fleet.stop_federation()
        return {
            "federation": fleet.federation,
            "federation_id": federation["id"],
            "modalities": modality_sets,
            "initial_accuracy": versions[0]["metrics"].get("accuracy") if versions else None,
            "agent_exit_codes": fleet.agent_exit_codes(),
            "rounds": [r.as_json() for r in results],
        }
