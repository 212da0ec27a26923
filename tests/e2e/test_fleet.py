"""The whole system in separate processes: `mlecs fleet` with 3 agents for 2 rounds on real AV-MNIST."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_a_local_federation_of_three_agents_learns_and_stays_within_the_upload_budget(tmp_path):
    out = tmp_path / "fleet.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mlecs", "fleet", "--clients", "3", "--rounds", "2", "--json", str(out),
         "--workdir", str(tmp_path / "fleet")],
        capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    rounds = report["rounds"]

    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["state"] == "committed" and r["participants"] == 3 for r in rounds)
    # Learning: above chance (0.1 for ten digits) after round 1, and better after round 2.
    assert rounds[0]["global_accuracy"] > 0.3
    assert rounds[1]["global_accuracy"] > rounds[0]["global_accuracy"]
    assert report["initial_accuracy"] < rounds[0]["global_accuracy"]
    assert all(0.1 < r["client_accuracy_mean"] <= 1 for r in rounds)
    # SE-CCL: the coordinator tuned and evaluated its cloud model every round.
    assert all(0.1 < r["cloud_accuracy"] <= 1 for r in rounds)
    # Communication: what a client uploads is a small, bounded share of the full edge model.
    assert all(0 < r["upload_bytes_per_client"] < 600_000 for r in rounds)
    assert all(r["upload_ratio"] <= 0.0065 for r in rounds)
    # Agents left on their own when the federation stopped (exit code 0), and the table was printed.
    assert set(report["agent_exit_codes"].values()) == {0}
    assert "global acc" in result.stdout and len(result.stdout.strip().splitlines()) == 3
    assert sorted(map(tuple, report["modalities"])) == [("audio",), ("audio", "image"), ("image",)]


@pytest.mark.postgres
@pytest.mark.redis
def test_a_fleet_on_postgres_and_redis_leaves_its_rounds_and_versions_as_rows(tmp_path, make_postgres_database,
                                                                              redis_prefix):
    from sqlalchemy import create_engine, text

    from server.persistence.database import normalise_url

    url = make_postgres_database()
    out = tmp_path / "fleet.json"
    result = subprocess.run(
        [sys.executable, "-m", "mlecs", "fleet", "--clients", "2", "--rounds", "2", "--backbone", "tiny",
         "--public-epochs", "1", "--json", str(out), "--database-url", url,
         "--redis-url", "redis://127.0.0.1:6379/0"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "MLECS_REDIS_PREFIX": redis_prefix})  # keys removed after
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Postgres" in result.stderr
    report = json.loads(out.read_text())
    engine = create_engine(normalise_url(url))
    with engine.connect() as conn:
        rounds = conn.execute(text("SELECT number, state FROM rounds WHERE federation_id = :f ORDER BY number"),
                              {"f": report["federation_id"]}).all()
        versions = conn.execute(text("SELECT round_number FROM model_versions WHERE federation_id = :f "
                                     "ORDER BY round_number"), {"f": report["federation_id"]}).scalars().all()
        accepted = conn.execute(text("SELECT count(*) FROM updates WHERE state = 'accepted'")).scalar()
    engine.dispose()
    assert [tuple(r) for r in rounds] == [(1, "committed"), (2, "committed")]
    assert versions == [0, 1, 2]
    assert accepted == 4


def test_your_data_flow_export_federate_export_the_model_and_predict(tmp_path):
    """The documented flow (docs/datasets.md): AV-MNIST exported as 3 device folders, a coordinator and 3 agents
    on them until round 3, the model exported, and `mlecs predict` agreeing with the coordinator."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def mlecs(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "mlecs", *args], capture_output=True, text=True, timeout=900,
                                env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    mlecs("data", "export-avmnist", "--out", "fleet-data", "--devices", "3")
    mlecs("fleet", "--data", "fleet-data", "--clients", "3", "--rounds", "3", "--backbone", "tiny",
          "--model-out", "model", "--json", "fleet.json")
    predicted = json.loads(mlecs("predict", "--model", "model", "--dataset", "fleet-data/test", "--json").stdout)

    rounds = json.loads((tmp_path / "fleet.json").read_text())["rounds"]
    assert [r["state"] for r in rounds] == ["committed"] * 3
    assert predicted["samples"] == 300
    assert abs(predicted["accuracy"] - rounds[-1]["global_accuracy"]) <= 0.01  # the target: within 1 point
    one = json.loads(mlecs("predict", "--model", "model", "--image", "fleet-data/test/image/00000.png",
                           "--json").stdout)
    assert len(one["probabilities"]) == 10 and one["label"] in {"zero", "one", "two", "three", "four", "five", "six",
                                                               "seven", "eight", "nine"}
