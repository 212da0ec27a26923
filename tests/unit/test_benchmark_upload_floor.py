"""The upload floor benchmark times the four steps every accepted update needs, on a real encoded update."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.upload_floor import main, measure, table


def test_the_floor_is_validating_plus_adding_and_every_step_is_timed() -> None:
    result = measure(payload_params=20_000, repeats=2)
    steps = result["cpu_ms"]
    assert set(steps) == {"hash", "decode", "validate (hash + decode + schema + finite)", "add to the running sums"}
    assert all(ms >= 0 for ms in steps.values())
    assert result["floor_ms_per_update"] == steps["validate (hash + decode + schema + finite)"] + steps[
        "add to the running sums"]
    assert result["wire_bytes"] > 0 and abs(result["payload_params"] - 20_000) < 20_000
    assert "**floor per update**" in table(result)


def test_the_command_writes_its_json_and_table(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["--payload-params", "20000", "--repeats", "1", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "floor.json").read_text())["repeats"] == 1
    assert "| hash |" in (tmp_path / "floor.md").read_text() and "floor_ms_per_update" in capsys.readouterr().out
