"""Modules stay short enough to read: none over 500 lines outside generated code."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 500


def test_no_module_is_over_500_lines() -> None:
    long = {}
    for package in ("mlecs", "server", "edge_agent", "benchmarks", "tools", "migrations"):
        for path in (ROOT / package).rglob("*.py"):
            if "proto" in path.relative_to(ROOT).parts:  # generated from protos/
                continue
            lines = len(path.read_text().splitlines())
            if lines > LIMIT:
                long[str(path.relative_to(ROOT))] = lines
    assert long == {}, f"split these by what they do: {long}"
