"""The dashboard renderer's query and label logic (``tools/render_dashboards.py``); drawing from a live
Prometheus is exercised by ``tests/integration/test_dashboards.py`` with MLECS_DASHBOARD_PICTURES set."""

import json
from pathlib import Path

import pytest

from tools.render_dashboards import (
    DASHBOARDS,
    Panel,
    RenderError,
    Series,
    Target,
    draw,
    format_value,
    legend,
    load_panels,
    parse_duration,
    substitute,
    to_series,
)


def test_grafana_variables_are_filled_in_for_the_range_and_step():
    expr = "sum(increase(a[$__range])) / sum(rate(b[$__rate_interval])) + avg_over_time(c[$__interval])"
    assert substitute(expr, range_s=900, step_s=3, rate_interval="1m") == (
        "sum(increase(a[900s])) / sum(rate(b[1m])) + avg_over_time(c[3s])")


def test_an_unknown_grafana_variable_is_an_error_naming_the_expression():
    with pytest.raises(RenderError, match=r"\$instance"):
        substitute('up{instance="$instance"}', range_s=60, step_s=1, rate_interval="1m")


def test_legend_fills_labels_and_leaves_missing_ones_empty():
    assert legend("{{method}} {{code}}", {"method": "Heartbeat", "code": "OK"}) == "Heartbeat OK"
    assert legend("{{ method }} {{code}}", {"method": "Heartbeat"}) == "Heartbeat"
    assert legend("p95", {"le": "1"}) == "p95"
    assert legend("{{missing}}", {}) == "{{missing}}"  # nothing left: the template, not an empty name


def test_without_a_legend_format_the_series_is_named_by_its_labels():
    assert legend("", {"__name__": "up", "job": "mlecs", "instance": "a:1"}) == 'up{instance="a:1",job="mlecs"}'


def test_matrix_and_vector_results_become_named_series_with_inf_as_gaps():
    matrix = [{"metric": {"state": "committed"}, "values": [[10, "1"], [11, "+Inf"], [12, "2.5"]]}]
    (series,) = to_series(matrix, "{{state}}")
    assert series.name == "committed" and series.times == [10.0, 11.0, 12.0]
    assert series.values[0] == 1.0 and series.values[1] != series.values[1] and series.values[2] == 2.5
    (stat,) = to_series([{"metric": {}, "value": [20, "3"]}], "online")
    assert (stat.name, stat.times, stat.values) == ("online", [20.0], [3.0])


def test_every_shipped_dashboard_loads_with_targets_inside_grafanas_grid():
    names = sorted(path.stem for path in DASHBOARDS.glob("*.json"))
    assert names == ["fleet", "health", "learning", "rounds", "traffic"]
    for path in DASHBOARDS.glob("*.json"):
        title, panels = load_panels(path)
        assert title.startswith("mlecs / ") and panels
        for panel in panels:
            x, _, w, h = panel.grid
            assert x >= 0 and x + w <= 24 and h > 0 and panel.targets, (path.name, panel.title)


def test_a_file_that_is_not_a_dashboard_is_refused_by_name(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"panels": [{"title": "x"}]}))
    with pytest.raises(RenderError, match=r"bad\.json: not a Grafana dashboard"):
        load_panels(bad)


def test_durations_and_units():
    assert [parse_duration(d) for d in ("30s", "5m", "1h", "2d")] == [30, 300, 3600, 172800]
    with pytest.raises(RenderError, match="'5 minutes'"):
        parse_duration("5 minutes")
    assert format_value(0.461, "percentunit") == "46.1%"
    assert format_value(3 * 1024 * 1024, "bytes") == "3 MiB"
    assert format_value(2048, "Bps") == "2 KiB/s"
    assert format_value(float("nan"), "short") == "NaN"


def test_draw_writes_a_png_for_time_series_stat_and_empty_panels(tmp_path: Path):
    panels = [
        (Panel("Lines", "timeseries", "short", (0, 0, 12, 8), (Target("a", "{{x}}"),)),
         [Series("one", [0.0, 1.0, 2.0], [1.0, 2.0, 3.0])]),
        (Panel("Number", "stat", "percentunit", (12, 0, 12, 8), (Target("b", "v"),)), [Series("v", [2.0], [0.5])]),
        (Panel("Nothing", "timeseries", "s", (0, 8, 24, 8), (Target("c", ""),)), []),
    ]
    out = tmp_path / "deep" / "d.png"
    draw("mlecs / Test", panels, out, start=0.0, end=2.0)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
