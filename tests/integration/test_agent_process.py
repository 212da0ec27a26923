"""The real agent daemon as a separate process against a real coordinator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import torch

from server.config import CoordinatorSettings
from tests.integration.coordinator_harness import running_coordinator, wait_for_round


def _agent_config(tmp_path, address: str, federation: str, modalities: str) -> str:
    path = tmp_path / "agent.toml"
    path.write_text(f"""
coordinator = "{address}"
federation = "{federation}"
device_name = "edge-test"
modalities = {modalities}
state_dir = "{tmp_path / 'state'}"
allow_plaintext = true
[partition]
num_clients = 3
client_index = 0
""")
    return str(path)


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def test_the_agent_trains_a_round_then_stops_cleanly_on_sigterm(tmp_path):
    with running_coordinator(CoordinatorSettings(state_dir=tmp_path / "coord")) as c:
        name = f"fed-{uuid.uuid4().hex[:8]}"
        config = {"model": {"backbone": "tiny"}, "public_epochs": 1, "private_epochs": 1}
        assert c.admin.post("/v1/federations", json={"name": name, "config": config}).status_code == 201
        agent = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "--config",
             _agent_config(tmp_path, c.grpc_address, name, '["image", "audio"]')],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        try:
            # Enrolment marks the device online on the coordinator a moment before the agent has
            # written its identity to disk, so wait for both.
            _wait(lambda: any(d["online"] for d in c.admin.get(f"/v1/federations/{name}/devices").json()),
                  120, "agent did not enrol")
            _wait((tmp_path / "state" / "identity.json").exists, 30, "agent did not persist its identity")
            round_id = c.admin.post(f"/v1/federations/{name}/rounds").json()["id"]
            round_ = wait_for_round(c.admin, round_id, timeout_s=180)
            assert round_["state"] == "committed", round_
            assert 0 < round_["metrics"]["client_accuracy_mean"] <= 1
            assert (tmp_path / "state" / "personal.pt").exists()  # the personalised model stays on the device
            assert not (tmp_path / "state" / "pending.json").exists()  # nothing left to upload

            agent.send_signal(signal.SIGTERM)
            output, _ = agent.communicate(timeout=60)
        finally:
            if agent.poll() is None:
                agent.kill()
        assert agent.returncode == 0, output
        assert "agent stopped" in output
        assert "personal parts restored" not in output  # nothing to restore in the first round

        # Restarted, the agent keeps its identity and trains the next round from its personal parts.
        first_personal = torch.load(tmp_path / "state" / "personal.pt", weights_only=True)
        personal_prefixes = ("extractors.", "connector.slots.", "head.")
        assert first_personal and all(k.startswith(personal_prefixes) for k in first_personal)
        agent = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "--config", str(tmp_path / "agent.toml")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        try:
            _wait(lambda: any(d["online"] for d in c.admin.get(f"/v1/federations/{name}/devices").json()),
                  120, "restarted agent did not come back")
            round_id = c.admin.post(f"/v1/federations/{name}/rounds").json()["id"]
            round_ = wait_for_round(c.admin, round_id, timeout_s=180)
            assert round_["state"] == "committed", round_
            agent.send_signal(signal.SIGTERM)
            output, _ = agent.communicate(timeout=60)
        finally:
            if agent.poll() is None:
                agent.kill()
        assert f"personal parts restored: {len(first_personal)} tensor(s)" in output, output
        assert len(c.admin.get(f"/v1/federations/{name}/devices").json()) == 1  # same device, not a new one
        second_personal = torch.load(tmp_path / "state" / "personal.pt", weights_only=True)
        assert not torch.equal(first_personal["head.weight"], second_personal["head.weight"])


def test_a_config_error_exits_with_code_2_and_says_what_is_wrong(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('federation = "x"\n')
    result = subprocess.run([sys.executable, "-m", "edge_agent", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "device_name: Field required" in result.stderr
    path.write_text('federation = "x"\ndevice_name = "d"\nallow_plaintext = true\n')
    result = subprocess.run([sys.executable, "-m", "edge_agent", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "no data: set data.dataset" in result.stderr
