"""A federation of another task end to end: series and vector modalities, data generated here, real agent
processes reading their dataset directories, a real coordinator evaluating on its own test directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_agent.client import CoordinatorClient
from edge_agent.errors import RequestRefused
from mlecs.cli import app
from mlecs.inference import load_model
from server.config import CoordinatorSettings
from tests.integration.coordinator_harness import running_coordinator, wait_for_round

TASK = """
name = "bearing"
version = 1
labels = ["ok", "worn", "broken"]
label_text = "a {label} bearing"
[modalities.accel]
kind = "series"
channels = 3
length = 64
[modalities.spectrum]
kind = "vector"
dim = 8
[model]
backbone = "tiny"
fused_dim = 64
"""


def _write_dataset(directory: Path, size: int, seed: int, *, split_heldout: float = 0.0,
                   corrupt_rows: int = 0) -> None:
    """Three classes told apart by the accelerometer's level and by the spectrum's first bin; each sample
    lacks one of the two modalities a third of the time."""
    rng = np.random.default_rng(seed)
    (directory / "accel").mkdir(parents=True)
    (directory / "spectrum").mkdir()
    rows = ["id,label,split,accel,spectrum"]
    labels = ["ok", "worn", "broken"]
    for i in range(size):
        label = int(rng.integers(0, 3))
        lacks = int(rng.integers(0, 3))  # 0: both, 1: no accel, 2: no spectrum
        sample_id = f"{directory.name}-{i:04d}"
        accel = spectrum = ""
        if lacks != 1:
            accel = f"accel/{sample_id}.csv"
            steps = rng.normal(size=(int(rng.integers(40, 90)), 3)) + label  # any length: cropped or padded
            np.savetxt(directory / accel, steps, delimiter=",", header="x,y,z", comments="")
        if lacks != 2:
            spectrum = f"spectrum/{sample_id}.npy"
            values = rng.normal(size=8)
            values[0] += 2 * label
            np.save(directory / spectrum, values.astype(np.float32))
        split = "heldout" if rng.random() < split_heldout else "train"
        rows.append(f"{sample_id},{labels[label]},{split},{accel},{spectrum}")
    for i in range(corrupt_rows):
        (directory / "accel" / f"broken-{i}.csv").write_text("1,2\n3\n")
        rows.append(f"broken-{i},ok,train,accel/broken-{i}.csv,")
    (directory / "manifest.csv").write_text("\n".join(rows) + "\n")


def _save(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def _agent_config(root: Path, name: str, address: str, federation: str, dataset: Path,
                  public: Path | None = None) -> Path:
    path = root / f"{name}.toml"
    copy = "" if public is None else f'public = "{public}"'
    path.write_text(f"""
coordinator = "{address}"
federation = "{federation}"
device_name = "{name}"
state_dir = "{root / name}"
allow_plaintext = true
[data]
dataset = "{dataset}"
task = "{root / 'bearing.toml'}"
{copy}
""")
    return path


def _start_agent(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "edge_agent", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def _wait(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


@pytest.fixture
def fleet_data(tmp_path: Path) -> Path:
    (tmp_path / "bearing.toml").write_text(TASK)
    _write_dataset(tmp_path / "coordinator" / "public", 60, seed=1)
    _write_dataset(tmp_path / "coordinator" / "test", 120, seed=2)
    _write_dataset(tmp_path / "device-0", 150, seed=3, split_heldout=0.2, corrupt_rows=1)
    _write_dataset(tmp_path / "device-1", 150, seed=4, split_heldout=0.2)
    return tmp_path


def _public_copy(fleet_data: Path) -> tuple[Path, str]:
    """device-1's own copy of the public set, with one sample's file altered and one sample of its own added;
    returns the copy and the altered sample's id."""
    copy = fleet_data / "device-1-public"
    shutil.copytree(fleet_data / "coordinator" / "public", copy)
    manifest = (copy / "manifest.csv").read_text().splitlines()
    altered = next(line.split(",") for line in manifest[1:] if line.split(",")[3])
    np.savetxt(copy / altered[3], np.ones((50, 3)), delimiter=",", header="x,y,z", comments="")
    np.save(copy / "spectrum" / "mine.npy", np.zeros(8, dtype=np.float32))
    manifest.append("mine,ok,train,,spectrum/mine.npy")
    (copy / "manifest.csv").write_text("\n".join(manifest) + "\n")
    return copy, altered[0]


