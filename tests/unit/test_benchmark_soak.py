"""The soak benchmark's summary and report (the run itself is long and runs in the background, not in CI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.soak import WARM_UP_S, _plot, build_parser, report_text, summarise

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _timeline(rss: list[float]) -> list[dict]:
    step = WARM_UP_S / 2
    return [{"t_s": i * step, "rss_mib": value, "open_fds": 40 + i, "staged_bytes": 0.0, "upload_streams": 1.0,
             "rows": {"updates": i, "refusals": 2 * i, "rounds": i}} for i, value in enumerate(rss)]


def _rounds(*states_and_staged: tuple[str, float]) -> list[dict]:
    return [{"number": n, "state": state, "participants": 9.0, "t_s": float(n), "staged_bytes_after": staged}
            for n, (state, staged) in enumerate(states_and_staged, start=1)]


def test_rss_is_judged_after_the_warm_up_and_every_target_is_checked() -> None:
    # 500 MiB at the warm-up's end, 540 at most after: 8% growth, flat within 10%. Before it, growth is free.
    summary = summarise(_timeline([300, 450, 500, 540, 520]), _rounds(("committed", 0), ("committed", 0)),
                        [0.1] * 99 + [2.0], {"idle:DEADLINE_EXCEEDED": 4})

    assert summary["rss_growth_after_warm_up"] == pytest.approx(0.08)
    assert summary["rss_flat_within_10pct"] and summary["every_round_committed"] and summary["staged_bytes_back_to_0"]
    assert summary["honest_upload_p99_ms"] == pytest.approx(1000 * (0.1 + 0.01 * 1.9))  # rank 98.01 of 0..99
    assert summary["open_fds_max"] == 44


def test_a_failed_round_growing_memory_or_staged_bytes_left_behind_fail_their_checks() -> None:
    summary = summarise(_timeline([500, 500, 500, 600]), _rounds(("committed", 0), ("failed", 4096.0)), [], {})

    assert not summary["every_round_committed"] and summary["rounds_committed"] == 1
    assert not summary["rss_flat_within_10pct"] and summary["rss_growth_after_warm_up"] == pytest.approx(0.2)
    assert not summary["staged_bytes_back_to_0"] and summary["staged_bytes_after_rounds_max"] == 4096.0
    assert summary["honest_upload_p99_ms"] is None


def test_the_report_and_the_plot_show_the_run(tmp_path: Path) -> None:
    timeline = _timeline([500, 500, 510])
    record = {"devices": 20, "hostile": 2, "minutes": 1.0, "payload_params": 1000,
              "summary": summarise(timeline, _rounds(("committed", 0)), [0.2], {"flood:OK": 50}),
              "rounds": [], "timeline": timeline}

    report = report_text(record)
    _plot(record, tmp_path / "soak.png")

    assert "20 devices (2 hostile)" in report and "| every_round_committed | True |" in report
    assert "flood:OK 50" in report
    assert (tmp_path / "soak.png").read_bytes()[:8] == PNG_MAGIC


def test_the_defaults_are_the_issues_soak(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--out", str(tmp_path)])

    assert (args.devices, args.hostile_fraction, args.minutes) == (200, 0.1, 30.0)
