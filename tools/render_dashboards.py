"""Draws each Grafana dashboard in ``deploy/grafana/dashboards`` as one PNG from a live Prometheus.

Grafana itself is not installable on the build machines (no Debian package; its image renderers need a
running Grafana), so this is a stand-in that shows the same data: every panel's PromQL, with Grafana's
built-in variables filled in, is run as a ``query_range`` (time series) or an instant query (stat panels)
against ``--prometheus``, and drawn where the panel's ``gridPos`` puts it, one line per series labelled by
the target's ``legendFormat``. Colours, thresholds and overrides are not reproduced.

    python -m tools.render_dashboards --prometheus http://127.0.0.1:9090 --out docs/dashboards --range 5m
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
_LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
_DURATION = re.compile(r"^(\d+)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class RenderError(Exception):
    """A dashboard could not be rendered: a malformed dashboard, bad argument or a failed query."""


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # Grafana's panel type: "timeseries" or "stat"
    unit: str
    grid: tuple[int, int, int, int]  # x, y, w, h in Grafana's 24-column grid
    targets: tuple[Target, ...]


@dataclass
class Series:
    name: str
    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


def parse_duration(text: str) -> int:
    """Seconds in a Prometheus-style duration such as ``30s``, ``5m`` or ``1h``."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise RenderError(f"not a duration (expected e.g. 30s, 5m, 1h): {text!r}")
    return int(match.group(1)) * _SECONDS[match.group(2)]


def substitute(expr: str, *, range_s: int, step_s: int, rate_interval: str) -> str:
    """``expr`` with Grafana's built-in variables replaced as Grafana would for this range and step."""
    values = {"$__rate_interval": rate_interval, "$__interval": f"{step_s}s", "$__range": f"{range_s}s",
              "$federation": ".*"}  # the dashboards' federation selector, at its default: all of them
    for variable, value in values.items():  # $__rate_interval before $__range: neither is a prefix issue
        expr = expr.replace(variable, value)
    if "$" in expr:
        raise RenderError(f"unsupported Grafana variable in {expr!r}")
    return expr


def legend(template: str, labels: dict[str, str]) -> str:
    """A series' name from a Grafana ``legendFormat``: ``{{label}}`` filled in, missing labels empty;
    without a template, the label set as Prometheus prints it."""
    if template:
        return _LEGEND_LABEL.sub(lambda m: labels.get(m.group(1), ""), template).strip() or template
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    return labels.get("__name__", "") + "{" + inner + "}"


def load_panels(path: Path) -> tuple[str, list[Panel]]:
    """A dashboard file's title and its panels (rows and other panel types without targets are skipped)."""
    try:
        dashboard = json.loads(path.read_text())
        panels = []
        for raw in dashboard["panels"]:
            targets = tuple(Target(t["expr"], t.get("legendFormat", "")) for t in raw.get("targets", []))
            if not targets:
                continue
            pos = raw["gridPos"]
            unit = raw.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
            panels.append(Panel(raw["title"], raw["type"], unit, (pos["x"], pos["y"], pos["w"], pos["h"]),
                                targets))
        return str(dashboard["title"]), panels
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise RenderError(f"{path}: not a Grafana dashboard ({exc!r})") from exc


def to_series(result: list[dict], template: str) -> list[Series]:
    """Prometheus ``matrix`` or ``vector`` results as named series (NaN/Inf points kept as NaN gaps)."""
    out = []
    for item in result:
        points = item.get("values") or ([item["value"]] if "value" in item else [])
        series = Series(legend(template, item.get("metric", {})))
        for stamp, raw in points:
            series.times.append(float(stamp))
            value = float(raw)
            series.values.append(value if abs(value) != float("inf") else float("nan"))
        out.append(series)
    return out


def format_value(value: float, unit: str) -> str:
    """A stat panel's number in its Grafana unit (the few units our dashboards use)."""
    if value != value:
        return "NaN"
    if unit == "percentunit":
        return f"{100 * value:.1f}%"
    if unit in ("bytes", "Bps"):
        for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
            if abs(value) < 1024 or prefix == "Ti":
                return f"{value:.3g} {prefix}B" + ("/s" if unit == "Bps" else "")
            value /= 1024
    if unit == "s":
        return f"{value:.3g} s"
    return f"{value:.4g}"


