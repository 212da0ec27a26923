"""The edge agent as installed software: the systemd unit checked by systemd's own tools, the installer run
into a throwaway root (install -> upgrade -> uninstall), and the agent started from that installed layout
enrolling with a real coordinator over mutual TLS."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.__main__ import EXIT_CONFIG, EXIT_REFUSED
from edge_agent.logs import JsonFormatter
from mlecs import certs
from mlecs.data.avmnist import default_data_dir
from server.config import CoordinatorSettings
from tests.integration.coordinator_harness import running_coordinator

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "mlecs-agent.service"
INSTALLER = ROOT / "deploy" / "install-agent.sh"
INSTALLED_AGENT = "/opt/mlecs/venv/bin/mlecs-agent"


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def _systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: apt-get install systemd"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def checkable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists here (verify checks it is one)."""
    agent = tmp_path / "root" / INSTALLED_AGENT.lstrip("/")
    agent.parent.mkdir(parents=True)
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(INSTALLED_AGENT, str(agent)))
    return unit


def test_the_unit_passes_systemd_analyze_verify_without_a_warning(checkable_unit):
    result = _systemd_analyze("verify", str(checkable_unit))
    # verify exits 0 on unknown or misspelt keys and only warns on stderr, so any output is a failure.
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result.stderr


def test_the_unit_is_hardened_by_systemds_own_exposure_score(checkable_unit):
    # --threshold is the exposure level x 10: at most 2.0 ("OK") of systemd's 10.
    result = _systemd_analyze("security", "--offline=true", "--threshold=20", str(checkable_unit))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_runs_the_installed_agent_as_its_own_user_and_does_not_restart_on_config_errors():
    unit = _unit_settings()
    assert unit["ExecStart"] == [f"{INSTALLED_AGENT} --config /etc/mlecs/agent.toml --log-format json"]
    assert unit["User"] == ["mlecs"] and unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"] and unit["ProtectHome"] == ["yes"]
    assert unit["StateDirectory"] == ["mlecs-agent"] and unit["ReadWritePaths"] == ["/var/lib/mlecs-agent"]
    assert unit["Restart"] == ["on-failure"]
    assert set(unit["RestartPreventExitStatus"][0].split()) == {str(EXIT_CONFIG), str(EXIT_REFUSED)}
    assert unit["CapabilityBoundingSet"] == [""]
    assert "HF_HUB_OFFLINE=1" in unit["Environment"][0].split()


# ---- the installer -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout as a wheel, built from a copy so that the build leaves nothing in the checkout."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("mlecs", "server", "edge_agent"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(work / "dist"), str(source)], check=True, timeout=120)
    (built,) = (work / "dist").glob("mlecs-*.whl")
    return built


@pytest.fixture
def device_files(tmp_path: Path) -> Path:
    """What an operator copies to a device: ca.pem, edge-a.pem, edge-a.key and the enrolment token."""
    pki = tmp_path / "pki"
    certs.init_directory(pki)
    certs.issue_device_files(pki, "edge-a")
    files = tmp_path / "device-files"
    files.mkdir()
    layout = certs.CaLayout(pki)
    shutil.copy(layout.ca.cert, files / "ca.pem")
    shutil.copy(layout.device("edge-a").cert, files / "edge-a.pem")
    shutil.copy(layout.device("edge-a").key, files / "edge-a.key")
    return files


def _config(root: Path, coordinator: str = "127.0.0.1:50051", federation: str = "fleet", **extra: str) -> str:
    """An agent config for a device installed under ``root``: every path it names is inside the root."""
    lines = [f'coordinator = "{coordinator}"', f'federation = "{federation}"', 'device_name = "edge-a"',
             'modalities = ["image", "audio"]', f'state_dir = "{root}/var/lib/mlecs-agent"',
             f'enrolment_token_file = "{root}/etc/mlecs/enrolment-token"',
             *(f"{key} = {value}" for key, value in extra.items()),
             "[data]", f'dir = "{default_data_dir()}"',
             "[partition]", "num_clients = 3", "client_index = 0",
             "[tls]", f'ca_file = "{root}/etc/mlecs/certs/ca.pem"',
             f'cert_file = "{root}/etc/mlecs/certs/device.pem"', f'key_file = "{root}/etc/mlecs/certs/device.key"']
    return "\n".join(lines) + "\n"


