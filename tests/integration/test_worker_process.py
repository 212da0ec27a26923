"""``mlecs-coordinator worker`` as a process: it refuses a database it cannot use with exit 2 and what to do, and
SIGTERM stops it cleanly (exit 0) after its running jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from server.persistence.database import migrate


def _worker(state_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "MLECS_STATE_DIR": str(state_dir), "MLECS_WORKER_METRICS_PORT": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("MLECS_DATABASE_URL", None)
    return subprocess.Popen([sys.executable, "-m", "server", "worker"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_a_worker_refuses_a_database_it_cannot_use_and_says_what_to_do(tmp_path: Path) -> None:
    missing = _worker(tmp_path / "nowhere")
    output, _ = missing.communicate(timeout=120)
    assert missing.returncode == 2 and "cannot read the coordinator's database" in output, output

    tmp_path.joinpath("empty").mkdir()
    unmigrated = _worker(tmp_path / "empty")
    output, _ = unmigrated.communicate(timeout=120)
    assert unmigrated.returncode == 2 and "mlecs-coordinator migrate" in output, output


def test_sigterm_stops_a_worker_cleanly(tmp_path: Path) -> None:
    migrate(f"sqlite:///{tmp_path / 'coordinator.db'}")
    worker = _worker(tmp_path)
    deadline = time.monotonic() + 60
    while not (tmp_path / "coordinator-jobs.sqlite").exists():  # the queue is open: it serves
        assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()[0]
        time.sleep(0.2)
    time.sleep(1)
    worker.send_signal(signal.SIGTERM)
    output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, output
    assert "Shutting down gracefully" in output
