"""The manual walkthrough (tools/walkthrough.sh, docs/operations/running.md) works as written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_manual_walkthrough_runs_as_written(tmp_path: Path, make_postgres_database) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLECS_")}
    env.update(MLECS_DATABASE_URL=make_postgres_database(), WALKTHROUGH_BACKBONE="tiny", HF_HUB_OFFLINE="1",
               WALKTHROUGH_GRPC_PORT=str(_free_port()), WALKTHROUGH_ADMIN_PORT=str(_free_port()))
    result = subprocess.run([str(ROOT / "tools" / "walkthrough.sh"), str(tmp_path / "walk")], env=env,
                            capture_output=True, text=True, timeout=1500)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in (tmp_path / "walk").glob("*.log"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:] + logs
    # Every command that touched the database said which one: PostgreSQL, never the embedded SQLite.
    assert "database: postgresql://" in result.stderr and "embedded SQLite" not in result.stderr
    prediction = json.loads((tmp_path / "walk" / "prediction.json").read_text())
    assert prediction["samples"] == 300 and 0.1 < prediction["accuracy"] <= 1
    assert "== done" in result.stdout