def test_a_sensor_task_federates_from_dataset_directories(fleet_data: Path) -> None:
    settings = CoordinatorSettings(state_dir=fleet_data / "coord", task_data={"bearing": fleet_data / "coordinator"})
    with running_coordinator(settings) as c:
        name = f"bearing-{uuid.uuid4().hex[:8]}"
        config = {"task": TASK, "min_updates": 2, "private_epochs": 3, "batch_size": 16,
                  "learning_rate": 3e-3, "fused_upload_samples": 8, "public_shard_samples": 40}
        created = c.admin.post("/v1/federations", json={"name": name, "config": config})
        assert created.status_code == 201, created.text
        initial = c.admin.get(f"/v1/federations/{name}/versions").json()[0]
        assert set(initial["metrics"]) == {"accuracy", "accuracy_accel", "accuracy_spectrum"}

        # The coordinator refuses a device naming a modality the task lacks, and says which it has.
        client = CoordinatorClient(c.grpc_address)
        try:
            with pytest.raises(RequestRefused, match=r"unknown modality 'image'.*accel, spectrum"):
                client.enrol(name, "camera", ["image"])
        finally:
            client.close()

        # device-0 downloads its shard of the public set; device-1 brings its own copy, which the coordinator checks.
        copy, altered = _public_copy(fleet_data)
        agents = [_start_agent(_agent_config(fleet_data, "device-0", c.grpc_address, name, fleet_data / "device-0")),
                  _start_agent(_agent_config(fleet_data, "device-1", c.grpc_address, name, fleet_data / "device-1",
                                             public=copy))]
        try:
            _wait(lambda: sum(d["online"] for d in c.admin.get(f"/v1/federations/{name}/devices").json()) == 2,
                  120, "agents did not enrol")
            devices = c.admin.get(f"/v1/federations/{name}/devices").json()
            assert all(sorted(d["modalities"]) == ["accel", "spectrum"] for d in devices)
            accuracies = []
            for _ in range(3):
                round_id = c.admin.post(f"/v1/federations/{name}/rounds").json()["id"]
                round_ = wait_for_round(c.admin, round_id, timeout_s=240)
                assert round_["state"] == "committed", round_
                version = c.admin.get(f"/v1/federations/{name}/versions").json()[-1]
                accuracies.append(version["metrics"]["accuracy"])
        finally:
            for agent in agents:
                agent.terminate()
            outputs = [agent.communicate(timeout=60)[0] for agent in agents]
            for k, output in enumerate(outputs):
                print(f"--- device-{k} ---\n{output}")  # shown when the test fails
        # The coordinator's test directory: 120 samples of three classes, each missing a modality at times.
        assert accuracies[-1] > 0.8 > initial["metrics"]["accuracy"], (initial["metrics"], accuracies)
        assert "line 152, column accel, accel/broken-0.csv: the CSV rows have different numbers" in outputs[0]
        assert "150 of 151 rows usable" in outputs[0]
        assert "public shard downloaded: 40 samples" in outputs[0]
        assert f"sample {altered} left out: its accel file differs from the coordinator's" in outputs[1]
        assert "sample mine left out: not in the coordinator's public set" in outputs[1]
        assert "59 of 61 samples verified by the coordinator" in outputs[1]
        _check_shard_download(c.grpc_address, name)

        # The last version as a model directory, run outside the federation.
        version = c.admin.get(f"/v1/federations/{name}/versions").json()[-1]
        runner = CliRunner()
        exported = runner.invoke(app, ["model", "export", version["id"], "--out", str(fleet_data / "model"),
                                       "--url", str(c.admin.base_url), "--token", c.admin_token])
        assert exported.exit_code == 0, exported.output
    evaluated = runner.invoke(app, ["predict", "--model", str(fleet_data / "model"), "--dataset",
                                    str(fleet_data / "coordinator" / "test"), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads(evaluated.output)
    assert result["samples"] == 120
    assert abs(result["accuracy"] - version["metrics"]["accuracy"]) < 0.01  # the coordinator's own evaluation
    model = load_model(fleet_data / "model")
    assert model.labels == ["ok", "worn", "broken"] and model.source["version_id"] == version["id"]
    broken = np.zeros(8, dtype=np.float32)
    broken[0] = 4.0  # the spectrum of a broken bearing, alone
    single = runner.invoke(app, ["predict", "--model", str(fleet_data / "model"), "--spectrum",
                                 str(_save(fleet_data / "one.npy", broken)), "--json"])
    assert single.exit_code == 0, single.output
    answer = json.loads(single.output)
    assert answer["label"] == "broken" and len(answer["probabilities"]) == 3
    assert abs(sum(answer["probabilities"]) - 1) < 1e-5

    # A device exports the model it personalised in its latest round (offline: from its state directory).
    config = fleet_data / "device-0.toml"
    exported_personal = subprocess.run(
        [sys.executable, "-m", "edge_agent", "--config", str(config), "--export-model", str(fleet_data / "mine")],
        capture_output=True, text=True, timeout=120)
    assert exported_personal.returncode == 0, exported_personal.stderr
    personal = load_model(fleet_data / "mine")
    assert personal.source["round_number"] == 3 and personal.modalities == ("accel", "spectrum")
    assert personal.evaluate(fleet_data / "coordinator" / "test")["accuracy"] > 0.6


def _check_shard_download(address: str, federation: str) -> None:
    """Over the wire: the shard comes with its digest; asked again with that digest, nothing more is sent."""
    client = CoordinatorClient(address)
    try:
        device_id, secret, _ = client.enrol(federation, "probe", ["spectrum"])
        client.authenticate(device_id, secret)
        first = client.download_public_shard(device_id)
        assert first.held and first.samples == 40 and first.archive is not None
        assert hashlib.sha256(first.archive).hexdigest() == first.sha256
        again = client.download_public_shard(device_id, first.sha256)
        assert again.held and again.sha256 == first.sha256 and again.archive is None
    finally:
        client.close()


def test_an_agent_whose_dataset_has_no_usable_row_stops_with_exit_code_2(fleet_data: Path) -> None:
    empty = fleet_data / "empty"
    empty.mkdir()
    (empty / "manifest.csv").write_text("id,label,split,accel\nx,unknown-label,train,a.csv\n")
    agent = _start_agent(_agent_config(fleet_data, "device-9", "127.0.0.1:1", "nowhere", empty))
    output, _ = agent.communicate(timeout=120)
    assert agent.returncode == 2, output
    assert "no usable data" in output and "line 2, column label: label 'unknown-label'" in output