def _installer(root: Path, wheel: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installer into ``root``, reusing this checkout's virtualenv packages so nothing is downloaded."""
    return subprocess.run(
        ["bash", str(INSTALLER), *args, "--root", str(root), "--source", str(wheel), "--python", sys.executable,
         "--reuse-packages", sys.prefix],
        capture_output=True, text=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _install(tmp_path: Path, wheel: Path, device_files: Path, config: str) -> Path:
    root = tmp_path / "root"
    (tmp_path / "agent.toml").write_text(config)
    (tmp_path / "token").write_text("the-token\n")
    result = _installer(root, wheel, "install", "--config", str(tmp_path / "agent.toml"),
                        "--certs", str(device_files), "--enrolment-token", str(tmp_path / "token"))
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def test_the_installer_installs_upgrades_and_uninstalls_keeping_config_certs_and_state(
        tmp_path, wheel, device_files):
    root = tmp_path / "root"
    root = _install(tmp_path, wheel, device_files, _config(root))
    etc, opt, state = root / "etc/mlecs", root / "opt/mlecs", root / "var/lib/mlecs-agent"
    assert (root / "etc/systemd/system/mlecs-agent.service").read_text() == UNIT.read_text()
    assert (etc / "agent.toml").read_text() == _config(root)
    assert (etc / "certs/ca.pem").read_bytes() == (device_files / "ca.pem").read_bytes()
    assert (etc / "certs/device.pem").read_bytes() == (device_files / "edge-a.pem").read_bytes()
    assert (etc / "certs/device.key").read_bytes() == (device_files / "edge-a.key").read_bytes()
    assert (etc / "enrolment-token").read_text() == "the-token\n"
    assert {_mode(etc / name) for name in ("agent.toml", "enrolment-token", "certs/device.key")} == {0o640}
    assert _mode(etc) == _mode(etc / "certs") == 0o750 and _mode(state) == 0o700
    first_venv = (opt / "venv").resolve()
    assert (opt / "venv").is_symlink() and first_venv.parent == opt / "venvs"
    check = subprocess.run([str(opt / "venv/bin/mlecs-agent"), "--config", str(etc / "agent.toml"), "--check-config"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "device_name=edge-a" in check.stdout and "tls=on" in check.stdout, check
    assert "already installed" in _installer(root, wheel, "install").stderr

    # Upgrade: a new virtualenv behind the same link; the config is not overwritten, state and certs stay.
    (state / "identity.json").write_text('{"device_id": "kept"}')
    (tmp_path / "changed.toml").write_text(_config(root, coordinator="10.0.0.9:50051"))
    result = _installer(root, wheel, "upgrade", "--config", str(tmp_path / "changed.toml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (opt / "venv").resolve() != first_venv and not first_venv.exists()
    assert [p.name for p in (opt / "venvs").iterdir()] == [(opt / "venv").resolve().name]
    assert (opt / "venv/bin/mlecs-agent").exists()
    assert (etc / "agent.toml").read_text() == _config(root)
    assert "10.0.0.9" in (etc / "agent.toml.new").read_text()
    assert (state / "identity.json").read_text() == '{"device_id": "kept"}'
    assert (etc / "certs/device.key").read_bytes() == (device_files / "edge-a.key").read_bytes()

    # Uninstall keeps what only the operator can recreate; --purge removes it too.
    result = _installer(root, wheel, "uninstall")
    assert result.returncode == 0, result.stderr
    assert not opt.exists() and not (root / "etc/systemd/system/mlecs-agent.service").exists()
    assert (etc / "agent.toml").exists() and (state / "identity.json").exists()
    result = _installer(root, wheel, "uninstall", "--purge")
    assert result.returncode == 0, result.stderr
    assert not etc.exists() and not state.exists()


def test_an_upgrade_that_fails_its_config_check_leaves_the_installed_version_running(
        tmp_path, wheel, device_files):
    root = tmp_path / "root"
    root = _install(tmp_path, wheel, device_files, _config(root))
    before = (root / "opt/mlecs/venv").resolve()
    # The installed config is edited to something this version rejects: the upgrade must not switch.
    (root / "etc/mlecs/agent.toml").write_text(_config(root, log_format='"xml"'))
    result = _installer(root, wheel, "upgrade")
    assert result.returncode == 1
    assert "log_format" in result.stderr
    assert (root / "opt/mlecs/venv").resolve() == before
    assert list((root / "opt/mlecs/venvs").iterdir()) == [before]  # the half-built one is gone


def test_the_installer_refuses_what_would_break_the_service_and_says_why(tmp_path, wheel, device_files):
    root = tmp_path / "root"
    (tmp_path / "elsewhere.toml").write_text(_config(root).replace(f"{root}/var/lib/mlecs-agent", "/srv/agent"))
    result = _installer(root, wheel, "install", "--config", str(tmp_path / "elsewhere.toml"),
                        "--certs", str(device_files))
    assert result.returncode == 1 and "state_dir" in result.stderr and "/srv/agent" in result.stderr
    assert not (root / "opt/mlecs/venv").exists()

    shutil.copy(device_files / "ca.pem", device_files / "ca.key")
    result = _installer(tmp_path / "other", wheel, "install", "--config", str(tmp_path / "elsewhere.toml"),
                        "--certs", str(device_files))
    assert result.returncode == 1 and "ca.key" in result.stderr

    result = subprocess.run(["bash", str(INSTALLER), "install", "--frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "--frobnicate" in result.stderr
    result = subprocess.run(["bash", str(INSTALLER), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "uninstall" in result.stdout and "--purge" in result.stdout


# ---- the installed agent against a real coordinator ------------------------------------------------------


@pytest.fixture
def secure_coordinator(tmp_path: Path, device_files: Path) -> Iterator:
    layout = certs.CaLayout(tmp_path / "pki")
    with running_coordinator(CoordinatorSettings(
            state_dir=tmp_path / "coordinator", tls_cert_file=layout.coordinator.cert,
            tls_key_file=layout.coordinator.key, tls_client_ca_file=layout.ca.cert)) as running:
        yield running


def test_the_installed_agent_enrols_over_mutual_tls_logs_json_and_stops_cleanly(
        tmp_path, wheel, device_files, secure_coordinator):
    c = secure_coordinator
    federation = f"fed-{uuid.uuid4().hex[:8]}"
    response = c.admin.post("/v1/federations", json={"name": federation, "config": {"model": {"backbone": "tiny"}}})
    assert response.status_code == 201, response.text
    assert c.coordinator.services is not None
    token = c.coordinator.services.devices.issue_enrolment_token(federation, "edge-a", 600, "tests")[0]

    root = tmp_path / "root"
    (tmp_path / "agent.toml").write_text(_config(root, coordinator=c.grpc_address, federation=federation))
    (tmp_path / "token").write_text(token)
    result = _installer(root, wheel, "install", "--config", str(tmp_path / "agent.toml"),
                        "--certs", str(device_files), "--enrolment-token", str(tmp_path / "token"))
    assert result.returncode == 0, result.stdout + result.stderr

    # The unit's command line, with the installed paths under the throwaway root.
    unit_command = _unit_settings()["ExecStart"][0].replace("/opt/", f"{root}/opt/").replace("/etc/", f"{root}/etc/")
    env = {key: value for key, value in os.environ.items() if key not in ("JOURNAL_STREAM", "PYTHONPATH")}
    agent = subprocess.Popen(unit_command.split(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=root / "var/lib/mlecs-agent",
                             env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 90
        while not any(d["online"] for d in c.admin.get(f"/v1/federations/{federation}/devices").json()):
            assert agent.poll() is None, agent.communicate()[0]
            assert time.monotonic() < deadline, "the installed agent did not enrol"
            time.sleep(0.3)
        deadline = time.monotonic() + 30
        while not (root / "var/lib/mlecs-agent/identity.json").exists():
            assert time.monotonic() < deadline, "the installed agent did not persist its identity in its state"
            time.sleep(0.2)
        agent.send_signal(signal.SIGTERM)
        output, _ = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()
    assert agent.returncode == 0, output
    # Everything the installed agent wrote is the code from the installed virtualenv, logging JSON lines.
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert records and all({"ts", "level", "logger", "message"} <= record.keys() for record in records), output
    assert any("agent stopped" in record["message"] for record in records), output
    (device,) = c.admin.get(f"/v1/federations/{federation}/devices").json()
    assert device["name"] == "edge-a"


def test_json_logs_carry_the_journal_priority_prefix_only_under_systemd():
    record = logging.LogRecord("mlecs.agent", logging.WARNING, __file__, 1, "disk %s", ("full",), None)
    plain = JsonFormatter(journal=False).format(record)
    assert json.loads(plain)["message"] == "disk full" and json.loads(plain)["level"] == "WARNING"
    assert JsonFormatter(journal=True).format(record) == "<4>" + plain
