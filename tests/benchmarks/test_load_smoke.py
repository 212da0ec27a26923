"""The load benchmark end to end: a real coordinator subprocess, three simulated devices, two rounds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.load_report import REQUIRED_KEYS


def test_three_devices_commit_two_rounds_and_every_metric_is_reported(tmp_path: Path) -> None:
    out = tmp_path / "load"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.load", "--devices", "3", "--payload-params", "100000", "--rounds", "2",
         # Heartbeats every second, so that the short rounds phase holds a few of them.
         "--heartbeat-s", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    records = json.loads((out / "results.json").read_text())

    assert len(records) == 1
    record = records[0]
    assert set(REQUIRED_KEYS) <= set(record)
    assert record["devices"] == 3 and record["rounds"] == 2 and record["rounds_committed"] == 2
    assert abs(record["payload_params"] - 100_000) <= 2_000
    for key in ("round_wall_s_median", "heartbeat_p99_ms", "upload_p99_ms", "cpu_s_per_update", "peak_rss_mib",
                "wire_bytes_per_update"):
        assert isinstance(record[key], float | int) and math.isfinite(record[key]) and record[key] > 0, key
    # fp16 halves the bytes; zstd barely shrinks random values, and protobuf adds little.
    assert 1.2 * record["payload_params"] < record["wire_bytes_per_update"] < 2.5 * record["payload_params"]
    assert record["accepted_updates"] == 6 and record["uploads_rejected"] == 0
    assert record["rpc_latency_ms"]["UploadUpdate"]["count"] == 6
    assert "| devices |" in result.stdout and (out / "results.md").read_text() in result.stdout
    assert not (out / "load.png").exists()  # one N: nothing to plot
    # Redis answers here, so heartbeats went to the coordinator's heartbeat process: the devices timed them,
    # and the coordinator's own /metrics (the main process) saw none.
    assert record["presence"] == "redis" and record["heartbeat_process"] is True
    assert record["rpc_latency_ms"]["Heartbeat"]["count"] > 0
    assert record["coordinator_breakdown"]["rpc_handling_s"].get("Heartbeat", 0.0) == 0.0
    assert 0 < record["heartbeat_process_peak_rss_mib"] < record["peak_rss_mib"]