class PrometheusReader:
    """Runs a panel's targets against Prometheus's HTTP API over one time range."""

    def __init__(self, client: httpx.Client, *, start: float, end: float, step_s: int, rate_interval: str):
        self._client, self._start, self._end, self._step = client, start, end, step_s
        self._range_s = max(1, round(end - start))
        self._rate_interval = rate_interval

    def read(self, panel: Panel) -> list[Series]:
        out: list[Series] = []
        for target in panel.targets:
            expr = substitute(target.expr, range_s=self._range_s, step_s=self._step, rate_interval=self._rate_interval)
            if panel.kind == "stat":  # Grafana's default reduction is the last value: an instant query at the end
                params: dict[str, str | float] = {"query": expr, "time": self._end}
                path = "/api/v1/query"
            else:
                params = {"query": expr, "start": self._start, "end": self._end, "step": self._step}
                path = "/api/v1/query_range"
            response = self._client.get(path, params=params)
            body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
            if response.status_code != 200 or body.get("status") != "success":
                raise RenderError(f"{panel.title}: {expr}: {response.status_code} {response.text[:300]}")
            out.extend(to_series(body["data"]["result"], target.legend))
        return out


def draw(title: str, panels: list[tuple[Panel, list[Series]]], out: Path, *, start: float, end: float) -> None:
    """Writes one PNG laid out on Grafana's grid: a line chart per time-series panel over [start, end] (Unix
    seconds), the last value of each series per stat panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    rows = max((p.grid[1] + p.grid[3] for p, _ in panels), default=1)
    height = 0.42 * rows + 0.8
    figure = plt.figure(figsize=(18, height), dpi=90)
    grid = figure.add_gridspec(rows, 24, hspace=0.0, wspace=0.0, left=0.04, right=0.99, top=1 - 0.5 / height,
                               bottom=0.02)
    figure.suptitle(title, fontsize=15, fontweight="bold")
    for panel, series in panels:
        x, y, w, h = panel.grid
        cell = grid[y:y + h, x:x + w].subgridspec(1, 1)
        ax = figure.add_subplot(cell[0, 0])
        # Room between panels and for the tick labels: shrink each axes inside its cell.
        box = ax.get_position()
        ax.set_position((box.x0 + 0.035 * (24 / w) * box.width, box.y0 + 0.22 * box.height,
                         box.width * (1 - 0.05 * (24 / w)), box.height * 0.62))
        ax.set_title(panel.title, fontsize=10, loc="left")
        if not series:
            ax.text(0.5, 0.5, "No data", ha="center", va="center", transform=ax.transAxes, color="grey")
            ax.set_xticks([]), ax.set_yticks([])
        elif panel.kind == "stat":
            ax.set_xticks([]), ax.set_yticks([])
            text = "   ".join(f"{s.name}: {format_value(s.values[-1], panel.unit)}" for s in series)
            ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=16, wrap=True)
        else:
            for s in series:
                stamps = [datetime.fromtimestamp(t, tz=UTC) for t in s.times]
                ax.plot(stamps, s.values, label=s.name, linewidth=1.4)  # type: ignore[arg-type]
            # Every chart spans the whole range, as in Grafana, whatever time its series start.
            ax.set_xlim(mdates.date2num(datetime.fromtimestamp(start, tz=UTC)),
                        mdates.date2num(datetime.fromtimestamp(end, tz=UTC)))
            ax.xaxis.set_major_locator(mdates.SecondLocator(interval=max(1, int((end - start) / 6))))
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
            ax.tick_params(labelsize=7)
            ax.set_ylabel(panel.unit, fontsize=7)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper left", ncol=min(4, len(series)), framealpha=0.6)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)


def render_all(client: httpx.Client, out_dir: Path, *, start: float, end: float, step_s: int,
               rate_interval: str, dashboards: Path = DASHBOARDS) -> list[Path]:
    """Renders every ``*.json`` under ``dashboards`` to ``out_dir/<name>.png``; returns the files written."""
    reader = PrometheusReader(client, start=start, end=end, step_s=step_s, rate_interval=rate_interval)
    written = []
    for path in sorted(dashboards.glob("*.json")):
        title, panels = load_panels(path)
        target = out_dir / f"{path.stem}.png"
        draw(title, [(panel, reader.read(panel)) for panel in panels], target, start=start, end=end)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--out", type=Path, required=True, help="directory for <dashboard>.png")
    parser.add_argument("--range", default="15m", help="how far back from now (default 15m)")
    parser.add_argument("--step", default="", help="query step (default: range/300, at least 1s)")
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes (default 1m)")
    args = parser.parse_args(argv)
    try:
        range_s = parse_duration(args.range)
        step_s = parse_duration(args.step) if args.step else max(1, range_s // 300)
        parse_duration(args.rate_interval)
        end = time.time()
        with httpx.Client(base_url=args.prometheus, timeout=30) as client:
            for path in render_all(client, args.out, start=end - range_s, end=end, step_s=step_s,
                                   rate_interval=args.rate_interval):
                print(path)
    except RenderError as exc:
        parser.exit(2, f"render_dashboards: {exc}\n")
    except httpx.HTTPError as exc:
        parser.exit(1, f"render_dashboards: cannot query Prometheus at {args.prometheus}: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
