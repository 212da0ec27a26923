"""The command lines against a real coordinator: `mlecs` covers every admin API operation (tables by default,
JSON with --json, the problem's detail and exit code 1 on errors), and `mlecs-coordinator tokens` makes the
first admin token directly on the database."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_agent.client import CoordinatorClient
from edge_agent.tasks import TrainTask, UploadRequest
from mlecs.cli import app
from mlecs.codec import decode_tensors, encode_tensors, sha256_hex
from mlecs.model import tensor_modality
from server.__main__ import cli as coordinator_cli
from server.config import CoordinatorSettings
from tests.integration.coordinator_harness import RunningCoordinator, running_coordinator, wait_for_round


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    settings = CoordinatorSettings(state_dir=tmp_path_factory.mktemp("cli"), scheduler_interval_s=0.2)
    with running_coordinator(settings) as running:
        yield running


def mlecs(c: RunningCoordinator, *args: str, token: str | None = None, code: int = 0) -> str:
    """Runs `mlecs ARGS` against the coordinator (the harness's admin token unless another is given); returns
    what it printed on stdout."""
    env = {"MLECS_ADMIN_URL": str(c.admin.base_url), "MLECS_ADMIN_TOKEN": token or c.admin_token}
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == code, f"mlecs {' '.join(args)}: {result.output}"
    return result.stdout


def mlecs_json(c: RunningCoordinator, *args: str, token: str | None = None) -> Any:
    return json.loads(mlecs(c, *args, "--json", token=token))


def _upload(client: CoordinatorClient, device_id: str) -> str:
    task = client.get_task(device_id)
    assert isinstance(task, TrainTask), task
    tensors = decode_tensors(client.download_global(device_id, task.version_id).adapter)
    rng = np.random.default_rng(1)
    delta = {n: rng.normal(0, 0.01, v.shape).astype(np.float32) for n, v in tensors.items()
             if tensor_modality(n) in (None, "image")}
    payload = encode_tensors(delta, "fp16")
    request = UploadRequest(round_id=task.round_id, device_id=device_id, upload_id=uuid.uuid4().hex, codec="fp16",
                            sha256=sha256_hex(payload), modalities=["image"], public_samples=10, private_samples=20,
                            base_version_id=task.version_id, metrics={})
    return client.upload(request, payload, 0, 65536)[0]


def test_the_mlecs_cli_drives_every_admin_operation(c: RunningCoordinator, tmp_path: Path) -> None:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    operator = mlecs(c, "tokens", "create", "--name", f"ops-{name}", "--scope", "operate", "--quiet").strip()
    assert operator.startswith("mlecs_at_")

    config = tmp_path / "federation.toml"
    config.write_text('min_updates = 1\nserver_learning = false\npublic_epochs = 1\n[model]\nbackbone = "tiny"\n')
    created = mlecs_json(c, "federations", "create", name, "--config", str(config), token=operator)
    assert created["config"]["min_updates"] == 1 and created["config"]["model"] == {"backbone": "tiny"}
    v0 = created["current_version_id"]
    assert name in mlecs(c, "federations", "list", token=operator)
    assert "backbone" in mlecs(c, "federations", "get", name)
    assert mlecs(c, "federations", "pause", name, token=operator).strip() == f"federation {name} is paused"
    assert mlecs(c, "federations", "resume", name, token=operator).strip() == f"federation {name} is active"

    enrolment = mlecs(c, "enrolment-tokens", "create", name, "--device-name", "cam", "--quiet", token=operator).strip()
    device = CoordinatorClient(c.grpc_address, task_wait_s=0)
    device_id, secret, _ = device.enrol(name, "cam", ["image"], enrolment_token=enrolment)
    device.authenticate(device_id, secret)
    [listed_token] = mlecs_json(c, "enrolment-tokens", "list", name)
    assert listed_token["state"] == "used" and listed_token["used_by_device_id"] == device_id
    assert "cam" in mlecs(c, "devices", "list", name) and device_id in mlecs(c, "devices", "list", name)
    assert mlecs_json(c, "devices", "get", device_id)["modalities"] == ["image"]

    round_ = mlecs_json(c, "rounds", "launch", name, token=operator)
    assert _upload(device, device_id) == "accepted"
    assert wait_for_round(c.admin, round_["id"])["state"] == "committed"
    assert round_["id"] in mlecs(c, "rounds", "list", name)
    assert "committed" in mlecs(c, "rounds", "get", round_["id"])
    [participant] = mlecs_json(c, "rounds", "participants", round_["id"])
    assert (participant["device_name"], participant["update_state"]) == ("cam", "accepted")
    assert "accepted" in mlecs(c, "rounds", "participants", round_["id"])
    assert mlecs_json(c, "rounds", "refusals", round_["id"], "--limit", "5") == []
    assert mlecs_json(c, "rounds", "metrics", round_["id"])["metrics"]["participants"] == 1
    assert "round metrics:" in mlecs(c, "rounds", "metrics", round_["id"])

    versions = mlecs_json(c, "versions", "list", name)
    assert [v["round_number"] for v in versions] == [0, 1]
    v1 = versions[1]["id"]
    assert mlecs_json(c, "versions", "get", v1)["round_number"] == 1
    assert "cloud work" in mlecs(c, "versions", "list", name) and "cloud_state" in mlecs(c, "versions", "get", v1)
    target = tmp_path / "v1.mlecs"
    assert "wrote" in mlecs(c, "versions", "download", v1, "-o", str(target))
    assert hashlib.sha256(target.read_bytes()).hexdigest() == versions[1]["adapter_sha256"]
    assert mlecs(c, "versions", "promote", name, v0).strip() == (
        f"federation {name}: current version is now {v0}")
    assert mlecs_json(c, "federations", "get", name)["current_version_id"] == v0

    assert "revoked" in mlecs(c, "devices", "revoke", device_id)
    assert mlecs_json(c, "devices", "get", device_id)["revoked"] is True

    tokens = mlecs_json(c, "tokens", "list")
    ops = next(t for t in tokens if t["name"] == f"ops-{name}")
    assert f"ops-{name}" in mlecs(c, "tokens", "list")
    actions = [e["action"] for e in mlecs_json(c, "audit", "--actor", f"ops-{name}")]
    assert actions == ["rounds.launch", "enrolment_tokens.create", "federations.resume", "federations.pause",
                       "federations.create"]
    assert "federations.create" in mlecs(c, "audit", "--actor", f"ops-{name}", "--action", "federations")
    assert mlecs_json(c, "audit", "--actor", f"ops-{name}", "--limit", "1")[0]["action"] == "rounds.launch"
    assert "token" in mlecs(c, "tokens", "revoke", ops["id"])
    assert mlecs(c, "federations", "stop", name).strip() == f"federation {name} is stopped"


def test_cli_errors_print_the_problem_detail_and_exit_1(c: RunningCoordinator, tmp_path: Path) -> None:
    env = {"MLECS_ADMIN_URL": str(c.admin.base_url), "MLECS_ADMIN_TOKEN": ""}
    missing = CliRunner().invoke(app, ["federations", "list"], env=env)
    assert missing.exit_code == 1
    assert "HTTP 401: missing admin token" in missing.stderr and "MLECS_ADMIN_TOKEN" in missing.stderr

    reader = c.token_for("read", name="cli-reader")
    refused = CliRunner().invoke(app, ["federations", "create", "nope"], env={**env, "MLECS_ADMIN_TOKEN": reader})
    assert refused.exit_code == 1 and "HTTP 403: this operation needs the 'operate' scope" in refused.stderr
    assert c.admin.get("/v1/federations/nope").status_code == 404

    unknown = CliRunner().invoke(app, ["rounds", "get", "nope", "--token", c.admin_token], env=env)
    assert unknown.exit_code == 1 and "HTTP 404: round nope not found" in unknown.stderr

    closed = CliRunner().invoke(app, ["federations", "list", "--url", "http://127.0.0.1:9", "--token", "x"])
    assert closed.exit_code == 1 and "cannot reach the admin API at http://127.0.0.1:9" in closed.stderr

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    invalid = CliRunner().invoke(app, ["federations", "create", "x", "--config", str(bad)], env=env)
    said = " ".join(invalid.output.replace("│", " ").split())  # rich wraps the message in a box
    assert invalid.exit_code == 2 and "Invalid value for --config" in said and "is not valid JSON" in said


def _coordinator_cli(env: dict[str, str], *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(coordinator_cli, list(args), env=env)
    assert result.exit_code == code, result.output
    return result.stdout


@pytest.mark.parametrize("backend", ["embedded", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_first_admin_token_comes_from_the_coordinator_cli_on_its_database(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    env = {"MLECS_STATE_DIR": str(tmp_path), "MLECS_DATABASE_URL": ""}
    if backend == "postgres":
        env["MLECS_DATABASE_URL"] = request.getfixturevalue("make_postgres_database")()
    token = _coordinator_cli(env, "tokens", "create", "--name", "root", "--scope", "admin", "--quiet").strip()
    assert token.startswith("mlecs_at_") and "\n" not in token
    verbose = _coordinator_cli(env, "tokens", "create", "--name", "ci", "--scope", "read", "--expires-in-days", "2")
    assert "scopes read" in verbose and "not shown again" in verbose
    listed = _coordinator_cli(env, "tokens", "list")
    assert "root" in listed and "ci" in listed and token not in listed
    assert "unknown scope(s) 'root'" in CliRunner().invoke(
        coordinator_cli, ["tokens", "create", "--name", "x", "--scope", "root"], env=env).output

    settings = CoordinatorSettings(state_dir=tmp_path, database_url=env["MLECS_DATABASE_URL"] or None)
    with running_coordinator(settings) as running:
        root = running.client(token)
        assert root.get("/v1/tokens").status_code == 200
        root_id = next(t["id"] for t in root.get("/v1/tokens").json() if t["name"] == "root")
        assert "revoked token" in _coordinator_cli(env, "tokens", "revoke", root_id)
        time.sleep(0.01)
        assert root.get("/v1/tokens").status_code == 401  # revoked on the database: refused on the next request
    assert CliRunner().invoke(coordinator_cli, ["tokens", "revoke", "nope"], env=env).exit_code == 1


def test_a_federation_names_its_task_by_built_in_name_or_file(c: RunningCoordinator, tmp_path: Path) -> None:
    operator = c.token_for("operate")
    by_name = mlecs_json(c, "federations", "create", f"t-{uuid.uuid4().hex[:6]}", "--task", "avmnist",
                         token=operator)
    assert 'name = "avmnist"' in by_name["config"]["task"]  # frozen as text, not a name that may change
    assert [i["name"] for i in by_name["config"]["model"]["inputs"]] == ["audio", "image"]
    task = tmp_path / "pair.toml"
    task.write_text('name = "pair"\nlabels = ["a", "b"]\n[modalities.v]\nkind = "vector"\ndim = 3\n'
                    '[model]\nbackbone = "tiny"\n')
    by_file = mlecs_json(c, "federations", "create", f"t-{uuid.uuid4().hex[:6]}", "--task", str(task),
                         token=operator)
    assert by_file["config"]["model"]["num_classes"] == 2
    assert by_file["config"]["model"]["inputs"] == [
        {"name": "v", "kind": "vector", "shape": [3], "mean": 0.0, "std": 1.0, "extractor": "builtin"}]
    mixed = tmp_path / "mixed.toml"  # a task with modality v only, and eligible sets naming image: refused
    mixed.write_text('eligible_modality_sets = [["image"]]\n')
    env = {"MLECS_ADMIN_URL": str(c.admin.base_url), "MLECS_ADMIN_TOKEN": operator}
    other = CliRunner().invoke(app, ["federations", "create", "t-mix", "--task", str(task), "--config", str(mixed)],
                               env=env)
    assert other.exit_code == 1 and "HTTP 422" in other.output and "unknown modality 'image'" in other.output
    task.write_text('name = "pair"\nlabels = ["a"]\n[modalities.v]\nkind = "vector"\ndim = 3\n')
    refused = CliRunner().invoke(app, ["federations", "create", "t-bad", "--task", str(task)], env=env)
    assert refused.exit_code == 1
    assert "labels: List should have at least 2 items" in refused.output
